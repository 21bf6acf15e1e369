"""Load a LLaVA-1.5 / llava-hf / Dynamic-LLaVA checkpoint as a ready model, and save one (LLaVA layout).

`load_pretrained_model` is LLaVA's `builder.load_pretrained_model` for this package: offline, any
device, the layout recognised from the files (see `layouts` for the layouts themselves, `checkpoint_files`
for the files).
"""

from __future__ import annotations

import contextlib
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from ..cpu_features import DTYPE_CHOICES, available_memory, native_bf16
from ..errors import MissingExtra, UserError
from .checkpoint_files import (
    CheckpointParts,
    CLIPImageProcessor,
    iter_shards,
    load_image_processor,
    open_tokenizer,
    read_checkpoint_config,
    read_json,
    read_state_file,
    resolve_local,
    resolve_vision_tower,
    weight_files,
    write_llava_checkpoint,
)
from .config import DynamicLlavaConfig
from .layouts import (
    HF,
    LLAVA,
    StateDict,
    check_keys,
    check_tower_keys,
    clip_vision_names,
    expected_shapes,
    is_predictor_key,
    llava_names,
)
from .llava import DynamicLlavaForCausalLM
from .policy import SparsityOptions
from .vision import CLIPVisionTower

__all__ = ["load_base_llm", "load_pretrained_model", "save_pretrained_llava"]

# ----------------------------------------------------------------------------- dtype, memory, tokenizer, processor
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, saved: str | None) -> torch.dtype:
    """"auto": on CPU bfloat16 where it is native (AMX / AVX512-BF16, about 5x float32 there and half the
    memory), else float32 (emulated bf16 is slower than float32); on CUDA float16, or bfloat16 for bf16
    checkpoints on GPUs that support it; float16 on MPS. None (the Python default): the same, except float32 on
    every CPU (exact: the reference for parity with transformers)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and dtype != "auto":
        if str(dtype) not in _DTYPES:
            raise UserError(f"unknown dtype {dtype!r} ({', '.join(DTYPE_CHOICES)})")
        return _DTYPES[str(dtype)]
    if device.type == "cuda":
        bf16 = str(saved).removeprefix("torch.") == "bfloat16" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if dtype == "auto" and native_bf16() else torch.float32


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.1f} GB"


def memory_shortfall(n_params: int, reading_bytes: int, dtype: torch.dtype, available: int) -> str | None:
    """None when `n_params` weights in `dtype`, plus `reading_bytes` held while a weight file is read, fit in
    `available` bytes; else the message saying so, naming bfloat16 when that would fit."""
    def need(d: torch.dtype) -> int:
        return n_params * d.itemsize + reading_bytes

    if need(dtype) <= available:
        return None
    name = str(dtype).removeprefix("torch.")
    reading = f" + {_gb(reading_bytes)} to read the largest .bin weight file" if reading_bytes else ""
    text = (f"the model does not fit in memory: {n_params / 1e9:.2f} B parameters need about {_gb(need(dtype))} "
            f"in {name}{reading}, and {_gb(available)} is available")
    if torch.bfloat16.itemsize < dtype.itemsize and need(torch.bfloat16) <= available:
        slower = "" if native_bf16() else " (slower than float32 on this CPU, which has no native bf16)"
        return f"{text}; in bfloat16 it needs about {_gb(need(torch.bfloat16))}: pass --dtype bfloat16{slower}"
    return f"{text}; free memory or use a machine with more"


def check_fits_memory(config: DynamicLlavaConfig, weights_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse (UserError) a CPU load whose weights cannot fit the available memory, before anything is allocated.

    Counts the language model, projector and predictors (the CLIP tower, ~0.3 B for LLaVA-1.5, and the
    activations come on top) and the largest .bin file in torch's pre-zip format, which torch.load reads
    whole (safetensors and zip-format .bin files are memory-mapped)."""
    available = available_memory()
    if device.type != "cpu" or available is None:
        return
    n_params = sum(shape.numel() for shape in expected_shapes(config).values())
    reading = max((f.stat().st_size for f in weight_files(weights_dir)
                   if f.suffix == ".bin" and not zipfile.is_zipfile(f)), default=0)
    message = memory_shortfall(n_params, reading, dtype, available)
    if message:
        raise UserError(f"{weights_dir}: {message}")


