"""MMBench, SEED, VizWiz and MM-Vet converters on hand-made files with known outputs; bad input -> exit 2."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dynamic_llava.eval import (
    convert_mmbench_for_submission,
    convert_mmvet_for_eval,
    convert_seed_for_submission,
    convert_vizwiz_for_submission,
)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _mmbench(tmp_path: Path) -> tuple[Path, Path]:
    tsv = tmp_path / "mmbench_dev.tsv"
    with tsv.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"])
        writer.writerow([5, "Color?", "a\nhint", "red", "blue", "", "", "A", "c", "aGVsbG8=", "s"])
        writer.writerow([6, "Shape?", "", "round", "square", "flat", "", "C", "c", "aGVsbG8=", "s"])
        writer.writerow([7, "Size?", "", "big", "small", "", "", "B", "c", "aGVsbG8=", "s"])
    results = tmp_path / "answers"
    results.mkdir()
    _jsonl(results / "exp.jsonl", [{"question_id": 5, "round_id": 0, "text": "A"},
                                   {"question_id": 5, "round_id": 1, "text": "B"},
                                   {"question_id": 6, "round_id": 0, "text": "C"}])
    return tsv, results


def test_mmbench_tsv_upload(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tsv, results = _mmbench(tmp_path)
    args = ["--annotation-file", str(tsv), "--result-dir", str(results), "--upload-dir", str(tmp_path / "up"),
            "--experiment", "exp"]
    assert convert_mmbench_for_submission.main(args + ["--format", "tsv"]) == 0
    with (tmp_path / "up" / "exp.tsv").open(newline="") as handle:
        table = list(csv.reader(handle, delimiter="\t"))
    assert table == [["index", "question", "A", "B", "C", "D", "prediction", "answer"],
                     ["5", "Color?", "red", "blue", "", "", "A", "A"],  # round 0, not the rotated round 1
                     ["6", "Shape?", "round", "square", "flat", "", "C", "C"],
                     ["7", "Size?", "big", "small", "", "", "", "B"]]
    assert "missing: 1" in capsys.readouterr().out


def test_mmbench_xlsx_upload(tmp_path: Path) -> None:
    openpyxl = pytest.importorskip("openpyxl")
    tsv, results = _mmbench(tmp_path)
    assert convert_mmbench_for_submission.main(["--annotation-file", str(tsv), "--result-dir", str(results),
                                                "--upload-dir", str(tmp_path), "--experiment", "exp"]) == 0
    sheet = openpyxl.load_workbook(tmp_path / "exp.xlsx").active
    assert [c.value for c in sheet[1]][6] == "prediction" and sheet["G2"].value == "A"


def test_seed_accuracy_per_type_and_upload(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    annotation = tmp_path / "seed.json"
    annotation.write_text(json.dumps({
        "question_type": {"Scene Understanding": 1, "Action Recognition": 10},
        "questions": [{"question_id": "101", "question_type_id": 1, "answer": "A", "data_type": "image"},
                      {"question_id": "102", "question_type_id": 1, "answer": "B", "data_type": "image"},
                      {"question_id": "v1", "question_type_id": 10, "answer": "C", "data_type": "video"}]}))
    results = _jsonl(tmp_path / "answers.jsonl", [{"question_id": 101, "text": "A"},
                                                  {"question_id": 102, "text": "C"},
                                                  {"question_id": "v1", "text": "C"}])
    upload = tmp_path / "upload.jsonl"
    args = ["--annotation-file", str(annotation), "--result-file", str(results), "--result-upload-file", str(upload)]
    assert convert_seed_for_submission.main(args) == 0
    out = capsys.readouterr().out
    for line in ("Scene Understanding: 50.00%", "Action Recognition: 100.00%", "Total accuracy: 66.67%",
                 "image accuracy: 50.00%", "video accuracy: 100.00%"):
        assert line in out
    assert [json.loads(line) for line in upload.read_text().splitlines()] == [
        {"question_id": "101", "prediction": "A"}, {"question_id": "102", "prediction": "C"},
        {"question_id": "v1", "prediction": "C"}]

    _jsonl(results, [{"question_id": 101, "text": "A"}])
    upload.unlink()
    assert convert_seed_for_submission.main(args) == 2
    captured = capsys.readouterr()
    assert "Total accuracy: 33.33%" in captured.out and captured.err.startswith("error: 2 of 3 questions")
    assert not upload.exists()


def test_vizwiz_upload_normalises_answers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    questions = _jsonl(tmp_path / "llava_test.jsonl", [{"question_id": "VizWiz_1.jpg", "image": "VizWiz_1.jpg"},
                                                       {"question_id": "VizWiz_2.jpg", "image": "VizWiz_2.jpg"}])
    results = _jsonl(tmp_path / "answers.jsonl", [{"question_id": "VizWiz_2.jpg", "text": "Two dogs."},
                                                  {"question_id": "VizWiz_1.jpg", "text": "Unanswerable"}])
    upload = tmp_path / "up" / "vizwiz.json"
    args = ["--annotation-file", str(questions), "--result-file", str(results), "--result-upload-file", str(upload)]
    assert convert_vizwiz_for_submission.main(args) == 0
    assert json.loads(upload.read_text()) == [{"image": "VizWiz_1.jpg", "answer": "unanswerable"},
                                              {"image": "VizWiz_2.jpg", "answer": "2 dogs"}]
    _jsonl(results, [{"question_id": "VizWiz_2.jpg", "text": "x"}])
    assert convert_vizwiz_for_submission.main(args) == 2
    assert capsys.readouterr().err.startswith("error: 1 of 2 questions have no answer (first: 'VizWiz_1.jpg')")


def test_mmvet_keys(tmp_path: Path) -> None:
    src = _jsonl(tmp_path / "answers.jsonl", [{"question_id": 0, "text": "a cat"}, {"question_id": 12, "text": "7"}])
    dst = tmp_path / "results.json"
    assert convert_mmvet_for_eval.main(["--src", str(src), "--dst", str(dst)]) == 0
    assert json.loads(dst.read_text()) == {"v1_0": "a cat", "v1_12": "7"}


@pytest.mark.parametrize("module", [convert_mmvet_for_eval, convert_vizwiz_for_submission,
                                    convert_seed_for_submission, convert_mmbench_for_submission])
def test_bad_input_exits_2(module, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1}\n')
    if module is convert_mmvet_for_eval:
        args = ["--src", str(bad), "--dst", str(tmp_path / "out.json")]
    elif module is convert_mmbench_for_submission:
        args = ["--annotation-file", str(tmp_path / "missing.tsv"), "--result-dir", str(tmp_path),
                "--upload-dir", str(tmp_path), "--experiment", "bad"]
    else:
        args = ["--annotation-file", str(bad), "--result-file", str(bad), "--result-upload-file",
                str(tmp_path / "out.json")]
    assert module.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out.json").exists()
