"""Synthetic benchmark accuracy: `python -m dynamic_llava.data.score_synth --answers-file A --gt-file G [--output J]`.

Exact match per question after the VQA / EvalAI answer normalisation (`eval.vqa_answer.normalize_answer`:
case, punctuation, articles, number words, so "Two." matches "2"). A ground-truth question with no
answer line counts as wrong and is reported as missing. Prints the accuracy per question type and overall.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..cli import run_command
from ..errors import UserError
from ..eval.io import read_jsonl, require_keys, write_json_atomic
from ..eval.vqa_answer import normalize_answer


def score(answers: list[dict], ground_truth: list[dict]) -> dict[str, Any]:
    """{"per_type": {category: {accuracy, correct, questions}}, "overall": {...}, "missing": n}."""
    predicted: dict[Any, str] = {}
    for index, row in enumerate(answers):
        require_keys(row, ("question_id", "text"), f"answers line {index + 1}")
        predicted[row["question_id"]] = normalize_answer(str(row["text"]))
    known = set()
    tally: dict[str, list[int]] = {}  # category -> [correct, questions]
    for index, row in enumerate(ground_truth):
        require_keys(row, ("question_id", "answer", "category"), f"ground-truth line {index + 1}")
        known.add(row["question_id"])
        counts = tally.setdefault(row["category"], [0, 0])
        counts[0] += predicted.get(row["question_id"]) == normalize_answer(str(row["answer"]))
        counts[1] += 1
    if not tally:
        raise UserError("no ground-truth questions to score")
    unknown = [qid for qid in predicted if qid not in known]
    if unknown:
        raise UserError(f"{len(unknown)} answer(s) for questions not in the ground truth, e.g. {unknown[0]!r}")

    def row(correct: int, questions: int) -> dict[str, Any]:
        return {"accuracy": correct / questions, "correct": correct, "questions": questions}

    return {"per_type": {c: row(*counts) for c, counts in tally.items()},
            "overall": row(sum(c for c, _ in tally.values()), sum(n for _, n in tally.values())),
            "missing": len(known) - len(set(predicted))}


def run(args: argparse.Namespace) -> int:
    result = score(read_jsonl(args.answers_file), read_jsonl(args.gt_file))
    for category, row in [*result["per_type"].items(), ("overall", result["overall"])]:
        print(f"{category}: {100 * row['accuracy']:.2f}% ({row['correct']}/{row['questions']})")
    if result["missing"]:
        print(f"missing answers (counted wrong): {result['missing']}")
    if args.output:
        write_json_atomic(args.output, result, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers-file", required=True, help="answers jsonl (question_id, text), e.g. "
                        "from model_vqa_loader")
    parser.add_argument("--gt-file", required=True, help="the split's answers.jsonl (question_id, answer, category)")
    parser.add_argument("--output", default=None, help="also write the scores as json here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
