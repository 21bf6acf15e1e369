"""The two checkpoint layouts, as names, configs and shapes (no file access: see `checkpoint_files`).

Three kinds of checkpoint are read (SPEC 1): the original LLaVA layout (`model_type` `llava_llama`, the
vision tower referenced by `mm_vision_tower`), Dynamic-LLaVA's (the same plus `sparse_config` and
predictor weights) and llava-hf's (`LlavaForConditionalGeneration`, tower inside the checkpoint). This
module recognises the layout from config.json, translates llava-hf configs and weight names into LLaVA's
and back, and checks weights against the model a config describes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig

from ..errors import UserError
from .config import DynamicLlavaConfig
from .llava import DynamicLlavaForCausalLM

PREDICTOR_MODULES = ("image_score_predictor", "output_text_score_predictor", "instruct_score_predictor")
LLAVA, HF = "llava", "hf"
StateDict = dict[str, torch.Tensor]
# Old transformers saved RoPE buffers; DeepSpeed saves the frozen tower inside LLaVA checkpoints.
_IGNORED_LLAVA_KEYS = re.compile(r"^model\.vision_tower\.|rotary_emb\.inv_freq$")
# llava-hf names (transformers 5 and 4.x) -> LLaVA names; `None` marks the vision tower.
_HF_RENAMES: tuple[tuple[str, str | None], ...] = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.vision_tower.", None),
    ("vision_tower.", None),
)
_CLIP_VISION_MODULES = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")
SELECT_FEATURE_TO_HF = {"patch": "default", "cls_patch": "full"}
# LLaVA config keys with no llava-hf counterpart; conversions to llava-hf keep them beside the hf keys.
LLAVA_ONLY_KEYS = ("mm_patch_merge_type", "image_aspect_ratio", "mm_use_im_start_end", "mm_use_im_patch_token",
                   "tokenizer_padding_side", "tokenizer_model_max_length", "use_mm_proj", "tune_mm_mlp_adapter",
                   "freeze_mm_mlp_adapter", "sparse_config")
# The vocabulary rows: llava-hf's `<image>` token adds one to each.
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


# ----------------------------------------------------------------------------- weight names
def split_hf_names(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
    """llava-hf names -> (LLaVA-named LLM/projector/predictor weights, CLIPVisionModel weights)."""
    llm, tower = {}, {}
    for name, tensor in state.items():
        for old, new in _HF_RENAMES:
            if name.startswith(old):
                if new is None:
                    tower[name[len(old):].removeprefix("vision_model.")] = tensor
                else:
                    llm[new + name[len(old):]] = tensor
                break
        else:
            llm[name] = tensor
    return llm, tower


def llava_names(state: Mapping[str, torch.Tensor], layout: str) -> tuple[StateDict, StateDict]:
    """Any layout's names -> (LLaVA-named model weights, vision-tower weights for the hf layout)."""
    if layout == HF:
        return split_hf_names(state)
    return {k: v for k, v in state.items() if not _IGNORED_LLAVA_KEYS.search(k)}, {}


def hf_name(name: str) -> str:
    """A LLaVA weight name -> its llava-hf (transformers 5) name; predictors keep theirs."""
    if name.startswith("model.mm_projector."):
        index, rest = name.removeprefix("model.mm_projector.").split(".", 1)
        return f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"
    if name.startswith("model.") and not is_predictor_key(name):
        return "model.language_model." + name.removeprefix("model.")
    return name


def clip_vision_names(state: Mapping[str, torch.Tensor]) -> StateDict:
    """The CLIPVisionModel weights of a CLIP checkpoint's (vision-only or full) weights, the text half left out."""
    vision = {}
    for name, tensor in state.items():
        if name.startswith("vision_model."):
            vision[name.removeprefix("vision_model.")] = tensor
        elif name.split(".")[0] in _CLIP_VISION_MODULES:  # transformers 5 saves without `vision_model.`
            vision[name] = tensor
    return vision


def is_predictor_key(name: str) -> bool:
    return name.split(".")[1] in PREDICTOR_MODULES if name.startswith("model.") else False


# ----------------------------------------------------------------------------- configs
def checkpoint_layout(raw: Mapping[str, Any], path: Path) -> str:
    """LLAVA or HF for the config.json `raw` of checkpoint `path`; a UserError for anything else."""
    model_type = raw.get("model_type")
    if model_type in ("llava", "llava_llama") and "mm_vision_tower" in raw:
        return LLAVA
    if model_type == "llava" and "text_config" in raw and "vision_config" in raw:
        return HF
    if model_type == "llama":
        raise UserError(f"{path} holds a plain LLaMA model; pass it as model_base, with model_path the "
                        "LLaVA projector or LoRA folder")
    raise UserError(f"{path / 'config.json'}: unsupported model_type {model_type!r} "
                    "(expected a LLaVA-1.5 `llava_llama`/`llava` checkpoint or a llava-hf `llava` one)")


