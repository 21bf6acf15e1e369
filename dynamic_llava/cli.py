"""`dynamic-llava <command>`: ask, make-tiny, convert, train, bench, data, demo. Bad input: one message, exit code 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError, run_command


class _LazyParser(argparse.ArgumentParser):
    """A subcommand's parser that imports its module (`add_arguments(parser)`, `run(args)`) only when chosen.

    So `dynamic-llava ask` loads no benchmark, demo or training code, and the top-level `--help` lists every
    subcommand from its help string alone.
    """

    def __init__(self, *args: Any, module: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._module = module  # relative to this package; None: arguments added by build_parser itself

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if self._module is not None:  # argparse parses a chosen subcommand through this method
            command = importlib.import_module(self._module, __package__)
            self._module = None
            command.add_arguments(self)
            self.set_defaults(handler=command.run)
        return super().parse_known_args(args, namespace)


def _make_tiny(args: argparse.Namespace) -> int:
    from .tiny.checkpoint import make_tiny_checkpoint

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty")
    path = make_tiny_checkpoint(out, fmt=args.format, predictors=not args.no_predictors, seed=args.seed)
    print(f"tiny {args.format} checkpoint written to {path}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .model.convert import convert_checkpoint

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()):
        raise UserError(f"{dst} exists and is not empty")
    convert_checkpoint(args.src, dst, to=args.to)
    print(f"converted {args.src} -> {dst} ({args.to} layout)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.train import train

    trainer = train(args.flags, sparse=args.mode == "sparse")
    print(f"trained model written to {trainer.args.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamic-llava", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_LazyParser)

    # ask, bench, data, demo: the module named by `module` is imported only when its subcommand is chosen
    commands.add_parser("ask", help="answer a question about image(s), with sparsification stats", module=".ask")

    p = commands.add_parser("make-tiny", help="write a small random checkpoint in a real on-disk layout")
    p.add_argument("out")
    p.add_argument("--format", choices=["llava", "hf", "llm"], default="llava",
                   help="llm: a plain LLaMA (stage-1 pre-training start) with a CLIP tower in out/vision_tower")
    p.add_argument("--no-predictors", action="store_true", help="plain LLaVA-1.5 (no predictor weights)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_make_tiny)

    p = commands.add_parser("convert", help="convert a checkpoint between the LLaVA and llava-hf layouts")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=["hf", "llava"], required=True)
    p.set_defaults(handler=_convert)

    p = commands.add_parser("train", help="train: `sparse` = Dynamic-LLaVA sparsification (train_sparse), "
                            "`llava` = the LLaVA stages (train_mem); the flags are the seeds' (--help lists them)",
                            add_help=False)
    p.add_argument("mode", choices=["sparse", "llava"])
    p.add_argument("flags", nargs=argparse.REMAINDER)
    p.set_defaults(handler=_train)

    bench = commands.add_parser("bench", help="efficiency benchmarks").add_subparsers(dest="bench", required=True)
    bench.add_parser("prefill", help="prefill / decode latency and KV bytes: ours dense, sparse, transformers",
                     module=".bench.prefill")
    bench.add_parser("flops", help="prefill FLOPs: the paper's formula and an exact count (dense, sparse, FastV)",
                     module=".bench.flops")
    bench.add_parser("decode", help="decoding latency and KV bytes vs output length, with and without cache",
                     module=".bench.decode")
    bench.add_parser("train", help="training-step time and peak memory: dense vs masked-softmax (ours, naive)",
                     module=".bench.train_step")

    data = commands.add_parser("data", help="datasets").add_subparsers(dest="data", required=True)
    data.add_parser("synth", help="the synthetic shapes benchmark: LLaVA training JSON and evaluation files",
                    module=".data.synth")

    demo = commands.add_parser("demo", help="end-to-end demonstrations").add_subparsers(dest="demo", required=True)
    demo.add_parser("train", help="train the whole chain from scratch (data, stages 1-3) and evaluate it",
                    module=".demo.train_chain")
    demo.add_parser("export", help="write the bundled demo model and sample images from a chain's stage 3",
                    module=".demo.export")
    demo.add_parser("compare", help="dense / Dynamic-LLaVA / FastV / random / H2O on a chain's model: "
                    "JSON, tables and plots", module=".demo.compare")
    demo.add_parser("margins", help="the image predictor's keep margins by patch kind (target, look-alike, "
                    "background) on a chain's test scenes", module=".demo.keep_margins")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
