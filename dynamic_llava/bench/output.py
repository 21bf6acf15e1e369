"""Writing benchmark results: whole JSON files or nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..eval.io import write_json_atomic


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` atomically (temp file, then rename) and say where."""
    write_json_atomic(path, data, indent=2)
    print(f"wrote {path}")
