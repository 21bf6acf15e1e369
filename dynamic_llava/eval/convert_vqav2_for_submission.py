"""VQAv2 upload file: `python -m dynamic_llava.eval.convert_vqav2_for_submission --split S --ckpt C`.

LLaVA's layout under `--dir`: reads `answers/<split>/<ckpt>/merge.jsonl` and the test questions
`llava_vqav2_mscoco_test2015.jsonl`, writes `answers_upload/<split>/<ckpt>.json`. `--src`, `--dst`
and `--test-file` override those paths. Answers go through the EvalAI normaliser; every test
question is present (missing ones get ""), in the test file's order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..errors import UserError, run_command
from .io import read_jsonl, require_keys, write_json_atomic
from .vqa_answer import normalize_answer


def submission(results: list[dict], questions: list[dict]) -> list[dict]:
    """`[{"question_id", "answer"}]` for every question, "" where there is no result."""
    answers = {r["question_id"]: r["text"] for r in results}
    return [
        {"question_id": q["question_id"], "answer": normalize_answer(answers[q["question_id"]])
         if q["question_id"] in answers else ""}
        for q in questions
    ]


def _paths(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    base = Path(args.dir)
    if (args.src is None or args.dst is None) and (args.split is None or args.ckpt is None):
        raise UserError("give --split and --ckpt, or both --src and --dst")
    src = Path(args.src) if args.src else base / "answers" / args.split / args.ckpt / "merge.jsonl"
    dst = Path(args.dst) if args.dst else base / "answers_upload" / args.split / f"{args.ckpt}.json"
    test = Path(args.test_file) if args.test_file else base / "llava_vqav2_mscoco_test2015.jsonl"
    return src, test, dst


def run(args: argparse.Namespace) -> int:
    src, test, dst = _paths(args)
    results = read_jsonl(src)
    for index, result in enumerate(results):
        require_keys(result, ("question_id", "text"), f"{src}:{index + 1}")
    questions = read_jsonl(test)
    for index, question in enumerate(questions):
        require_keys(question, ("question_id",), f"{test}:{index + 1}")
    upload = submission(results, questions)
    answered = {r["question_id"] for r in results}
    missing = sum(q["question_id"] not in answered for q in questions)
    write_json_atomic(dst, upload)
    print(f"total results: {len(results)}, total split: {len(questions)}, missing: {missing}")
    print(f"wrote {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="./playground/data/eval/vqav2")
    parser.add_argument("--split", help="answers/<split>/... (e.g. llava_vqav2_mscoco_test-dev2015)")
    parser.add_argument("--ckpt", help="checkpoint name used in the answers path")
    parser.add_argument("--src", help="merged answers jsonl (overrides --dir/--split/--ckpt)")
    parser.add_argument("--dst", help="upload json to write (overrides --dir/--split/--ckpt)")
    parser.add_argument("--test-file", help="test questions jsonl (default <dir>/llava_vqav2_mscoco_test2015.jsonl)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
