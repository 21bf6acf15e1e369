"""The model a training run starts from, and which of its parameters train.

Three starting points, as in LLaVA: a plain LLM (Vicuna) plus a CLIP tower for stage-1 pre-training
(projector fresh or from `--pretrain_mm_mlp_adapter`); a LLaVA-1.5 checkpoint for instruction tuning
or Dynamic-LLaVA sparsification training (predictors fresh when the checkpoint has none); LoRA on
top of either through peft.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPImageProcessor, PreTrainedTokenizerBase

from ..constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from ..errors import MissingExtra, UserError
from ..model.checkpoint_files import read_json, read_state_file, resolve_local, resolve_vision_tower
from ..model.layouts import is_predictor_key
from ..model.llava import DynamicLlavaForCausalLM
from ..model.loading import load_base_llm, load_pretrained_model
from .arguments import ModelArguments, SparseArguments, TrainingArguments

# LLaMA's linear layers; the predictors' (qkv, proj, fc1, fc2, output_mlp.N) and the projector's do not match.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def check_model_args(model_args: ModelArguments) -> None:
    """Fail fast, before anything heavy is loaded, on a missing checkpoint, tower or projector file."""
    path = resolve_local(model_args.model_name_or_path, "model")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json")
    if is_plain_llm(path) and not model_args.vision_tower:
        raise UserError(f"{path} is a plain LLM: pass --vision_tower (a CLIP folder or cached Hub id)")
    if model_args.vision_tower:
        resolve_vision_tower(model_args.vision_tower)
    if model_args.pretrain_mm_mlp_adapter and not Path(model_args.pretrain_mm_mlp_adapter).is_file():
        raise UserError(f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter} does not exist")
    if model_args.mm_patch_merge_type != "flat":
        raise UserError("only --mm_patch_merge_type flat (LLaVA-1.5) is supported")


def is_plain_llm(path: Path) -> bool:
    return read_json(path / "config.json").get("model_type") in ("llama", "mistral")


def build_model(model_args: ModelArguments, training_args: TrainingArguments, image_aspect_ratio: str,
                sparse_args: SparseArguments | None
                ) -> tuple[DynamicLlavaForCausalLM, PreTrainedTokenizerBase, CLIPImageProcessor]:
    """Load the starting model (fp32, or bf16 under DeepSpeed with --bf16) and set its LLaVA config keys."""
    dtype = torch.bfloat16 if training_args.bf16 and training_args.deepspeed else torch.float32
    path = resolve_local(model_args.model_name_or_path, "model")
    mm_config = dict(mm_projector_type=model_args.mm_projector_type,
                     mm_vision_select_layer=model_args.mm_vision_select_layer,
                     mm_vision_select_feature=model_args.mm_vision_select_feature)
    if is_plain_llm(path):
        tokenizer, model, processor = load_base_llm(path, model_args.vision_tower, dtype=dtype, **mm_config)
    else:
        tokenizer, model, processor, _ = load_pretrained_model(path, dtype=dtype, vision_tower=model_args.vision_tower)
    if model_args.pretrain_mm_mlp_adapter:
        _load_projector(model, Path(model_args.pretrain_mm_mlp_adapter))
    config = model.config
    config.image_aspect_ratio = image_aspect_ratio
    config.tokenizer_padding_side = tokenizer.padding_side = "right"
    config.tokenizer_model_max_length = tokenizer.model_max_length = training_args.model_max_length
    config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
    config.mm_use_im_start_end = model_args.mm_use_im_start_end
    config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    _add_image_tokens(model, tokenizer, model_args)
    if sparse_args is not None:
        if sparse_args.use_instruct_predictor:
            raise UserError("--use_instruct_predictor True is not supported in training (the paper's ablation "
                            "shows it hurts); leave it False")
        # the keep rates and sparse_layer this training writes into the checkpoint
        config.sparse_config = model.sparse.replace(**sparse_args.sparse_config()).to_dict()
    model.train()
    return model, tokenizer, processor


def _load_projector(model: DynamicLlavaForCausalLM, file: Path) -> None:
    """A stage-1 `mm_projector.bin` (keys `model.mm_projector.*`, possibly without the `model.` prefix)."""
    state = {k.split("mm_projector.", 1)[1]: v for k, v in read_state_file(file).items() if "mm_projector." in k}
    if not state:
        raise UserError(f"{file} holds no mm_projector weights")
    own = model.model.mm_projector.state_dict()
    if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in own.items()}:
        raise UserError(f"{file} does not match --mm_projector_type {model.config.mm_projector_type} "
                        f"with this LLM and tower (expected {sorted(own)})")
    model.model.mm_projector.load_state_dict(state)


def _add_image_tokens(model: DynamicLlavaForCausalLM, tokenizer: PreTrainedTokenizerBase,
                      model_args: ModelArguments) -> None:
    """LLaVA's optional <im_patch> / <im_start> <im_end> tokens; new embedding rows start at the mean."""
    tokens = ([DEFAULT_IMAGE_PATCH_TOKEN] if model_args.mm_use_im_patch_token else []) + \
        ([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN] if model_args.mm_use_im_start_end else [])
    added = tokenizer.add_tokens(tokens, special_tokens=True) if tokens else 0
    if added:
        old = model.model.embed_tokens.weight.shape[0]
        model.resize_token_embeddings(len(tokenizer))
        with torch.no_grad():
            for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
                weight[old:] = weight[:old].mean(0, keepdim=True)


def set_trainable(model: DynamicLlavaForCausalLM, model_args: ModelArguments, training_args: TrainingArguments,
                  sparse: bool) -> None:
    """requires_grad per LLaVA's stages; the vision tower only with --unfreeze_mm_vision_tower, the
    predictors only when sparse."""
    model.requires_grad_(not model_args.freeze_backbone)
    model.model.mm_projector.requires_grad_(True)
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
        model.model.mm_projector.requires_grad_(True)
    if training_args.freeze_mm_mlp_adapter:
        model.model.mm_projector.requires_grad_(False)
    for name, param in model.named_parameters():
        if is_predictor_key(name):
            param.requires_grad_(sparse)
    if model.model.vision_tower is not None:
        model.model.vision_tower.requires_grad_(model_args.unfreeze_mm_vision_tower)


def add_lora(model: DynamicLlavaForCausalLM, training_args: TrainingArguments) -> torch.nn.Module:
    """Wrap with peft LoRA on the LLM's linear layers; the projector and predictors keep their
    requires_grad (peft would freeze them)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MissingExtra("peft", needed_by="--lora_enable") from None
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and not name.startswith("model.layers.")
                 and not name.startswith(("model.embed_tokens", "lm_head", "model.norm"))]
    config = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha, target_modules=LORA_TARGETS,
                        lora_dropout=training_args.lora_dropout, bias=training_args.lora_bias)
    peft_model = get_peft_model(model, config)
    params = dict(model.named_parameters())
    for name in trainable:
        params[name].requires_grad_(True)
    if training_args.lora_weight_path:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(peft_model, read_state_file(Path(training_args.lora_weight_path)))
    return peft_model