def config_from_hf(raw: Mapping[str, Any]) -> tuple[DynamicLlavaConfig, CLIPVisionConfig]:
    """A llava-hf config.json -> (DynamicLlavaConfig with `mm_vision_tower="vision_tower"`, tower config).

    Keys of the LLaVA layout stored beside the hf ones (as `convert_checkpoint` does) are kept.
    """
    hf = LlavaConfig.from_dict(dict(raw))
    text, vision = hf.text_config, hf.vision_config
    if text.model_type != "llama":
        raise UserError(f"llava-hf checkpoint with a {text.model_type!r} language model is not supported (llama only)")
    if not isinstance(hf.vision_feature_layer, int):
        raise UserError(f"vision_feature_layer {hf.vision_feature_layer!r} is not supported (a single layer only)")
    if hf.projector_hidden_act != "gelu" or not getattr(hf, "multimodal_projector_bias", True):
        raise UserError(f"projector_hidden_act {hf.projector_hidden_act!r} is not supported (gelu with bias only)")
    select = {v: k for k, v in SELECT_FEATURE_TO_HF.items()}.get(hf.vision_feature_select_strategy)
    if select is None:
        raise UserError(f"unknown vision_feature_select_strategy {hf.vision_feature_select_strategy!r}")
    if (text.rope_parameters or {}).get("rope_type", "default") != "default":
        raise UserError(f"rope_parameters {text.rope_parameters} are not supported (default RoPE only)")
    extras = {k: raw[k] for k in LLAVA_ONLY_KEYS if k in raw}
    params = dict(
        extras,
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, head_dim=getattr(text, "head_dim", None),
        hidden_act=text.hidden_act, max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps, rope_parameters=text.rope_parameters,
        attention_bias=text.attention_bias, mlp_bias=text.mlp_bias,
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
        mm_vision_tower="vision_tower", mm_hidden_size=vision.hidden_size, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=hf.vision_feature_layer, mm_vision_select_feature=select,
        dtype=raw.get("dtype", raw.get("torch_dtype")),
    )
    return DynamicLlavaConfig(**params), vision


def llava_config_json(config: DynamicLlavaConfig, sparse: bool, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the LLaVA layout: `sparse_config` only for Dynamic-LLaVA (`sparse`), `torch_dtype` that
    of the weights."""
    raw = config.to_llava_dict()
    if not sparse:
        raw.pop("sparse_config")
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    return raw


def llava_hf_config(config: DynamicLlavaConfig, tower_config: CLIPVisionConfig, vocab_size: int, image_id: int,
                    dtype: torch.dtype, sparse: bool) -> LlavaConfig:
    """The llava-hf config of a LLaVA `config` with `vocab_size` rows (`<image>` = `image_id` included); the
    LLaVA-only keys kept beside (`sparse_config` only when `sparse`)."""
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, attention_bias=config.attention_bias, mlp_bias=config.mlp_bias,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        tie_word_embeddings=False,
    )
    select = SELECT_FEATURE_TO_HF[config.mm_vision_select_feature]
    hf = LlavaConfig(
        vision_config=tower_config.to_dict(), text_config=text.to_dict(), image_token_index=image_id,
        vision_feature_layer=config.mm_vision_select_layer, vision_feature_select_strategy=select,
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
        image_seq_length=(tower_config.image_size // tower_config.patch_size) ** 2 + (select == "full"),
    )
    hf.architectures = ["LlavaForConditionalGeneration"]
    hf.dtype = dtype
    llava = config.to_llava_dict()
    for key in LLAVA_ONLY_KEYS:
        if key != "sparse_config" or sparse:
            setattr(hf, key, llava[key])
    return hf


# ----------------------------------------------------------------------------- shapes
def expected_shapes(config: DynamicLlavaConfig) -> dict[str, torch.Size]:
    """The state-dict names and shapes of the model for `config` (built on the meta device)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in DynamicLlavaForCausalLM(config).state_dict().items()}


def _few(names: set[str] | list[str], n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" (and {len(names) - n} more)" if len(names) > n else "")


def check_keys(expected: Mapping[str, torch.Size], found: Mapping[str, torch.Size], where: Path) -> bool:
    """Raise a UserError on missing, unexpected or mis-shaped weights; return whether predictors are present.

    A checkpoint may lack all predictor weights (plain LLaVA-1.5): that is reported, not an error.
    """
    unexpected = found.keys() - expected.keys()
    if unexpected:
        raise UserError(f"{where}: unexpected weights {_few(unexpected)}")
    wrong = [f"{k} {tuple(found[k])} (expected {tuple(expected[k])})" for k in found if found[k] != expected[k]]
    if wrong:
        raise UserError(f"{where}: weights of the wrong shape for config.json: {_few(wrong, 3)}")
    missing = expected.keys() - found.keys()
    predictors_absent = not any(is_predictor_key(k) for k in found)
    if predictors_absent:
        missing = {k for k in missing if not is_predictor_key(k)}
    if missing:
        raise UserError(f"{where}: missing weights {_few(missing)}")
    return not predictors_absent


def check_tower_keys(vision_config: CLIPVisionConfig, state: Mapping[str, torch.Tensor], where: Path) -> None:
    """Raise a UserError unless `state` is exactly a CLIPVisionModel's for `vision_config`."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in CLIPVisionModel(vision_config).state_dict().items()}
    if {k: v.shape for k, v in state.items()} != expected:
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        raise UserError(f"{where}: vision tower weights do not match its config "
                        f"(missing {_few(missing, 3) or '-'}; unexpected {_few(unexpected, 3) or '-'})")
