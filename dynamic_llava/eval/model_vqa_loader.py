"""`python -m dynamic_llava.eval.model_vqa_loader`: short-answer benchmarks (VQAv2, GQA, TextVQA, POPE, MME, ...)
from a question jsonl, with LLaVA's flags."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import runner


def read_questions(args: argparse.Namespace) -> list[runner.Question]:
    return runner.read_question_jsonl(args.question_file)


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main(argv, "python -m dynamic_llava.eval.model_vqa_loader", __doc__, 128, read_questions)


if __name__ == "__main__":
    sys.exit(main())
