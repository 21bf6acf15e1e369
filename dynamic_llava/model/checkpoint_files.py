"""Checkpoint files: finding them (local folders, the local HF cache), reading and writing them.

Nothing is downloaded: whatever is missing is a `UserError` saying how to supply it. Every writer of
checkpoint folders goes through here: `write_llava_checkpoint` (the LLaVA layout: `save_pretrained_llava`,
training saves, conversion, the demo export, the tiny factory), `write_streamed_checkpoint` (one shard at
a time: the tools that rewrite 7B/13B checkpoints), `save_torch_state` (LLaVA's `mm_projector.bin` and
`non_lora_trainables.bin`). What the names and configs of a layout are is `layouts`'.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict, snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerBase

from ..errors import UserError
from .config import DynamicLlavaConfig
from .layouts import HF, StateDict, check_keys, checkpoint_layout, config_from_hf, expected_shapes, llava_config_json

try:  # transformers >= 5 names the PIL (torchvision-free) processor explicitly
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:
    from transformers import CLIPImageProcessor

_WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                 ("pytorch_model.bin.index.json", "pytorch_model.bin"))
_STALE_WEIGHTS = re.compile(r"^(model.*\.safetensors|pytorch_model.*\.bin)(\.index\.json)?$")


# ----------------------------------------------------------------------------- finding
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


def tower_travels_with_checkpoint(name: str) -> bool:
    """A relative `mm_vision_tower` that is not a cached Hub id names a folder inside the checkpoint."""
    path = Path(name).expanduser()
    return not path.is_absolute() and ".." not in path.parts and _cached_snapshot(name) is None


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


def output_dir(name: str, *inputs: Path) -> Path:
    """The output folder `name`, refused when it is one of the input folders (it would be overwritten
    while being read)."""
    out = Path(name).expanduser().resolve()
    if out in inputs:
        raise UserError(f"the output folder {name} is an input folder; choose another folder")
    return out


# ----------------------------------------------------------------------------- reading
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


class LazyWeights:
    """The tensors of a checkpoint folder by name, each read from disk only when asked for."""

    def __init__(self, path: Path) -> None:
        self._readers: dict[str, Callable[[str], torch.Tensor]] = {}
        for file in weight_files(path):
            read, names = _open_weight_file(file)
            self._readers.update(dict.fromkeys(names, read))

    def names(self) -> list[str]:
        return list(self._readers)

    def get(self, name: str) -> torch.Tensor | None:
        read = self._readers.get(name)
        return None if read is None else read(name)


def _open_weight_file(file: Path) -> tuple[Callable[[str], torch.Tensor], Iterable[str]]:
    if file.suffix == ".safetensors":
        try:
            handle = safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read weights from {file}: {err}") from None
        return handle.get_tensor, handle.keys()
    state = read_state_file(file)  # memory-mapped unless pre-zip
    return state.__getitem__, state.keys()


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


def require_dynamic_llava_checkpoint(folder: Path) -> None:
    """Refuse a folder that is not a Dynamic-LLaVA checkpoint: no or malformed config.json, or no sparse_config
    (a dense LLaVA loads with freshly drawn predictors, whose decisions mean nothing)."""
    if "sparse_config" not in read_json(folder / "config.json"):
        raise UserError(f"{folder} is not a Dynamic-LLaVA checkpoint (no sparse_config: a dense LLaVA?)")


def read_checkpoint_config(path: Path) -> tuple[str, DynamicLlavaConfig, CLIPVisionConfig | None, dict[str, Any]]:
    """(layout, config, tower config for hf checkpoints, raw config.json) of a checkpoint folder."""
    raw = read_json(path / "config.json")
    layout = checkpoint_layout(raw, path)
    if layout == HF:
        return (layout, *config_from_hf(raw), raw)
    return layout, DynamicLlavaConfig(**raw), None, raw


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


# ----------------------------------------------------------------------------- writing
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


def write_json(file: Path, data: Mapping[str, Any]) -> None:
    """A config file as the checkpoints hold them (indent 2, final newline)."""
    file.write_text(json.dumps(data, indent=2) + "\n")


def save_state_dict(state: StateDict, out: Path, max_shard_size: int | str = "5GB") -> None:
    """safetensors weights, sharded with `model.safetensors.index.json` when larger than `max_shard_size`."""
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})


def save_torch_state(state: StateDict, file: Path) -> None:
    """A torch `.bin` file (`mm_projector.bin`, `non_lora_trainables.bin`) as LLaVA's `torch.save` writes it,
    written under its own name in a folder beside `file` (torch names the archive inside after the file),
    then moved into place: never a half-written `file`."""
    file.parent.mkdir(parents=True, exist_ok=True)
    stage = file.parent / f".{file.name}.{uuid.uuid4().hex[:8]}.tmp"
    stage.mkdir()
    try:
        torch.save(state, stage / file.name)
        (stage / file.name).replace(file)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class _ShardWriter:
    """safetensors shards written one at a time, named and indexed like `save_state_dict` names them."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.parts: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.shapes: dict[str, torch.Size] = {}
        self.total_size = 0

    def write(self, state: Mapping[str, torch.Tensor]) -> None:
        if not state:
            return
        repeated = sorted(self.shapes.keys() & state.keys())
        if repeated:
            raise UserError(f"weight {repeated[0]} appears in two shards")
        # Final names depend on the number of (non-empty) shards, known only at the end.
        part = self.out / f".part{len(self.parts)}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, part, metadata={"format": "pt"})
        for name, tensor in state.items():
            self.weight_map[name] = len(self.parts)
            self.shapes[name] = tensor.shape
            self.total_size += tensor.numel() * tensor.element_size()
        self.parts.append(part)

    def finish(self) -> dict[str, torch.Size]:
        count = len(self.parts)
        if count == 0:
            raise UserError("no weights to write")
        names = (["model.safetensors"] if count == 1 else
                 [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        for part, name in zip(self.parts, names):
            part.rename(self.out / name)
        if count > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
            write_json(self.out / "model.safetensors.index.json", index)
        return self.shapes


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


@dataclass
class CheckpointParts:
    """Everything a checkpoint holds, in LLaVA names, independent of the on-disk layout."""

    config: DynamicLlavaConfig
    state: StateDict  # LLM, projector and (optionally) predictors, without the tower
    tokenizer: PreTrainedTokenizerBase | None  # None: no tokenizer files (a Trainer without one)
    tower_config: CLIPVisionConfig | None  # None: the tower is only referenced by `mm_vision_tower`
    tower_state: StateDict  # CLIPVisionModel names
    image_processor: CLIPImageProcessor | None
    has_sparse_config: bool = True
    drop_tokens: tuple[str, ...] = ()  # added tokens to remove from the saved tokenizer


def write_llava_config(out: Path, config: DynamicLlavaConfig, sparse: bool, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the LLaVA layout (`layouts.llava_config_json`) in folder `out`; returns its contents."""
    raw = llava_config_json(config, sparse, dtype)
    write_json(out / "config.json", raw)
    return raw


def write_llava_checkpoint(parts: CheckpointParts, out_dir: str | Path, max_shard_size: int | str = "5GB",
                           dtype: torch.dtype | None = None) -> Path:
    """Write `parts` in the original LLaVA-1.5 layout: config.json, safetensors weights without the vision
    tower (sharded with an index above `max_shard_size`), tokenizer files, and the tower folder when
    `mm_vision_tower` names one inside the checkpoint. Staged next to `out_dir` (see `staged_output`).

    `dtype` is config.json's `torch_dtype` (default: that of the `lm_head` weights).
    """
    dtype = parts.state["lm_head.weight"].dtype if dtype is None else dtype
    with staged_output(out_dir) as stage:
        config = write_llava_config(stage, parts.config, parts.has_sparse_config, dtype)
        save_state_dict(parts.state, stage, max_shard_size)
        if parts.tokenizer is not None:
            save_tokenizer(parts.tokenizer, stage, parts.drop_tokens)
        if tower_travels_with_checkpoint(config["mm_vision_tower"]):
            if parts.tower_config is None:
                raise UserError(f"mm_vision_tower {config['mm_vision_tower']!r} is a folder inside the checkpoint, "
                                "but no vision tower is attached to the model to write there")
            save_clip_tower(parts.tower_config, parts.tower_state, parts.image_processor,
                            stage / config["mm_vision_tower"])
    return Path(out_dir)


def write_streamed_checkpoint(out_dir: Path, pieces: Iterable[StateDict], raw_config: Mapping[str, Any],
                              config: DynamicLlavaConfig, tokenizer: PreTrainedTokenizerBase, source: Path) -> None:
    """A LLaVA-layout checkpoint (`raw_config` as config.json, safetensors weights, tokenizer) in `out_dir`,
    each of `pieces` one shard, so that at most one piece is in memory.

    The weights are checked against `config` before anything is committed, so a checkpoint that would not
    load (named after `source` in the error) is never written.
    """
    with staged_output(out_dir) as stage:
        writer = _ShardWriter(stage)
        for piece in pieces:
            writer.write(piece)
            del piece  # not held while the next piece is made
        check_keys(expected_shapes(config), writer.finish(), source)
        write_json(stage / "config.json", raw_config)
        save_tokenizer(tokenizer, stage)
