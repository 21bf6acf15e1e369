"""GQA accuracy: `python -m dynamic_llava.eval.eval_gqa --tier testdev_balanced [--questions Q --predictions P]`.

Exact match of the normalised prediction with the question's `answer`; questions without a
prediction count as wrong. Default paths, as in GQA's `eval.py`: `{tier}_questions.json` and
`{tier}_predictions.json`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import UserError, run_command
from .convert_gqa_for_eval import normalize_gqa_answer
from .io import read_json, require_keys


def accuracy(questions: dict[str, dict], predictions: list[dict]) -> tuple[float, int]:
    """(exact-match accuracy over all questions, number of questions without a prediction)."""
    if not questions:
        raise UserError("no questions to score")
    predicted = {}
    for index, item in enumerate(predictions):
        require_keys(item, ("questionId", "prediction"), f"prediction {index}")
        predicted[str(item["questionId"])] = normalize_gqa_answer(str(item["prediction"]))
    correct = missing = 0
    for qid, question in questions.items():
        require_keys(question, ("answer",), f"question {qid}")
        if qid not in predicted:
            missing += 1
        elif predicted[qid] == normalize_gqa_answer(question["answer"]):
            correct += 1
    return correct / len(questions), missing


def run(args: argparse.Namespace) -> int:
    questions = read_json(args.questions.format(tier=args.tier))
    predictions = read_json(args.predictions.format(tier=args.tier))
    if not isinstance(questions, dict):
        raise UserError(f"{args.questions}: expected a json object of questions keyed by id")
    if not isinstance(predictions, list):
        raise UserError(f"{args.predictions}: expected a json list of predictions")
    acc, missing = accuracy({str(k): v for k, v in questions.items()}, predictions)
    print(f"Questions: {len(questions)}, missing predictions: {missing}")
    print(f"Accuracy: {100 * acc:.2f}%")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tier", default="testdev_balanced")
    parser.add_argument("--questions", default="{tier}_questions.json")
    parser.add_argument("--predictions", default="{tier}_predictions.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
