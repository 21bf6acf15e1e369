"""The one exception type for bad input, and `run_command`: the CLI prints its message and exits with code 2.

Imports nothing from the package, so every command (the `dynamic-llava` subcommands and the `python -m`
scripts) can use it without importing `cli` above it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Callable

# Optional dependencies and the pyproject extra that installs each (`pip install -e .` alone runs inference).
EXTRAS = {
    "accelerate": "train", "peft": "train", "deepspeed": "train", "tensorboard": "train",
    "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "httpx": "serve", "gradio": "serve",
    "openai": "eval", "nltk": "eval", "wn": "eval",
    "matplotlib": "bench",
    "lmms_eval": "lmms",
}


class UserError(ValueError):
    """Input the user can fix (bad path, bad flag value, malformed checkpoint)."""


class MissingExtra(UserError):
    """An optional dependency is not installed: the message names the extra that installs it."""

    def __init__(self, module: str, extra: str | None = None, needed_by: str = "this command") -> None:
        extra = extra or EXTRAS[module]
        super().__init__(f"{needed_by} needs {module}, which is not installed: "
                         f"pip install \"dynamic_llava[{extra}]\" (or \"dynamic_llava[all]\")")


def missing_extra(error: ModuleNotFoundError) -> MissingExtra | None:
    """The MissingExtra for an import that failed on a known optional dependency, else None."""
    module = (error.name or "").split(".")[0]
    return MissingExtra(module) if module in EXTRAS else None


def require_extra(*modules: str, run_as_main: bool = False) -> None:
    """Raise MissingExtra for the first of `modules` that is not installed, before importing any of them.

    `run_as_main=True` (a module started with `python -m`, checking before its own top-level imports, where
    no handler can catch the error): print the message and exit with code 2 instead.
    """
    for module in modules:
        if importlib.util.find_spec(module) is None:
            error = MissingExtra(module)
            if run_as_main:
                print(f"error: {error}", file=sys.stderr)
                raise SystemExit(2)
            raise error


def run_command(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`handler(args)`; a UserError (MissingExtra included) or a missing optional dependency: message, code 2."""
    try:
        return handler(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:  # an optional dependency imported where it is needed
        user_error = missing_extra(error)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
