"""VizWiz upload file: `python -m dynamic_llava.eval.convert_vizwiz_for_submission --annotation-file
llava_test.jsonl --result-file answers.jsonl --result-upload-file upload.json`.

Writes `[{"image", "answer"}]` in the question file's order, answers through the EvalAI normaliser.
Every question needs an answer (as in LLaVA); a missing one is an error and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import UserError, run_command
from .io import read_jsonl, require_keys, write_json_atomic
from .vqa_answer import normalize_answer


def submission(results: list[dict], questions: list[dict]) -> list[dict]:
    """`[{"image", "answer"}]` for every question; a question without a result is a `UserError`."""
    answers = {r["question_id"]: r["text"] for r in results}
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if missing:
        raise UserError(f"{len(missing)} of {len(questions)} questions have no answer (first: {missing[0]!r})")
    return [{"image": q["image"], "answer": normalize_answer(answers[q["question_id"]])} for q in questions]


def run(args: argparse.Namespace) -> int:
    results = read_jsonl(args.result_file)
    for index, result in enumerate(results):
        require_keys(result, ("question_id", "text"), f"{args.result_file}:{index + 1}")
    questions = read_jsonl(args.annotation_file)
    for index, question in enumerate(questions):
        require_keys(question, ("question_id", "image"), f"{args.annotation_file}:{index + 1}")
    upload = submission(results, questions)
    write_json_atomic(args.result_upload_file, upload)
    print(f"total results: {len(results)}, total split: {len(questions)}")
    print(f"wrote {args.result_upload_file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotation-file", required=True, help="the test questions jsonl (question_id, image)")
    parser.add_argument("--result-file", required=True, help="answers jsonl (question_id, text)")
    parser.add_argument("--result-upload-file", required=True, help="upload json to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
