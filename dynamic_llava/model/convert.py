"""Checkpoint layouts on disk: finding them (local folders, the local HF cache), reading, writing, and
converting between the original LLaVA layout and the transformers port (llava-hf).

Three layouts are read (SPEC 1): the original LLaVA one (`model_type` `llava_llama`, the vision tower
referenced by `mm_vision_tower`), Dynamic-LLaVA's (the same plus `sparse_config` and predictor weights)
and llava-hf's (`LlavaForConditionalGeneration`, tower inside the checkpoint). Nothing is downloaded:
whatever is missing is a `UserError` saying how to supply it.

LLaVA -> llava-hf writes a `LlavaConfig`, transformers names (the vision tower included), the embedding
and `lm_head` grown by one row for the `<image>` token (added to the tokenizer) and a `LlavaProcessor`.
Predictor weights and the LLaVA-only config keys (`sparse_config`, `image_aspect_ratio`, ...) are kept
beside them, so LLaVA -> llava-hf -> LLaVA gives back the same checkpoint. llava-hf -> LLaVA is the
inverse, with the tower written as the CLIP folder `vision_tower/` inside the output.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from transformers import (AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig,
                          LlavaProcessor, PreTrainedTokenizerBase)
from transformers.initialization import no_init_weights

from ..constants import DEFAULT_IMAGE_TOKEN
from ..errors import UserError
from .config import DynamicLlavaConfig
from .llava import DynamicLlavaForCausalLM

try:  # transformers >= 5 names the PIL (torchvision-free) processor explicitly
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor

PREDICTOR_MODULES = ("image_score_predictor", "output_text_score_predictor", "instruct_score_predictor")
LLAVA, HF = "llava", "hf"
StateDict = dict[str, torch.Tensor]
_WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                 ("pytorch_model.bin.index.json", "pytorch_model.bin"))
_STALE_WEIGHTS = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin)(\.index\.json)?$")
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


# ----------------------------------------------------------------------------- finding things
def _cached_snapshot(repo_id: str) -> Path | None:
    """The local HF-cache snapshot of a Hub repo, or None (never touches the network)."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError):
        return None


def resolve_local(name: str | Path, what: str, search_dirs: tuple[Path, ...] = ()) -> Path:
    """A folder given as a path (relative ones tried against `search_dirs`, then the current
    directory) or as a Hub id present in the local HF cache."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [d / path for d in search_dirs] + [path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    snapshot = None if path.is_absolute() else _cached_snapshot(str(name))
    if snapshot is not None:
        return snapshot
    raise UserError(
        f"{what} {str(name)!r} not found: it is not a local folder and not in the local Hugging Face cache "
        "(there is no network access). Download it on a machine with access "
        f"(`huggingface-cli download {name}`) and copy it into the cache (set HF_HOME to point at it), "
        "or give a local folder path instead.")


def resolve_vision_tower(name: str, checkpoint_dir: Path | None = None) -> Path:
    """`mm_vision_tower` as a folder: relative to the checkpoint, the current directory, or the HF cache."""
    try:
        path = resolve_local(name, "vision tower", (checkpoint_dir,) if checkpoint_dir else ())
    except UserError as err:
        if checkpoint_dir is None:
            raise
        raise UserError(f"{err} Alternatively set `mm_vision_tower` in {checkpoint_dir / 'config.json'} "
                        "to a local CLIP folder, or pass vision_tower=<path>.") from None
    if not (path / "config.json").is_file():
        raise UserError(f"vision tower folder {path} has no config.json (expected a CLIP checkpoint)")
    return path


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder, single-file or sharded (safetensors preferred)."""
    for index_name, single_name in _WEIGHT_FILES:
        if (path / index_name).is_file():
            try:
                weight_map = json.loads((path / index_name).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"malformed weight index {path / index_name}: {err}") from None
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{path / index_name} lists missing shard(s): {', '.join(missing[:3])}")
            return files
        if (path / single_name).is_file():
            return [path / single_name]
    raise UserError(f"no weight files in {path} (expected model.safetensors, pytorch_model.bin, "
                    "or a sharded model.safetensors.index.json / pytorch_model.bin.index.json)")


