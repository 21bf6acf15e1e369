"""LLaVA's `apply_delta`: released delta weights + the original LLaMA weights -> the LLaVA checkpoint.

    python -m dynamic_llava.tools.apply_delta --base-model-path LLAMA --target-model-path OUT --delta-path DELTA

(`--base`, `--target`, `--delta` also work, as in LLaVA's README.) For every tensor of the delta that the
base also has, target = delta + base; `embed_tokens` / `lm_head` may have more rows in the delta (added
tokens), which are kept as they are. Tensors only in the delta (the projector) are copied. The output is a
LLaVA-layout checkpoint with the delta's config.json and tokenizer. It is written one delta shard at a
time while base tensors are read by name (memory-mapped), so memory stays near one delta shard, not two
whole models as in LLaVA.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import UserError, run_command
from ..model.checkpoint_files import (
    LazyWeights,
    iter_shards,
    open_tokenizer,
    output_dir,
    read_checkpoint_config,
    resolve_local,
    write_streamed_checkpoint,
)
from ..model.layouts import HF, LLAVA, StateDict, llava_names

# Deltas may add tokens (e.g. <im_start>, <im_end>): these two grow rows beyond the base vocabulary.
_VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def add_base(name: str, delta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """delta + base in the delta's dtype (summed in float32), over the base's rows for the vocabulary rows."""
    if base.shape == delta.shape:
        return (delta.float() + base.float()).to(delta.dtype)
    if not (name in _VOCAB_ROWS and base.dim() == 2 and base.shape[1] == delta.shape[1]
            and base.shape[0] <= delta.shape[0]):
        raise UserError(f"{name}: the delta's shape {tuple(delta.shape)} does not fit the base's {tuple(base.shape)} "
                        "(is this the base model the delta was made from?)")
    target = delta.float()  # may be `delta` itself (float32): it is not needed after this
    target[: base.shape[0]] += base.float()
    return target.to(delta.dtype)


def _target_shards(delta_path: Path, base: LazyWeights) -> Iterator[StateDict]:
    added = 0
    for shard in iter_shards(delta_path):
        deltas, _ = llava_names(shard, LLAVA)  # drops a tower DeepSpeed may have saved inside
        del shard  # `deltas` alone holds the tensors: each is freed once its sum is made
        target = {}
        while deltas:
            name, delta = deltas.popitem()
            base_tensor = base.get(name)
            if base_tensor is None:
                target[name] = delta
            else:
                target[name] = add_base(name, delta, base_tensor)
                added += 1
        yield target
        del target  # not held while the next shard is read
    if not added:
        raise UserError(f"the delta {delta_path} shares no weight name with the base model; "
                        "--base-model-path must be the original LLaMA checkpoint")


def apply_delta(base_model_path: str | Path, target_model_path: str | Path, delta_path: str | Path) -> Path:
    """Write base + delta to `target_model_path` (see the module docstring); return that folder."""
    base_path = resolve_local(base_model_path, "base model")
    delta = resolve_local(delta_path, "delta")
    out = output_dir(str(target_model_path), base_path, delta)
    layout, config, _, raw = read_checkpoint_config(delta)
    if layout == HF:
        raise UserError(f"{delta} is a llava-hf checkpoint; LLaVA deltas are in the original LLaVA layout")
    tokenizer = open_tokenizer(delta)
    base = LazyWeights(base_path)
    write_streamed_checkpoint(out, _target_shards(delta, base), raw, config, tokenizer, delta)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.tools.apply_delta", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model-path", required=True, help="the original LLaMA weights (HF folder)")
    parser.add_argument("--target-model-path", required=True, help="output folder for the LLaVA checkpoint")
    parser.add_argument("--delta-path", required=True, help="the LLaVA delta checkpoint folder")
    return parser


def _run(args: argparse.Namespace) -> int:
    out = apply_delta(args.base_model_path, args.target_model_path, args.delta_path)
    print(f"LLaVA checkpoint (base + delta) written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
