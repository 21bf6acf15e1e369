"""ScienceQA -> LLaVA question files on a hand-made 3-problem ScienceQA (one problem without an image)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dynamic_llava.eval import convert_sqa_to_llava, model_vqa_science
from dynamic_llava.eval.runner import Question

PROBLEMS = {
    "1": {"question": "Which is a mammal?", "choices": ["cat", "trout"], "answer": 0, "hint": "",
          "image": "image.png", "lecture": "Mammals have fur.", "solution": "A cat has fur.",
          "subject": "natural science", "grade": "grade2"},
    "2": {"question": "Which word is a verb?", "choices": ["run", "blue", "table"], "answer": 0,
          "hint": "Think about actions.", "image": None, "lecture": "", "solution": "Run is an action.",
          "subject": "language science", "grade": "grade5"},
    "3": {"question": "Which state is farthest north?", "choices": ["Texas", "Ohio", "Maine", "Utah"],
          "answer": 2, "hint": "Look at the map.", "image": "map.png", "lecture": "", "solution": "",
          "subject": "social science", "grade": "grade8"},
}
SPLITS = {"test": ["1", "2", "3"], "train": ["2"]}


@pytest.fixture()
def base_dir(tmp_path: Path) -> Path:
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps(SPLITS))
    return tmp_path


def test_convert_to_llava_cqm_a(base_dir: Path) -> None:
    argv = ["convert_to_llava", "--base-dir", str(base_dir), "--prompt-format", "CQM-A", "--split", "test"]
    assert convert_sqa_to_llava.main(argv) == 0
    records = json.loads((base_dir / "llava_test_CQM-A.json").read_text())
    assert [r["id"] for r in records] == ["1", "2", "3"]
    assert records[0] == {
        "id": "1", "image": "1/image.png",
        "conversations": [
            {"from": "human", "value": "Context: N/A\nQuestion: Which is a mammal?\nOptions: (A) cat (B) trout\n<image>"},
            {"from": "gpt", "value": "The answer is A."}]}
    assert "image" not in records[1]
    assert records[1]["conversations"][0]["value"] == (
        "Context: Think about actions.\nQuestion: Which word is a verb?\nOptions: (A) run (B) blue (C) table")
    assert records[2]["image"] == "3/map.png"
    assert records[2]["conversations"][1]["value"] == "The answer is C."


def test_output_feeds_the_science_runner(base_dir: Path) -> None:
    convert_sqa_to_llava.main(["convert_to_llava", "--base_dir", str(base_dir), "--prompt_format", "CQM-A",
                               "--split", "test"])
    args = argparse.Namespace(question_file=str(base_dir / "llava_test_CQM-A.json"), single_pred_prompt=True)
    questions: list[Question] = model_vqa_science.read_questions(args)
    assert questions[0].text.startswith("<image>\nContext: N/A\n")
    assert "<image>" not in questions[1].text


def test_qcm_lepa_and_jsonl(base_dir: Path) -> None:
    assert convert_sqa_to_llava.main(["convert_to_jsonl", "--base-dir", str(base_dir), "--split", "test"]) == 0
    lines = (base_dir / "scienceqa_test_QCM-LEPA.jsonl").read_text().splitlines()
    first, second = (json.loads(line) for line in lines[:2])
    assert first["instruction"] == "Which is a mammal?\nContext: N/A\nOptions: (A) cat (B) trout\n<image>"
    assert first["output"] == "LECTURE: Mammals have fur.\nSOLUTION: A cat has fur.\n###\nANSWER: A."
    assert first["image"] == "1/image.png"
    assert "image" not in second and second["output"] == "SOLUTION: Run is an action.\n###\nANSWER: A."


def test_build_example_drops_empty_because() -> None:
    prompt, answer = convert_sqa_to_llava.build_example(PROBLEMS["3"], "QCML-AL")
    assert prompt == "Which state is farthest north?\nContext: Look at the map.\nOptions: (A) Texas (B) Ohio (C) Maine (D) Utah"
    assert answer == "The answer is C."


@pytest.mark.parametrize("argv, message", [
    (["--split", "dev"], "no split 'dev'"),
    (["--split", "test", "--prompt-format", "XYZ-A"], "unknown prompt format"),
])
def test_bad_input_exits_2(base_dir: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert convert_sqa_to_llava.main(["convert_to_llava", "--base-dir", str(base_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_base_dir_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert convert_sqa_to_llava.main(["convert_to_llava", "--base-dir", str(tmp_path), "--split", "test"]) == 2
    assert "no such file" in capsys.readouterr().err