def read_state_file(file: Path) -> StateDict:
    """One `.safetensors` or `.bin` file as a CPU state dict, memory-mapped (a 10 GB LLaVA-1.5 shard is then
    not read whole beside the model) unless the `.bin` predates torch's zip format."""
    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:  # corrupt files raise many different types
        raise UserError(f"cannot read weights from {file}: {err}") from None


def iter_shards(path: Path) -> Iterator[StateDict]:
    """A checkpoint's weights, one shard at a time (so at most one shard is in memory beside the model)."""
    for file in weight_files(path):
        yield read_state_file(file)


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


# ----------------------------------------------------------------------------- configs
def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path.parent} is not a checkpoint folder: {path.name} is missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"malformed {path}: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"malformed {path}: expected a JSON object")
    return data


def checkpoint_layout(raw: Mapping[str, Any], path: Path) -> str:
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


def read_checkpoint_config(path: Path) -> tuple[str, DynamicLlavaConfig, CLIPVisionConfig | None, dict[str, Any]]:
    """(layout, config, tower config for hf checkpoints, raw config.json) of a checkpoint folder."""
    raw = read_json(path / "config.json")
    layout = checkpoint_layout(raw, path)
    if layout == HF:
        return (layout, *config_from_hf(raw), raw)
    return layout, DynamicLlavaConfig(**raw), None, raw


