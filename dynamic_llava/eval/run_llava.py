"""`python -m dynamic_llava.eval.run_llava --model-path P --image-file F --query Q`: LLaVA's flags, same as `ask`."""

from __future__ import annotations

import argparse
import sys

from .. import ask
from ..errors import run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.eval.run_llava", description=__doc__)
    ask.add_arguments(parser)
    parser.add_argument("--model-name", default=None, help="accepted for compatibility; unused")
    return run_command(ask.run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
