"""SEED-Bench: `python -m dynamic_llava.eval.convert_seed_for_submission --annotation-file seed.json
--result-file answers.jsonl --result-upload-file upload.jsonl`.

Prints the accuracy (exact match of the answer letter) per question type, overall, and for the image
and video questions, like LLaVA (an unanswered question counts as wrong). Then writes the upload
jsonl `{"question_id", "prediction"}` for every question; a missing answer is an error there.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from ..errors import UserError, run_command
from .io import read_json, read_jsonl, require_keys, write_text_atomic


def _qid(value: Any) -> Any:
    """SEED's question ids are strings of digits; LLaVA's answers may carry them as ints."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def accuracy(questions: list[dict], answers: dict[Any, str], data_type: str | None = None) -> dict[str, float]:
    """Accuracy in % per `question_type_id` (ids as strings) and under "total"; optionally one `data_type`."""
    counts: dict[Any, list[int]] = {}
    for question in questions:
        if data_type is not None and question.get("data_type") != data_type:
            continue
        count = counts.setdefault(question["question_type_id"], [0, 0])
        count[0] += 1
        count[1] += answers.get(_qid(question["question_id"])) == question["answer"]
    scores = {str(t): 100 * c / n for t, (n, c) in sorted(counts.items())}
    total = sum(n for n, _ in counts.values())
    if total:
        scores["total"] = 100 * sum(c for _, c in counts.values()) / total
    return scores


def run(args: argparse.Namespace) -> int:
    data = read_json(args.annotation_file)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise UserError(f"{args.annotation_file}: expected SEED's json with 'questions' and 'question_type'")
    questions = data["questions"]
    for index, question in enumerate(questions):
        require_keys(question, ("question_id", "question_type_id", "answer"), f"{args.annotation_file}: question {index}")
    results = read_jsonl(args.result_file)
    for index, result in enumerate(results):
        require_keys(result, ("question_id", "text"), f"{args.result_file}:{index + 1}")
    answers = {_qid(r["question_id"]): r["text"] for r in results}
    names = {str(type_id): name for name, type_id in data.get("question_type", {}).items()}
    scores = accuracy(questions, answers)
    for type_id, score in scores.items():
        if type_id != "total":
            print(f"{names.get(type_id, type_id)}: {score:.2f}%")
    print(f"Total accuracy: {scores.get('total', 0.0):.2f}%")
    for data_type in ("image", "video"):
        typed = accuracy(questions, answers, data_type)
        if typed:
            print(f"{data_type} accuracy: {typed['total']:.2f}%")
    missing = [q["question_id"] for q in questions if _qid(q["question_id"]) not in answers]
    if missing:
        raise UserError(f"{len(missing)} of {len(questions)} questions have no answer (first: {missing[0]!r}); "
                        "no upload file written")
    write_text_atomic(args.result_upload_file, "".join(
        json.dumps({"question_id": q["question_id"], "prediction": answers[_qid(q["question_id"])]}) + "\n"
        for q in questions))
    print(f"wrote {args.result_upload_file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotation-file", required=True, help="SEED-Bench json (questions, question_type)")
    parser.add_argument("--result-file", required=True, help="answers jsonl (question_id, text)")
    parser.add_argument("--result-upload-file", required=True, help="upload jsonl to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
