"""POPE: `python -m dynamic_llava.eval.eval_pope --annotation-dir D --question-file Q --result-file R`.

Per category (`coco_pope_<category>.json` in D, jsonl lines with a `label`; results are assigned to
categories through the question file's `category` and, as in LLaVA, paired with the label lines in
order, since the label files number their questions independently of the question file), LLaVA's
yes/no reading of the answer, the confusion counts, accuracy, precision, recall, F1 and yes ratio,
then the mean F1. Each category also gets LLaVA's summary row `F1, accuracy, precision, recall, yes
ratio` to three decimals.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UserError, run_command
from .io import read_jsonl, require_keys


def yes_or_no(text: str) -> str:
    """LLaVA's rule: in the first sentence (commas dropped), a word "No", "not" or "no" means no."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


@dataclass(frozen=True)
class PopeScores:
    """Confusion counts with "yes" as the positive class, and the metrics derived from them."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / max(self.tp + self.fp + self.tn + self.fn, 1)

    @property
    def precision(self) -> float:
        return self.tp / max(self.tp + self.fp, 1)

    @property
    def recall(self) -> float:
        return self.tp / max(self.tp + self.fn, 1)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def yes_ratio(self) -> float:
        return (self.tp + self.fp) / max(self.tp + self.fp + self.tn + self.fn, 1)


def score(labels: Sequence[str], answers: Sequence[str]) -> PopeScores:
    """Score answer texts against the "yes"/"no" labels at the same positions."""
    counts = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}
    for label, text in zip(labels, answers, strict=True):
        predicted_yes = yes_or_no(text) == "yes"
        actual_yes = label != "no"
        counts[("t" if predicted_yes == actual_yes else "f") + ("p" if predicted_yes else "n")] += 1
    return PopeScores(**counts)


def run(args: argparse.Namespace) -> int:
    annotation_dir = Path(args.annotation_dir)
    if not annotation_dir.is_dir():
        raise UserError(f"{annotation_dir}: no such directory")
    label_files = sorted(annotation_dir.glob("coco_pope_*.json"))
    if not label_files:
        raise UserError(f"{annotation_dir}: no coco_pope_<category>.json files")
    questions = read_jsonl(args.question_file)
    for index, question in enumerate(questions):
        require_keys(question, ("question_id", "category"), f"{args.question_file}:{index + 1}")
    category_of = {q["question_id"]: q["category"] for q in questions}
    results = read_jsonl(args.result_file)
    for index, result in enumerate(results):
        require_keys(result, ("question_id", "text"), f"{args.result_file}:{index + 1}")
        if result["question_id"] not in category_of:
            raise UserError(f"{args.result_file}:{index + 1}: question_id not in the question file")
    f1s = []
    for path in label_files:
        category = path.stem[len("coco_pope_"):]
        label_lines = read_jsonl(path)
        for index, line in enumerate(label_lines):
            require_keys(line, ("label",), f"{path}:{index + 1}")
        answers = [r["text"] for r in results if category_of[r["question_id"]] == category]
        if len(answers) != len(label_lines):
            raise UserError(f"{category}: {len(answers)} results but {len(label_lines)} labels in {path}")
        s = score([line["label"] for line in label_lines], answers)
        print(f"Category: {category}, # samples: {len(answers)}")
        print("TP\tFP\tTN\tFN\t")
        print(f"{s.tp}\t{s.fp}\t{s.tn}\t{s.fn}")
        print(f"Accuracy: {s.accuracy:.4f}")
        print(f"Precision: {s.precision:.4f}")
        print(f"Recall: {s.recall:.4f}")
        print(f"F1 score: {s.f1:.4f}")
        print(f"Yes ratio: {s.yes_ratio:.4f}")
        print(f"{s.f1:.3f}, {s.accuracy:.3f}, {s.precision:.3f}, {s.recall:.3f}, {s.yes_ratio:.3f}")  # LLaVA's row
        print("====================================")
        f1s.append(s.f1)
    print(f"Average F1 score: {sum(f1s) / len(f1s):.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotation-dir", required=True, help="folder with coco_pope_<category>.json")
    parser.add_argument("--question-file", required=True, help="llava_pope_test.jsonl (question_id, category)")
    parser.add_argument("--result-file", required=True, help="answers jsonl (question_id, text)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
