"""Synthetic benchmark accuracy: `python -m dynamic_llava.data.score_synth --answers-file A --gt-file G [--output J]`.

Exact match per question after the VQA / EvalAI answer normalisation (`eval.vqa_answer.normalize_answer`:
case, punctuation, articles, number words, so "Two." matches "2"). A ground-truth question with no
answer line counts as wrong and is reported as missing. Prints the accuracy per question type and overall,
and on the questions about held-out (colour, shape) pairs when the ground truth marks some (`held_out`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import UserError, run_command
from ..eval.io import read_jsonl, require_keys, write_json_atomic
from ..eval.vqa_answer import normalize_answer


def normalized_answers(answers: list[dict]) -> dict[Any, str]:
    """question_id -> the normalised answer text."""
    predicted: dict[Any, str] = {}
    for index, row in enumerate(answers):
        require_keys(row, ("question_id", "text"), f"answers line {index + 1}")
        predicted[row["question_id"]] = normalize_answer(str(row["text"]))
    return predicted


def is_right(predicted: dict[Any, str], truth: dict) -> bool:
    """Whether the answer to one ground-truth question matches it (no answer: wrong)."""
    return predicted.get(truth["question_id"]) == normalize_answer(str(truth["answer"]))


def score(answers: list[dict], ground_truth: list[dict]) -> dict[str, Any]:
    """{"per_type": {category: {accuracy, correct, questions}}, "overall": {...}, "missing": n}, and
    "held_out": {...} over the ground-truth rows with `held_out` true, when there are any."""
    predicted = normalized_answers(answers)
    known = set()
    tally: dict[str, list[int]] = {}  # category -> [correct, questions]
    held_out = [0, 0]
    for index, row in enumerate(ground_truth):
        require_keys(row, ("question_id", "answer", "category"), f"ground-truth line {index + 1}")
        known.add(row["question_id"])
        right = is_right(predicted, row)
        for counts in [tally.setdefault(row["category"], [0, 0])] + ([held_out] if row.get("held_out") else []):
            counts[0] += right
            counts[1] += 1
    if not tally:
        raise UserError("no ground-truth questions to score")
    unknown = [qid for qid in predicted if qid not in known]
    if unknown:
        raise UserError(f"{len(unknown)} answer(s) for questions not in the ground truth, e.g. {unknown[0]!r}")

    def row(correct: int, questions: int) -> dict[str, Any]:
        return {"accuracy": correct / questions, "correct": correct, "questions": questions}

    result: dict[str, Any] = {"per_type": {c: row(*counts) for c, counts in tally.items()},
                              "overall": row(sum(c for c, _ in tally.values()), sum(n for _, n in tally.values())),
                              "missing": len(known) - len(set(predicted))}
    if held_out[1]:
        result["held_out"] = row(*held_out)
    return result


def run(args: argparse.Namespace) -> int:
    result = score(read_jsonl(args.answers_file), read_jsonl(args.gt_file))
    rows = [*result["per_type"].items(), ("overall", result["overall"])]
    if "held_out" in result:
        rows.append(("held-out pairs", result["held_out"]))
    for category, row in rows:
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
