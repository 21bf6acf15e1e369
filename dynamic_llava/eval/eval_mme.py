"""MME scores: `python -m dynamic_llava.eval.eval_mme --results-dir eval_tool/answers/NAME`.

Each `<subtask>.txt` holds lines `image<TAB>question<TAB>ground truth<TAB>answer`, two questions
per image. Subtask score = acc + acc+ (percent of images with both questions right); perception
sums 10 subtasks, cognition 4. Subtasks without a file are reported and left out of the totals.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..errors import UserError, run_command

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def yes_no_other(answer: str) -> str:
    """MME's reading: "yes"/"no", else look for them in the first 4 characters, else "other"."""
    answer = answer.strip().lower()
    if answer in ("yes", "no"):
        return answer
    prefix = answer[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def subtask_score(lines: list[str], where: str) -> tuple[float, float]:
    """(acc, acc+) in percent over the `image<TAB>question<TAB>truth<TAB>answer` lines."""
    by_image: dict[str, list[bool]] = defaultdict(list)
    for number, line in enumerate(lines, start=1):
        fields = line.split("\t")
        if len(fields) != 4:
            raise UserError(f"{where}:{number}: expected 4 tab-separated fields, got {len(fields)}")
        image, _, truth, answer = fields
        by_image[image].append(yes_no_other(answer) == truth.strip().lower())
    if not by_image:
        raise UserError(f"{where}: no answers")
    flags = [flag for image_flags in by_image.values() for flag in image_flags]
    acc = 100 * sum(flags) / len(flags)
    acc_plus = 100 * sum(all(image_flags) for image_flags in by_image.values()) / len(by_image)
    return acc, acc_plus


def run(args: argparse.Namespace) -> int:
    results_dir = Path(args.results_dir)
    if not results_dir.is_dir():
        raise UserError(f"{results_dir}: no such directory")
    found = False
    for group, subtasks in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        print(f"=========== {group} ===========")
        total = 0.0
        for subtask in subtasks:
            path = results_dir / f"{subtask}.txt"
            if not path.is_file():
                print(f"\t {subtask}  missing")
                continue
            found = True
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            acc, acc_plus = subtask_score(lines, str(path))
            total += acc + acc_plus
            print(f"\t {subtask}  score: {acc + acc_plus:.2f} (acc {acc:.2f}, acc+ {acc_plus:.2f})")
        print(f"total score: {total:.2f}\n")
    if not found:
        raise UserError(f"{results_dir}: no MME subtask files")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", "--results_dir", dest="results_dir", required=True,
                        help="folder of <subtask>.txt answer files (--results_dir as in MME's calculation.py)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
