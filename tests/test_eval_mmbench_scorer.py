"""Local circular MMBench scorer on hand-made answers to the runner's real round rotations."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import pytest

from dynamic_llava.eval import eval_mmbench
from dynamic_llava.eval.model_vqa_mmbench import ALL_OPTIONS, row_questions

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
ROWS = [["10", "What color?", "", "red", "green", "blue", "black", "A", "color", "x"],
        ["11", "Is it a square?", "", "yes", "no", "", "", "B", "color", "x"],
        ["12", "Which one?", "nan", "x", "y", "z", "", "C", "misc", "x"]]


def _annotation(path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(COLUMNS)
        writer.writerows(ROWS)
    return path


def _answer_lines(style: dict[str, Callable[[str, str, int], str]]) -> list[dict]:
    """One line per round, as the runner writes them; `style[index](right_letter, its_text, round)` is the answer."""
    lines = []
    for row in ROWS:
        for q in row_questions(dict(zip(COLUMNS, row)), all_rounds=True, suffix=None):
            shown = ALL_OPTIONS[q.extra["option_char"].index(row[7])]
            text = style[row[0]](shown, q.extra["options"][ALL_OPTIONS.index(shown)], q.extra["round_id"])
            lines.append({"question_id": q.question_id, "round_id": q.extra["round_id"], "prompt": q.text,
                          "text": text, "options": q.extra["options"], "option_char": q.extra["option_char"]})
    return lines


STYLES = {
    # bare letter, "X.", "X)" and "X. text" forms, all correct
    "10": lambda letter, option, r: [letter, f"{letter}.", f"{letter}) {option}", f"{letter}. {option}"][r],
    # right in round 0, the other shown option in round 1
    "11": lambda letter, option, r: letter if r == 0 else "AB".replace(letter, ""),
    # the option's text, in any case and with a period
    "12": lambda letter, option, r: option.upper() + ".",
}


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    results = tmp_path / "answers.jsonl"
    results.write_text("".join(json.dumps(line) + "\n" for line in _answer_lines(STYLES)))
    return _annotation(tmp_path / "mmbench_dev.tsv"), results


def test_parse_letter() -> None:
    options = ["red", "green", "blue"]
    assert eval_mmbench.parse_letter(" B ", 3, options) == "B"
    assert eval_mmbench.parse_letter("C. blue", 3, options) == "C"
    assert eval_mmbench.parse_letter("A)", 3, options) == "A"
    assert eval_mmbench.parse_letter("Green", 3, options) == "B"
    assert eval_mmbench.parse_letter("D", 3, options) is None
    assert eval_mmbench.parse_letter("I think red", 3, options) is None


def test_rotation_is_undone() -> None:
    line = {"text": "A", "options": ["green", "blue", "red"], "option_char": ["B", "C", "A"]}
    assert eval_mmbench.original_choice(line) == "B"
    assert eval_mmbench.original_choice({**line, "text": "red"}) == "A"


def test_circular_accuracy(files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    annotation, results = files
    out = tmp_path / "scores" / "mmbench.json"
    argv = ["--annotation-file", str(annotation), "--result-file", str(results), "--output", str(out)]
    assert eval_mmbench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Accuracy: 66.67%" in printed
    assert "color: 50.00% (1/2)" in printed and "misc: 100.00% (1/1)" in printed
    scores = json.loads(out.read_text())
    assert (scores["correct"], scores["total"], scores["missing"], scores["partial_rounds"]) == (2, 3, 0, 0)
    assert scores["questions"]["11"] == {"answer": "B", "predictions": ["B", "A"], "correct": False}
    assert scores["questions"]["10"]["predictions"] == ["A"] * 4
    assert scores["categories"]["color"] == {"accuracy": 50.0, "correct": 1, "total": 2}


def test_missing_and_single_round(files: tuple[Path, Path]) -> None:
    annotation, _ = files
    rows = eval_mmbench.read_tsv(annotation, ("index",))
    lines = [line for line in _answer_lines(STYLES) if line["round_id"] == 0 and line["question_id"] != 12]
    scores = eval_mmbench.evaluate(rows, lines)
    assert (scores["correct"], scores["missing"], scores["partial_rounds"]) == (2, 1, 2)
    assert scores["questions"]["12"] == {"answer": "C", "predictions": [], "correct": False}


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("no_answer_column", "no `answer` column"),
    ("unknown_question", "not in the annotation file"),
])
def test_bad_input_exits_2(files: tuple[Path, Path], tmp_path: Path, case: str, message: str,
                           capsys: pytest.CaptureFixture) -> None:
    annotation, results = files
    if case == "missing":
        results = tmp_path / "nope.jsonl"
    elif case == "no_answer_column":
        annotation = tmp_path / "test.tsv"
        annotation.write_text("index\tquestion\n1\tq\n")
    else:
        results.write_text(json.dumps({"question_id": 99, "round_id": 0, "text": "A", "options": ["a", "b"],
                                       "option_char": ["A", "B"]}) + "\n")
    assert eval_mmbench.main(["--annotation-file", str(annotation), "--result-file", str(results)]) == 2
    assert message in capsys.readouterr().err
