"""GQA predictions: `python -m dynamic_llava.eval.convert_gqa_for_eval --src answers.jsonl --dst P.json`.

Writes `[{"questionId", "prediction"}]`, the prediction being the answer without trailing periods, in
lower case (LLaVA's conversion, whitespace left as it is), as GQA's `eval.py` expects.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import run_command
from .io import read_jsonl, require_keys, write_json_atomic


def normalize_gqa_answer(text: str) -> str:
    """LLaVA's `text.rstrip('.').lower()`: trailing periods removed, lower case."""
    return text.rstrip(".").lower()


def run(args: argparse.Namespace) -> int:
    results = read_jsonl(args.src)
    for index, result in enumerate(results):
        require_keys(result, ("question_id", "text"), f"{args.src}:{index + 1}")
    predictions = [{"questionId": r["question_id"], "prediction": normalize_gqa_answer(r["text"])} for r in results]
    write_json_atomic(args.dst, predictions)
    print(f"wrote {len(predictions)} predictions to {args.dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="answers jsonl (question_id, text)")
    parser.add_argument("--dst", required=True, help="predictions json to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
