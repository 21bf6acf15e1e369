"""MM-Vet results: `python -m dynamic_llava.eval.convert_mmvet_for_eval --src answers.jsonl --dst R.json`.

Writes `{"v1_<question_id>": answer, ...}`, the layout MM-Vet's evaluator expects (LLaVA's conversion).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import run_command
from .io import read_jsonl, require_keys, write_json_atomic


def mmvet_results(results: list[dict]) -> dict[str, str]:
    """Answers keyed by `v1_<question_id>`, in the answers file's order."""
    return {f"v1_{r['question_id']}": r["text"] for r in results}


def run(args: argparse.Namespace) -> int:
    results = read_jsonl(args.src)
    for index, result in enumerate(results):
        require_keys(result, ("question_id", "text"), f"{args.src}:{index + 1}")
    converted = mmvet_results(results)
    write_json_atomic(args.dst, converted, indent=2)
    print(f"wrote {len(converted)} answers to {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="answers jsonl (question_id, text)")
    parser.add_argument("--dst", required=True, help="results json to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
