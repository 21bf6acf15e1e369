"""`python -m dynamic_llava.eval.model_vqa`: open-ended benchmarks (LLaVA-Bench, MM-Vet) from a question
jsonl, with LLaVA's flags (long answers: `--max_new_tokens` 1024 by default)."""

from __future__ import annotations

import sys
from typing import Sequence

from . import runner
from .model_vqa_loader import read_questions


def main(argv: Sequence[str] | None = None) -> int:
    return runner.main(argv, "python -m dynamic_llava.eval.model_vqa", __doc__, 1024, read_questions)


if __name__ == "__main__":
    sys.exit(main())
