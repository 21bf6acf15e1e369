"""MMBench upload file: `python -m dynamic_llava.eval.convert_mmbench_for_submission --annotation-file
mmbench_dev.tsv --result-dir answers --upload-dir answers_upload --experiment NAME`.

Reads `<result-dir>/<experiment>.jsonl` and writes `<upload-dir>/<experiment>.xlsx` like LLaVA: the
annotation rows without hint / category / source / image / comment / l2-category, with a `prediction`
column after the options. The .xlsx needs openpyxl, which is not a dependency: without it (or with
`--format tsv`) a tab-separated `<experiment>.tsv` with the same columns is written instead. With
circular answers (`--all-rounds`) the round-0 answer is used: its letters follow the annotation's order.

Cells come out as LLaVA's pandas writes them: pandas reads the TSV with its default missing-value
strings ("", "None", "NA", "N/A", "null", "nan", ...), so those cells are empty, and it types each
column: whole numbers when every cell is an integer (the index), decimals when every present cell is
a number, else text. An unanswered question has an empty prediction.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import re
import sys
from pathlib import Path
from typing import Sequence

from ..errors import UserError, run_command
from .io import read_jsonl, read_tsv, require_keys, write_text_atomic

DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")
PREDICTION_POSITION = 6  # LLaVA's `cur_df.insert(6, 'prediction', None)`
# pandas' default `na_values` (pandas >= 2): such a cell reads as NaN and is written empty.
NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
                        "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")

Cell = str | int | float | None


def _is_missing(value: str | None) -> bool:
    return value is None or value in NA_STRINGS  # None: a row shorter than the header


def _is_number(value: str) -> bool:
    """A decimal number as pandas parses one (Python's float also takes "1_000"; pandas does not)."""
    try:
        float(value)
    except ValueError:
        return False
    return "_" not in value


def typed_column(values: list[str | None]) -> list[Cell]:
    """One column's cells as pandas reads them: int if every cell is an integer, float if every present
    cell is a number, else text; a missing cell is None."""
    present = [v for v in values if not _is_missing(v)]
    if len(present) == len(values) and all(_INTEGER.fullmatch(v) for v in present):
        return [int(v) for v in present]
    if all(_is_number(v) for v in present):
        return [None if _is_missing(v) else float(v) for v in values]
    return [None if _is_missing(v) else v for v in values]


def submission_table(rows: list[dict[str, str]], results: list[dict]) -> list[list[Cell]]:
    """Header and rows: the kept annotation columns, typed as pandas does, with `prediction` inserted
    (None where unanswered)."""
    predictions = {str(r["question_id"]): r["text"] for r in results if r.get("round_id", 0) == 0}
    columns = [c for c in rows[0] if c not in DROPPED]
    cells = {c: typed_column([row.get(c) for row in rows]) for c in columns}
    cells["prediction"] = [predictions.get(str(index)) for index in cells["index"]]
    columns.insert(min(PREDICTION_POSITION, len(columns)), "prediction")
    return [columns] + [[cells[c][i] for c in columns] for i in range(len(rows))]


def write_xlsx(path: Path, table: list[list[Cell]]) -> None:
    from openpyxl import Workbook

    workbook = Workbook()
    for line in table:
        # pandas' to_excel writes a missing cell as an empty string (na_rep=""), not as no cell.
        workbook.active.append(["" if value is None else value for value in line])
    path.parent.mkdir(parents=True, exist_ok=True)
    workbook.save(path)


def write_tsv(path: Path, table: list[list[Cell]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter="\t", lineterminator="\n").writerows(table)  # None -> ""
    write_text_atomic(path, buffer.getvalue())


def run(args: argparse.Namespace) -> int:
    rows = read_tsv(args.annotation_file, ("index",))
    src = Path(args.result_dir) / f"{args.experiment}.jsonl"
    results = read_jsonl(src)
    for index, result in enumerate(results):
        require_keys(result, ("question_id", "text"), f"{src}:{index + 1}")
    table = submission_table(rows, results)
    fmt = args.format
    if fmt == "auto":
        fmt = "xlsx" if importlib.util.find_spec("openpyxl") else "tsv"
    if fmt == "xlsx" and not importlib.util.find_spec("openpyxl"):
        raise UserError("--format xlsx needs openpyxl (pip install openpyxl); or use --format tsv")
    dst = Path(args.upload_dir) / f"{args.experiment}.{fmt}"
    (write_xlsx if fmt == "xlsx" else write_tsv)(dst, table)
    missing = sum(line[table[0].index("prediction")] is None for line in table[1:])
    print(f"total results: {len(results)}, total questions: {len(rows)}, missing: {missing}")
    print(f"wrote {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True, help="the MMBench TSV the questions came from")
    parser.add_argument("--result-dir", required=True, help="folder of <experiment>.jsonl")
    parser.add_argument("--upload-dir", required=True, help="folder to write the upload file to")
    parser.add_argument("--experiment", required=True, help="answers file name without .jsonl")
    parser.add_argument("--format", choices=["auto", "xlsx", "tsv"], default="auto",
                        help="auto: xlsx if openpyxl is installed (not a dependency), else tsv")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
