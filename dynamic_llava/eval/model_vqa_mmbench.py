"""`python -m dynamic_llava.eval.model_vqa_mmbench`: MMBench from its TSV (index, question, hint, A-D,
answer, category, image as base64, ...). With `--all-rounds` (circular evaluation) each question is
asked once per option, the options rotated by one each round; each round is one answer line."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from . import runner
from .io import read_tsv

ALL_OPTIONS = ["A", "B", "C", "D"]
COLUMNS = ("index", "question", "A", "B", "image")
SINGLE_PRED_PROMPTS = {"en": "Answer with the option's letter from the given choices directly.",
                       "cn": "请直接回答选项字母。"}


def is_none(value: str | None) -> bool:
    """An empty cell, as pandas' NaN / 'nan' / 'none' are in LLaVA."""
    return value is None or value.strip() == "" or value.strip().lower() in ("nan", "none")


def _index(value: str) -> Any:
    """The question id: an int like pandas reads it, else the text."""
    return int(value) if value.strip().lstrip("-").isdigit() else value


def row_questions(row: dict[str, str], all_rounds: bool, suffix: str | None) -> list[runner.Question]:
    """LLaVA's prompt per round: hint, question, "A. ..." lines; the options rotate between rounds."""
    options = []
    for char in ALL_OPTIONS:
        if is_none(row.get(char)):
            break
        options.append(row[char])
    chars = ALL_OPTIONS[:len(options)]
    questions = []
    for round_idx in range(len(options) if all_rounds else 1):
        prompt = row["question"] if is_none(row.get("hint")) else row["hint"] + "\n" + row["question"]
        for char, option in zip(ALL_OPTIONS, options):
            prompt += "\n" + char + ". " + option
        query = prompt + "\n" + suffix if suffix else prompt
        extra = {"round_id": round_idx, "prompt": prompt, "options": options, "option_char": chars}
        questions.append(runner.Question(_index(row["index"]), query, image_data=row["image"], extra=extra))
        options, chars = options[1:] + options[:1], chars[1:] + chars[:1]
    return questions


def read_questions(args: argparse.Namespace) -> list[runner.Question]:
    suffix = SINGLE_PRED_PROMPTS[args.lang] if args.single_pred_prompt else None
    return [q for row in read_tsv(args.question_file, COLUMNS) for q in row_questions(row, args.all_rounds, suffix)]


def _extra_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--single-pred-prompt", "--single_pred_prompt", dest="single_pred_prompt",
                        action="store_true", help="append the answer-with-a-letter instruction (see --lang)")
    parser.add_argument("--all-rounds", "--all_rounds", dest="all_rounds", action="store_true",
                        help="circular evaluation: one round per option, options rotated")
    parser.add_argument("--lang", choices=sorted(SINGLE_PRED_PROMPTS), default="en")


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main(argv, "python -m dynamic_llava.eval.model_vqa_mmbench", __doc__, 128, read_questions,
                       _extra_arguments)


if __name__ == "__main__":
    sys.exit(main())
