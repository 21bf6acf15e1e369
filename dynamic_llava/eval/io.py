"""Shared file IO for the runners and scorers: json / jsonl / tsv reading with clear errors, atomic writes."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

from ..errors import UserError


def _open_text(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    return path.read_text(encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a whole json file; a missing or malformed file is a `UserError`."""
    try:
        return json.loads(_open_text(path))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: malformed json ({error})") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Parse a jsonl file (blank lines skipped); each line must be a json object."""
    records = []
    for number, line in enumerate(_open_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: malformed json line ({error})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a json object")
        records.append(record)
    return records


def read_tsv(path: str | os.PathLike, columns: Iterable[str]) -> list[dict[str, str]]:
    """The rows of a tab-separated file with a header that has `columns` (fields may be huge: base64 images)."""
    csv.field_size_limit(sys.maxsize)
    rows = list(csv.DictReader(io.StringIO(_open_text(path)), delimiter="\t"))
    if not rows:
        raise UserError(f"{path}: no rows (expected a tab-separated file with a header)")
    require_keys(rows[0], columns, f"{path}: header")
    return rows


def require_keys(record: dict, keys: Iterable[str], where: str) -> None:
    """Raise a `UserError` naming `where` if `record` lacks any of `keys`."""
    missing = [key for key in keys if key not in record]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temp file next to `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = None) -> None:
    """Serialise `data` as json and write it atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent))
