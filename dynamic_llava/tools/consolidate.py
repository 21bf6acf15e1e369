"""LLaVA's `consolidate`: rewrite a checkpoint that DeepSpeed saved with the frozen vision tower inside.

    python -m dynamic_llava.tools.consolidate --src CKPT --dst OUT

Training with DeepSpeed saves `model.vision_tower.vision_tower.*` (and, with old transformers, RoPE
`inv_freq` buffers) into the LLM shards. The output holds the same config.json and tokenizer and only
the weights of the LLaVA layout (LLM, projector, predictors), in safetensors, one shard per source shard.
A checkpoint with nothing to strip is rewritten unchanged in content.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import UserError, run_command
from ..model.checkpoint_files import (
    iter_shards,
    open_tokenizer,
    output_dir,
    read_checkpoint_config,
    resolve_local,
    write_streamed_checkpoint,
)
from ..model.layouts import HF, LLAVA, StateDict, llava_names


def _llava_shards(src: Path) -> Iterator[StateDict]:
    for shard in iter_shards(src):
        yield llava_names(shard, LLAVA)[0]
        del shard  # not held while the next shard is read


def consolidate(src: str | Path, dst: str | Path) -> Path:
    """Write checkpoint `src` without its vision-tower weights to `dst`; return `dst`."""
    src_path = resolve_local(src, "checkpoint")
    out = output_dir(str(dst), src_path)
    layout, config, _, raw = read_checkpoint_config(src_path)
    if layout == HF:
        raise UserError(f"{src_path} is a llava-hf checkpoint (its tower belongs inside); "
                        "use `dynamic-llava convert --to llava` for the LLaVA layout")
    write_streamed_checkpoint(out, _llava_shards(src_path), raw, config, open_tokenizer(src_path), src_path)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.tools.consolidate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="checkpoint folder saved by training")
    parser.add_argument("--dst", required=True, help="output folder")
    return parser


def _run(args: argparse.Namespace) -> int:
    out = consolidate(args.src, args.dst)
    print(f"consolidated checkpoint written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