def load_tokenizer(path: Path, config: DynamicLlavaConfig) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer set up for LLaVA: padding side from the config, pad = unk when unset."""
    tokenizer = open_tokenizer(path)
    tokenizer.padding_side = config.tokenizer_padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


# ----------------------------------------------------------------------------- CLIP tower
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
        state.update(clip_vision_names(shard))
    return build_clip(config, state, path, device, dtype)


# ----------------------------------------------------------------------------- loading
class _WeightLoader:
    """Copies named tensors into a model's parameters, remembering what arrived."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = model.state_dict()
        self.found: dict[str, torch.Size] = {}

    @torch.no_grad()
    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            self.found[name] = tensor.shape
            target = self.params.get(name)
            if target is not None and target.shape == tensor.shape:
                target.copy_(tensor)


def _attach_tower(model: DynamicLlavaForCausalLM, clip: CLIPVisionModel) -> None:
    cfg = model.config
    model.model.vision_tower = CLIPVisionTower(clip, cfg.mm_vision_select_layer, cfg.mm_vision_select_feature)


def _lora_trainables(path: Path) -> StateDict:
    """`non_lora_trainables.bin` with LLaVA's PEFT prefixes removed."""
    file = path / "non_lora_trainables.bin"
    if not file.is_file():
        return {}
    state = {k.removeprefix("base_model."): v for k, v in read_state_file(file).items()}
    if any(k.startswith("model.model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def _merge_lora(model: DynamicLlavaForCausalLM, path: Path) -> DynamicLlavaForCausalLM:
    try:
        from peft import PeftModel
    except ImportError:
        raise MissingExtra("peft", needed_by=f"{path} is a LoRA checkpoint; merging it") from None
    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()


@dataclass
class _Checkpoint:
    """A folder to load: its layout and configs and, for a LoRA or projector-only folder, the base LLM."""

    path: Path
    base: Path | None
    layout: str
    config: DynamicLlavaConfig
    vision_config: CLIPVisionConfig | None  # llava-hf folders only
    saved_dtype: str | None  # config.json's torch_dtype
    is_lora: bool

    @property
    def llm_dir(self) -> Path:
        """The folder with the LLM's weights and tokenizer."""
        return self.base or self.path


def _read_checkpoint(model_path: str | Path, model_base: str | Path | None) -> _Checkpoint:
    path = resolve_local(model_path, "checkpoint")
    base = resolve_local(model_base, "base model") if model_base is not None else None
    layout, config, vision_config, raw = read_checkpoint_config(path)
    return _Checkpoint(path, base, layout, config, vision_config, raw.get("torch_dtype", raw.get("dtype")),
                       is_lora=(path / "adapter_config.json").is_file())


def _check_base(ckpt: _Checkpoint) -> None:
    """A base LLM is given exactly when the folder needs one (LoRA) or can take one (projector only)."""
    path, base = ckpt.path, ckpt.base
    if ckpt.is_lora and base is None:
        raise UserError(f"{path} is a LoRA checkpoint (adapter_config.json); pass its base LLM as model_base")
    if base is not None and not ckpt.is_lora and not (path / "mm_projector.bin").is_file():
        raise UserError(f"model_base was given but {path} has neither adapter_config.json (LoRA) "
                        "nor mm_projector.bin (projector only)")
    if ckpt.layout == HF and base is not None:
        raise UserError(f"{path} is a llava-hf checkpoint; model_base applies to LLaVA-layout folders only")


def _empty_model(ckpt: _Checkpoint, dtype: torch.dtype, device: torch.device,
                 devices: Sequence[str | torch.device] | None) -> DynamicLlavaForCausalLM:
    """The model, uninitialised, on `device` or split over `devices` (never whole on one of them)."""
    check_fits_memory(ckpt.config, ckpt.llm_dir, dtype, device)
    with empty_init(torch.device("meta") if devices else device, dtype):
        model = DynamicLlavaForCausalLM(ckpt.config)
    if devices:
        model.place_layers(devices)  # materialised part by part on its device, uninitialised until loaded
    return model


def _load_weights(model: DynamicLlavaForCausalLM, ckpt: _Checkpoint) -> tuple[StateDict, bool]:
    """Copy the checkpoint's weights into `model` (LoRA trainables or the projector over a base's; a UserError
    when any but the predictors are missing): the CLIP tower's weights found on the way (llava-hf folders hold
    them), and whether the checkpoint has predictor weights."""
    loader = _WeightLoader(model)
    tower_state: StateDict = {}
    for shard in iter_shards(ckpt.llm_dir):
        llm, tower = llava_names(shard, LLAVA if ckpt.base else ckpt.layout)
        loader.load(llm)
        tower_state.update(tower)
    if ckpt.base is not None:
        extra = _lora_trainables(ckpt.path) if ckpt.is_lora else read_state_file(ckpt.path / "mm_projector.bin")
        loader.load(extra)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    return tower_state, check_keys(expected, loader.found, ckpt.llm_dir)


def _init_missing_predictors(model: DynamicLlavaForCausalLM, path: Path, sparse: bool | None) -> None:
    model.reinit_predictors()
    if sparse is not False:  # a dense load never runs them: nothing to warn about
        warnings.warn(f"{path} has no Dynamic-LLaVA predictor weights: they are freshly initialised "
                      "(the starting point for sparsification training; use sparse=False for dense LLaVA-1.5)",
                      stacklevel=3)  # at load_pretrained_model's caller


def _attach_vision(model: DynamicLlavaForCausalLM, ckpt: _Checkpoint, tower_state: StateDict, own_tower: bool,
                   device: torch.device, dtype: torch.dtype) -> CLIPImageProcessor:
    """Give `model` its CLIP tower: the llava-hf folder's own (`own_tower`), else `mm_vision_tower`'s; the
    image processor beside it."""
    if own_tower:
        _attach_tower(model, build_clip(ckpt.vision_config, tower_state, ckpt.path, device, dtype))
        return load_image_processor(ckpt.path)
    tower_path = resolve_vision_tower(ckpt.config.mm_vision_tower, ckpt.path)
    _attach_tower(model, load_clip(tower_path, device, dtype))
    return load_image_processor(tower_path)


def _set_sparsity(model: DynamicLlavaForCausalLM, path: Path, sparse: bool | None, overrides: dict[str, Any]) -> None:
    model.sparsity_options = SparsityOptions.from_overrides(sparse, **overrides)
    if model.sparse.use_instruct_predictor and model.sparsity_options.sparse:
        warnings.warn(f"{path} was trained with the instruction predictor (sparse_config use_instruct_predictor: "
                      "true, the paper's ablation), which this implementation does not run: every instruction "
                      "token is kept, so answers can differ from the reference's",
                      stacklevel=3)  # at load_pretrained_model's caller


def _context_length(config: DynamicLlavaConfig) -> int:
    return int(getattr(config, "max_sequence_length", None) or config.max_position_embeddings or 2048)


def load_pretrained_model(
    model_path: str | Path,
    model_base: str | Path | None = None,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    sparse: bool | None = None,
    *,
    vision_tower: str | Path | None = None,
    devices: Sequence[str | torch.device] | None = None,
    **sparse_overrides: Any,
) -> tuple[PreTrainedTokenizerBase, DynamicLlavaForCausalLM, CLIPImageProcessor, int]:
    """Load a checkpoint like LLaVA's `builder.load_pretrained_model`: (tokenizer, model, image processor,
    context length). The layout is recognised from the files (`model_name` is accepted for LLaVA call
    compatibility only): LLaVA / Dynamic-LLaVA / llava-hf folders; with `model_base`, a LoRA folder
    (`adapter_config.json`) or a projector-only folder (`mm_projector.bin`) over a base LLM.

    `dtype`: a torch dtype, a name, "auto" (the commands' default) or None (float32 on CPU), see `resolve_dtype`;
    a CPU load that cannot fit the available memory is refused with a message naming the dtype that would.
    `sparse=False` makes the model dense; other `sparse_overrides` (e.g. `vision_keep_rate=0.3`) are
    `SparsityOptions` fields: together the model's `sparsity_options`, which `make_policy(model)` uses.
    `vision_tower` replaces `mm_vision_tower` (a path or a cached Hub id).
    `devices` (e.g. ["cuda:0", "cuda:1"]) splits the decoder's layers over several devices, a model larger
    than one GPU (`DynamicLlavaForCausalLM.place_layers`; `device` is then ignored): each part is built
    directly on its device, never whole on one.
    """
    del model_name
    if devices is not None and len(devices) == 0:
        raise UserError("devices must name at least one device")
    device = torch.device(devices[0] if devices else device)
    ckpt = _read_checkpoint(model_path, model_base)
    torch_dtype = resolve_dtype(dtype, device, ckpt.saved_dtype)
    _check_base(ckpt)
    if vision_tower is not None:
        ckpt.config.mm_vision_tower = str(resolve_vision_tower(str(vision_tower)))
    ckpt.config._name_or_path = str(ckpt.path)

    model = _empty_model(ckpt, torch_dtype, device, devices)
    tower_state, has_predictors = _load_weights(model, ckpt)
    if not has_predictors:
        _init_missing_predictors(model, ckpt.path, sparse)
    if ckpt.is_lora:
        model = _merge_lora(model, ckpt.path)
    own_tower = ckpt.layout == HF and vision_tower is None
    image_processor = _attach_vision(model, ckpt, tower_state, own_tower, device, torch_dtype)
    tokenizer = load_tokenizer(ckpt.llm_dir, ckpt.config)
    _set_sparsity(model, ckpt.path, sparse, sparse_overrides)
    model.eval()
    return tokenizer, model, image_processor, _context_length(ckpt.config)


_BASE_LLM_TYPES = ("llama", "mistral")


def load_base_llm(llm_path: str | Path, vision_tower: str, device: str | torch.device = "cpu",
                  dtype: torch.dtype | str | None = None, **mm_config: Any
                  ) -> tuple[PreTrainedTokenizerBase, DynamicLlavaForCausalLM, CLIPImageProcessor]:
    """A plain LLaMA-family LLM (e.g. Vicuna) plus a CLIP tower as an untrained LLaVA, the start of stage-1
    pre-training: LLM weights loaded, projector and predictors freshly initialised. `mm_config` sets
    LLaVA config keys (`mm_projector_type`, `mm_vision_select_layer`, `sparse_config`, ...)."""
    device = torch.device(device)
    path = resolve_local(llm_path, "base LLM")
    raw = read_json(path / "config.json")
    if raw.get("model_type") not in _BASE_LLM_TYPES:
        raise UserError(f"{path}: model_type {raw.get('model_type')!r} is not a plain LLaMA-family LLM "
                        f"({', '.join(_BASE_LLM_TYPES)}); LLaVA checkpoints are loaded with load_pretrained_model")
    tower_path = resolve_vision_tower(vision_tower)
    clip = load_clip(tower_path, device, torch.float32)
    llm_keys = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "auto_map")}
    tower_name = str(tower_path) if Path(vision_tower).expanduser().is_dir() else vision_tower
    config = DynamicLlavaConfig(**{**llm_keys, **mm_config, "mm_vision_tower": tower_name,
                                   "mm_hidden_size": clip.config.hidden_size})
    config._name_or_path = str(path)
    torch_dtype = resolve_dtype(dtype, device, raw.get("torch_dtype", raw.get("dtype")))
    check_fits_memory(config, path, torch_dtype, device)
    with empty_init(device, torch_dtype):
        model = DynamicLlavaForCausalLM(config)
    loader = _WeightLoader(model)
    for shard in iter_shards(path):
        loader.load(shard)
    fresh = ("model.mm_projector.", "model.vision_tower.")
    missing = [k for k in model.state_dict() if not k.startswith(fresh) and not is_predictor_key(k)
               and k not in loader.found]
    if missing:
        raise UserError(f"{path} lacks LLM weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.model.mm_projector.apply(model._init_weights)
    model.reinit_predictors()
    _attach_tower(model, clip.to(torch_dtype))
    return load_tokenizer(path, config), model, load_image_processor(tower_path)


def save_pretrained_llava(model: DynamicLlavaForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path,
                          max_shard_size: int | str = "5GB", *, predictors: bool = True,
                          image_processor: CLIPImageProcessor | None = None) -> Path:
    """Save in the original LLaVA-1.5 layout: config.json, safetensors weights without the vision tower
    (sharded with an index above `max_shard_size`), tokenizer files.

    `predictors=False` leaves out the predictor weights and `sparse_config` (a plain LLaVA-1.5 checkpoint).
    A tower living inside the checkpoint (a relative `mm_vision_tower` that is not a cached Hub id, e.g.
    `vision_tower` after loading a llava-hf checkpoint) is written there too, with `image_processor`
    (CLIP's settings at the tower's image size if None). Files are staged next to `out_dir` first.
    """
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
    if not predictors:
        state = {k: v for k, v in state.items() if not is_predictor_key(k)}
    parts = CheckpointParts(model.config, state, tokenizer, None, {}, image_processor, has_sparse_config=predictors)
    if model.model.vision_tower is not None:
        clip = model.model.vision_tower.vision_tower
        size = clip.config.image_size
        parts.tower_config, parts.tower_state = clip.config, clip.state_dict()
        parts.image_processor = image_processor or CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return write_llava_checkpoint(parts, out_dir, max_shard_size)
