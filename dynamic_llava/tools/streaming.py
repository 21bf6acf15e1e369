"""Checkpoint weights a shard at a time, for tools that rewrite 7B/13B checkpoints on a CPU machine.

`LazyWeights` reads single tensors by name without loading whole shards (safetensors and zip `.bin`
files are memory-mapped); `write_streamed_checkpoint` writes a LLaVA-layout checkpoint from an iterable
of state-dict pieces, so at most one piece is in memory. Finding and reading files goes through
`model.convert`; this module only adds the lazy and the piecewise variants.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from ..errors import UserError
from ..model.config import DynamicLlavaConfig
from ..model.convert import (
    StateDict,
    check_keys,
    expected_shapes,
    read_state_file,
    save_tokenizer,
    staged_output,
    weight_files,
)


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
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError):
        # pre-zip `.bin` files cannot be memory-mapped: read them whole (or report them corrupt)
        state = read_state_file(file)
    return state.__getitem__, state.keys()


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
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.shapes


def write_streamed_checkpoint(out_dir: Path, pieces: Iterable[StateDict], raw_config: Mapping[str, Any],
                              config: DynamicLlavaConfig, tokenizer: PreTrainedTokenizerBase, source: Path) -> None:
    """A LLaVA-layout checkpoint (`raw_config` as config.json, safetensors weights, tokenizer) in `out_dir`.

    Each piece becomes one shard. The weights are checked against `config` before anything is committed,
    so a checkpoint that would not load (named after `source` in the error) is never written.
    """
    with staged_output(out_dir) as stage:
        writer = _ShardWriter(stage)
        for piece in pieces:
            writer.write(piece)
            del piece  # not held while the next piece is made
        check_keys(expected_shapes(config), writer.finish(), source)
        (stage / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
        save_tokenizer(tokenizer, stage)


def output_dir(name: str, *inputs: Path) -> Path:
    """The output folder `name`, refused when it is one of the input folders (it would be overwritten
    while being read)."""
    out = Path(name).expanduser().resolve()
    if out in inputs:
        raise UserError(f"the output folder {name} is an input folder; choose another folder")
    return out

