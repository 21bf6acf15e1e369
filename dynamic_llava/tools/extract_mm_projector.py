"""LLaVA's `extract_mm_projector`: the `model.mm_projector.*` weights of a checkpoint as one torch file.

    python -m dynamic_llava.tools.extract_mm_projector --model-path CKPT --output mm_projector.bin

The output is what stage-2 training takes as `--pretrain_mm_mlp_adapter`. Only the projector tensors
are read from the (sharded or single, safetensors or `.bin`) weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError, run_command
from ..model.checkpoint_files import LazyWeights, resolve_local, save_torch_state
from ..model.layouts import StateDict

PROJECTOR_PREFIX = "model.mm_projector."


def extract_mm_projector(model_path: str | Path, output: str | Path) -> StateDict:
    """Write the projector weights of checkpoint `model_path` to `output` (torch.save); return them."""
    path = resolve_local(model_path, "checkpoint")
    out = Path(output).expanduser()
    if out.is_dir():
        raise UserError(f"--output {out} is a folder; give a file name such as {out / 'mm_projector.bin'}")
    weights = LazyWeights(path)
    # clone: a tensor memory-mapped from a `.bin` may be a view whose whole storage torch.save would write
    projector = {name: weights.get(name).clone() for name in weights.names() if name.startswith(PROJECTOR_PREFIX)}
    if not projector:
        raise UserError(f"{path} has no {PROJECTOR_PREFIX}* weights (is it a LLaVA-layout checkpoint?)")
    save_torch_state(projector, out)
    return projector


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.tools.extract_mm_projector",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # `--model_name_or_path` is the spelling of LLaVA's first README
    parser.add_argument("--model-path", "--model_name_or_path", dest="model_path", required=True,
                        help="checkpoint folder (or a Hub id in the local cache)")
    parser.add_argument("--output", required=True, help="file to write, e.g. ./checkpoints/mm_projector.bin")
    return parser


def _run(args: argparse.Namespace) -> int:
    projector = extract_mm_projector(args.model_path, args.output)
    print(f"{len(projector)} projector tensors written to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