def expected_shapes(config: DynamicLlavaConfig) -> dict[str, torch.Size]:
    """The state-dict names and shapes of the model for `config` (built on the meta device)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in DynamicLlavaForCausalLM(config).state_dict().items()}


def is_predictor_key(name: str) -> bool:
    return name.split(".")[1] in PREDICTOR_MODULES if name.startswith("model.") else False


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


# ----------------------------------------------------------------------------- tokenizer, processor, tower
def open_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer files of a checkpoint folder, as saved.

    A SentencePiece tokenizer whose tokenizer_config.json has no `legacy` key gets `legacy=True`: that is
    how LLaVA's transformers (4.3x) reads such a folder, and `legacy` changes the ids of text after special
    tokens (see `mm_utils.SlowLlamaEncoder`); transformers 5 would read it as False.
    """
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"no tokenizer in {path} (tokenizer.model or tokenizer.json); copy the tokenizer files "
                        "of the base LLM (e.g. lmsys/vicuna-7b-v1.5) into that folder")
    config_file = path / "tokenizer_config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    kwargs = {"legacy": True} if (path / "tokenizer.model").is_file() and "legacy" not in config else {}
    try:
        # AutoConfig does not know LLaVA's `llava_llama`; the language model is LLaMA either way.
        return AutoTokenizer.from_pretrained(path, config=LlamaConfig(), local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer in {path}: {err}") from None


def load_image_processor(path: Path) -> CLIPImageProcessor:
    """CLIP preprocessing settings from `preprocessor_config.json` (or a processor's `processor_config.json`)."""
    if not any((path / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise UserError(f"no preprocessor_config.json in {path} (the CLIP image processor settings)")
    return CLIPImageProcessor.from_pretrained(path, local_files_only=True)


@contextlib.contextmanager
def empty_init(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Build modules uninitialised, directly on `device` in `dtype` (weights are loaded right after)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), device:
            yield
    finally:
        torch.set_default_dtype(previous)


def check_tower_keys(vision_config: CLIPVisionConfig, state: Mapping[str, torch.Tensor], where: Path) -> None:
    """Raise a UserError unless `state` is exactly a CLIPVisionModel's for `vision_config`."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in CLIPVisionModel(vision_config).state_dict().items()}
    if {k: v.shape for k, v in state.items()} != expected:
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        raise UserError(f"{where}: vision tower weights do not match its config "
                        f"(missing {_few(missing, 3) or '-'}; unexpected {_few(unexpected, 3) or '-'})")


def build_clip(vision_config: CLIPVisionConfig, state: StateDict, where: Path,
               device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> CLIPVisionModel:
    """A CLIPVisionModel holding `state` (in its stored dtype if `dtype` is None)."""
    check_tower_keys(vision_config, state, where)
    with empty_init(torch.device(device), dtype or next(iter(state.values())).dtype):
        clip = CLIPVisionModel(vision_config)
    clip.load_state_dict(state)
    return clip.eval()


def load_clip(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> CLIPVisionModel:
    """The CLIP vision model in a tower folder (of a full CLIP checkpoint, its vision half).

    Read directly rather than with `from_pretrained`, which reports the text half as unexpected weights.
    """
    try:
        config = CLIPVisionConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the CLIP vision tower config in {path}: {err}") from None
    state: StateDict = {}
    for shard in iter_shards(path):
        for name, tensor in shard.items():
            if name.startswith("vision_model."):
                state[name.removeprefix("vision_model.")] = tensor
            elif name.split(".")[0] in _CLIP_VISION_MODULES:  # transformers 5 saves without `vision_model.`
                state[name] = tensor
    return build_clip(config, state, path, device, dtype)


# ----------------------------------------------------------------------------- saving
@dataclass
class CheckpointParts:
    """Everything a checkpoint holds, in LLaVA names, independent of the on-disk layout."""

    config: DynamicLlavaConfig
    state: StateDict  # LLM, projector and (optionally) predictors, without the tower
    tokenizer: PreTrainedTokenizerBase
    tower_config: CLIPVisionConfig | None  # None: the tower is only referenced by `mm_vision_tower`
    tower_state: StateDict  # CLIPVisionModel names
    image_processor: CLIPImageProcessor | None
    has_sparse_config: bool = True
    drop_tokens: tuple[str, ...] = ()  # added tokens to remove from the saved tokenizer


@contextlib.contextmanager
def staged_output(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to `out_dir`; on success its files replace those in `out_dir`.

    A new `out_dir` appears by one rename. Into an existing folder (e.g. a training output dir) the files
    are moved one by one, after removing weight files the new checkpoint does not rewrite.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot save a checkpoint to {out}: it is a file")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    stage.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stick to the checkpoint folder
    try:
        yield stage
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            stage.rename(out)
            return
        for old in out.iterdir():
            if old.is_file() and _STALE_WEIGHTS.match(old.name):
                old.unlink()
        for new in stage.iterdir():
            target = out / new.name
            if target.is_dir():
                shutil.rmtree(target)
            new.replace(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_state_dict(state: StateDict, out: Path, max_shard_size: int | str = "5GB") -> None:
    """safetensors weights, sharded with `model.safetensors.index.json` when larger than `max_shard_size`."""
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out: Path, drop_tokens: tuple[str, ...] = ()) -> None:
    """The tokenizer files, plus the SentencePiece model the original LLaVA code (slow tokenizer) reads and
    the tokenizer_config.json keys it needs (see `_complete_tokenizer_config`).

    `drop_tokens` are added tokens removed from the saved files (transformers cannot remove them in memory).
    """
    source = Path(str(tokenizer.name_or_path)) / "tokenizer_config.json"
    source_config = read_json(source) if source.is_file() else {}  # read first: `out` may be the source
    tokenizer.save_pretrained(out)
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if vocab_file and Path(vocab_file).is_file() and not (out / "tokenizer.model").exists():
        shutil.copyfile(vocab_file, out / "tokenizer.model")
    _complete_tokenizer_config(tokenizer, out / "tokenizer_config.json", source_config)

    def kept(entry: Any) -> bool:
        return (entry.get("content") if isinstance(entry, dict) else entry) not in drop_tokens

    for file in (out / "tokenizer.json", out / "tokenizer_config.json", out / "special_tokens_map.json"):
        if not drop_tokens or not file.is_file():
            continue
        data = json.loads(file.read_text())
        for key in ("added_tokens", "additional_special_tokens", "extra_special_tokens"):
            if isinstance(data.get(key), list):
                data[key] = [entry for entry in data[key] if kept(entry)]
        if isinstance(data.get("added_tokens_decoder"), dict):
            data["added_tokens_decoder"] = {k: v for k, v in data["added_tokens_decoder"].items() if kept(v)}
        file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _complete_tokenizer_config(tokenizer: PreTrainedTokenizerBase, file: Path, source_config: dict[str, Any]) -> None:
    """Put back into tokenizer_config.json what the slow tokenizer of LLaVA's transformers (4.3x) reads and
    transformers 5 leaves out: every key of the source folder's config (`legacy`, `add_bos_token`, ...),
    `legacy` as this tokenizer reads it (a missing key would be read as True there), the added tokens."""
    config = {**source_config, **(read_json(file) if file.is_file() else {})}
    if (file.parent / "tokenizer.model").is_file() and hasattr(tokenizer, "legacy"):  # only SentencePiece reads it
        config["legacy"] = bool(tokenizer.legacy)
    added = sorted(tokenizer.added_tokens_decoder.items())
    config["added_tokens_decoder"] = {
        str(token_id): {"content": str(token.content), "lstrip": bool(token.lstrip),
                        "normalized": bool(token.normalized), "rstrip": bool(token.rstrip),
                        "single_word": bool(token.single_word), "special": bool(token.special)}
        for token_id, token in added
    }
    # 4.3x counts a special added token (e.g. <im_start>) among all_special_tokens only when listed here.
    named = {str(t) for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) if t}
    extra = [str(token.content) for _, token in added if token.special and str(token.content) not in named]
    if extra:
        config["additional_special_tokens"] = extra
    file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def save_clip_tower(clip_config: CLIPVisionConfig, state: Mapping[str, torch.Tensor],
                    image_processor: CLIPImageProcessor, out: Path) -> None:
    """A CLIP vision folder with `vision_model.` names, loadable by transformers 4.x and 5."""
    out.mkdir(parents=True, exist_ok=True)
    clip_config.save_pretrained(out)
    tensors = {f"vision_model.{k}": v.detach().contiguous() for k, v in state.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    image_processor.save_pretrained(out)


def tower_travels_with_checkpoint(name: str) -> bool:
    """A relative `mm_vision_tower` that is not a cached Hub id names a folder inside the checkpoint."""
    path = Path(name).expanduser()
    return not path.is_absolute() and ".." not in path.parts and _cached_snapshot(name) is None


def write_llava_checkpoint(parts: CheckpointParts, out_dir: str | Path, max_shard_size: int | str = "5GB") -> Path:
    """Write `parts` in the original LLaVA-1.5 layout (see `save_pretrained_llava`)."""
    config = parts.config.to_llava_dict()
    if not parts.has_sparse_config:
        config.pop("sparse_config")
    config["torch_dtype"] = str(parts.state["lm_head.weight"].dtype).removeprefix("torch.")
    with staged_output(out_dir) as stage:
        (stage / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_state_dict(parts.state, stage, max_shard_size)
        save_tokenizer(parts.tokenizer, stage, parts.drop_tokens)
        if tower_travels_with_checkpoint(config["mm_vision_tower"]):
            if parts.tower_config is None:
                raise UserError(f"mm_vision_tower {config['mm_vision_tower']!r} is a folder inside the checkpoint, "
                                "but no vision tower is attached to the model to write there")
            save_clip_tower(parts.tower_config, parts.tower_state, parts.image_processor,
                            stage / config["mm_vision_tower"])
    return Path(out_dir)


# ----------------------------------------------------------------------------- LLaVA <-> llava-hf


_EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def read_checkpoint(path: Path) -> CheckpointParts:
    """All parts of a LLaVA, Dynamic-LLaVA or llava-hf checkpoint, in LLaVA names, as stored (no dtype change).

    An `<image>` token that is the last vocabulary entry of a llava-hf checkpoint (as `to="hf"` adds it)
    is taken out of the embeddings and marked for removal from the tokenizer.
    """
    layout, config, vision_config, raw = read_checkpoint_config(path)
    state, tower_state = {}, {}
    for shard in iter_shards(path):
        llm, tower = llava_names(shard, layout)
        state.update(llm)
        tower_state.update(tower)
    check_keys(expected_shapes(config), {k: v.shape for k, v in state.items()}, path)
    tokenizer = open_tokenizer(path)
    has_sparse_config = "sparse_config" in raw
    if layout != HF:
        tower_path = resolve_vision_tower(config.mm_vision_tower, path)
        clip = load_clip(tower_path)
        return CheckpointParts(config, state, tokenizer, clip.config, clip.state_dict(),
                               load_image_processor(tower_path), has_sparse_config)
    check_tower_keys(vision_config, tower_state, path)
    parts = CheckpointParts(config, state, tokenizer, vision_config, tower_state, load_image_processor(path),
                            has_sparse_config)
    image_id = raw.get("image_token_index", raw.get("image_token_id"))
    if (image_id == config.vocab_size - 1 == len(tokenizer) - 1
            and tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN) == image_id):
        for name in _EMBEDDINGS:
            state[name] = state[name][:-1].clone()
        config.vocab_size -= 1
        parts.drop_tokens = (DEFAULT_IMAGE_TOKEN,)
    return parts


def _hf_name(name: str) -> str:
    if name.startswith("model.mm_projector."):
        index, rest = name.removeprefix("model.mm_projector.").split(".", 1)
        return f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"
    if name.startswith("model.") and not is_predictor_key(name):
        return "model.language_model." + name.removeprefix("model.")
    return name


def _llava_hf_config(parts: CheckpointParts, vocab_size: int, image_id: int) -> LlavaConfig:
    cfg = parts.config
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = parts.tower_config
    select = SELECT_FEATURE_TO_HF[cfg.mm_vision_select_feature]
    hf = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_id,
        vision_feature_layer=cfg.mm_vision_select_layer, vision_feature_select_strategy=select,
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2 + (select == "full"),
    )
    hf.architectures = ["LlavaForConditionalGeneration"]
    hf.dtype = parts.state["lm_head.weight"].dtype
    llava = cfg.to_llava_dict()
    for key in LLAVA_ONLY_KEYS:
        if key != "sparse_config" or parts.has_sparse_config:
            setattr(hf, key, llava[key])
    return hf


def write_hf_checkpoint(parts: CheckpointParts, out_dir: str | Path, max_shard_size: int | str = "5GB") -> Path:
    """Write `parts` as a llava-hf checkpoint (see the module docstring)."""
    cfg = parts.config
    if cfg.mm_projector_type != "mlp2x_gelu":
        raise UserError(f"llava-hf has no {cfg.mm_projector_type!r} projector (only mlp2x_gelu converts)")
    tokenizer = parts.tokenizer
    if DEFAULT_IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    if image_id > cfg.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {cfg.vocab_size} embeddings")
    state = dict(parts.state)
    if image_id == cfg.vocab_size:
        for name in _EMBEDDINGS:
            rows = state[name]
            state[name] = torch.cat([rows, rows.float().mean(0, keepdim=True).to(rows.dtype)])
    hf_state = {_hf_name(k): v for k, v in state.items()}
    hf_state.update({f"model.vision_tower.vision_model.{k}": v for k, v in parts.tower_state.items()})
    processor = LlavaProcessor(
        image_processor=parts.image_processor, tokenizer=tokenizer, patch_size=parts.tower_config.patch_size,
        vision_feature_select_strategy=SELECT_FEATURE_TO_HF[cfg.mm_vision_select_feature],
        image_token=DEFAULT_IMAGE_TOKEN, num_additional_image_tokens=1,
    )
    with staged_output(out_dir) as stage:
        _llava_hf_config(parts, max(cfg.vocab_size, image_id + 1), image_id).save_pretrained(stage)
        save_state_dict(hf_state, stage, max_shard_size)
        processor.save_pretrained(stage)
        parts.image_processor.save_pretrained(stage)
        save_tokenizer(tokenizer, stage)
    return Path(out_dir)


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, max_shard_size: int | str = "5GB") -> Path:
    """Convert checkpoint `src` to layout `to` ("hf" for llava-hf, "llava" for the original LLaVA) in `dst`."""
    if to not in ("hf", "llava"):
        raise UserError(f"unknown checkpoint layout {to!r} (hf, llava)")
    src_path = resolve_local(src, "checkpoint")
    if Path(dst).expanduser().resolve() == src_path:
        raise UserError(f"the destination {dst} is the source checkpoint; choose another folder")
    parts = read_checkpoint(src_path)
    if to == "hf":
        return write_hf_checkpoint(parts, dst, max_shard_size)
    return write_llava_checkpoint(parts, dst, max_shard_size)
