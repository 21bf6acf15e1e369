"""`python -m dynamic_llava.eval.model_vqa_science`: ScienceQA from LLaVA's question json (a list of
`{id, image?, conversations}`); questions without an image are text-only requests."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ..constants import DEFAULT_IMAGE_TOKEN
from ..errors import UserError
from . import runner

SINGLE_PRED_PROMPT = "Answer with the option's letter from the given choices directly."


def read_questions(args: argparse.Namespace) -> list[runner.Question]:
    """LLaVA's prompt: the first human turn without `<image>`, the image token in front, optional suffix."""
    try:
        rows = json.loads(runner.read_text(args.question_file, "question file"))
        questions = []
        for row in rows:
            text = row["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            if row.get("image"):
                text = DEFAULT_IMAGE_TOKEN + "\n" + text
            if args.single_pred_prompt:
                text = text + "\n" + SINGLE_PRED_PROMPT
            questions.append(runner.Question(row["id"], text, row.get("image") or None))
    except (ValueError, KeyError, TypeError, IndexError):
        raise UserError(f"{args.question_file}: expected a JSON list of {{id, image?, conversations}}") from None
    return questions


def _extra_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--single-pred-prompt", "--single_pred_prompt", dest="single_pred_prompt",
                        action="store_true", help=f"append \"{SINGLE_PRED_PROMPT}\"")


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main(argv, "python -m dynamic_llava.eval.model_vqa_science", __doc__, 128, read_questions,
                       _extra_arguments)


if __name__ == "__main__":
    sys.exit(main())
