"""The evaluation scorers and converters on hand-made cases with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamic_llava.eval import (
    convert_gqa_for_eval,
    convert_mme,
    convert_vqav2_for_submission,
    eval_gqa,
    eval_mme,
    eval_pope,
    eval_science_qa,
    eval_textvqa,
)
from dynamic_llava.eval.vqa_answer import normalize_answer, vqa_accuracy


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "a, b",
    [("two", "2"), ("a dog", "dog"), ("yes.", "yes"), ("dont", "don't"), ("1,000", "1000"),
     ("Yes!", "yes"), ("The Cat", "cat"), ("couldnt've", "couldn't've"), ("none", "0")],
)
def test_normalisation_makes_equal(a: str, b: str) -> None:
    assert normalize_answer(a) == normalize_answer(b)


def test_normalisation_keeps_decimals_and_splits_hyphens() -> None:
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("t-shirt") == "t shirt"
    assert normalize_answer("red, white") == "red white"


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matches: int, expected: float) -> None:
    # k of 10 match: k subsets keep k-1 matches, 10-k keep k; e.g. k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
    gts = ["two"] * matches + ["cat"] * (10 - matches)
    assert vqa_accuracy("2", gts) == pytest.approx(expected)


def test_textvqa_by_question_id_and_by_image_question(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = [
        {"question_id": 1, "image_id": "img_a", "question": "What brand?", "answers": ["nike"] * 10},
        {"question_id": 2, "image_id": "img_a", "question": "What colour?", "answers": ["red"] * 3 + ["x"] * 7},
    ]
    ann = _json(tmp_path / "ann.json", {"data": data})
    results = _jsonl(tmp_path / "res.jsonl", [
        {"question_id": 1, "prompt": "What brand?\nAnswer briefly.", "text": "Nike."},
        {"question_id": "img_a", "prompt": "What colour?\nReference OCR token: r\nAnswer.", "text": "red"},
    ])
    assert eval_textvqa.main(["--annotation-file", str(ann), "--result-file", str(results)]) == 0
    out = capsys.readouterr().out
    assert "Samples: 2" in out and "Accuracy: 95.00%" in out


def test_pope_yes_no_reading() -> None:
    assert eval_pope.yes_or_no("No, there is no dog.") == "no"
    assert eval_pope.yes_or_no("Yes, there is. But not a cat.") == "yes"
    assert eval_pope.yes_or_no("There is not a dog") == "no"
    assert eval_pope.yes_or_no("Nothing") == "yes"


def test_pope_scores(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # random: labels y y n n, answers yes no yes no -> TP1 FN1 FP1 TN1; popular: all right.
    ann = tmp_path / "ann"
    ann.mkdir()
    _jsonl(ann / "coco_pope_random.json", [{"question_id": i + 1, "label": l} for i, l in enumerate("yes yes no no".split())])
    _jsonl(ann / "coco_pope_popular.json", [{"question_id": 1, "label": "yes"}, {"question_id": 2, "label": "no"}])
    questions = [{"question_id": i, "category": "random"} for i in range(4)]
    questions += [{"question_id": 10 + i, "category": "popular"} for i in range(2)]
    texts = ["Yes.", "No.", "Yes", "no", "Yes, it is.", "There is no cat."]
    q = _jsonl(tmp_path / "q.jsonl", questions)
    r = _jsonl(tmp_path / "r.jsonl", [{"question_id": x["question_id"], "text": t} for x, t in zip(questions, texts)])
    s = eval_pope.score(["yes", "yes", "no", "no"], texts[:4])
    assert (s.tp, s.fp, s.tn, s.fn) == (1, 1, 1, 1)
    assert (s.accuracy, s.precision, s.recall, s.f1, s.yes_ratio) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert eval_pope.main(["--annotation-dir", str(ann), "--question-file", str(q), "--result-file", str(r)]) == 0
    out = capsys.readouterr().out
    assert "1\t1\t1\t1" in out and "1\t0\t1\t0" in out
    assert "Average F1 score: 0.7500" in out


def test_vqav2_converter_fills_missing_questions(tmp_path: Path) -> None:
    base = tmp_path / "vqav2"
    (base / "answers" / "test-dev" / "ckpt").mkdir(parents=True)
    _jsonl(base / "answers" / "test-dev" / "ckpt" / "merge.jsonl", [{"question_id": 2, "text": "Two dogs."}])
    _jsonl(base / "llava_vqav2_mscoco_test2015.jsonl", [{"question_id": 1}, {"question_id": 2}, {"question_id": 3}])
    args = ["--dir", str(base), "--split", "test-dev", "--ckpt", "ckpt"]
    assert convert_vqav2_for_submission.main(args) == 0
    upload = json.loads((base / "answers_upload" / "test-dev" / "ckpt.json").read_text())
    assert upload == [{"question_id": 1, "answer": ""}, {"question_id": 2, "answer": "2 dogs"},
                      {"question_id": 3, "answer": ""}]


def test_gqa_convert_and_exact_match(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _jsonl(tmp_path / "a.jsonl", [{"question_id": "q1", "text": "Left."}, {"question_id": "q2", "text": "blue"},
                                        {"question_id": "q3", "text": "the cat"}])
    preds = tmp_path / "testdev_balanced_predictions.json"
    assert convert_gqa_for_eval.main(["--src", str(src), "--dst", str(preds)]) == 0
    assert json.loads(preds.read_text())[0] == {"questionId": "q1", "prediction": "left"}
    questions = _json(tmp_path / "testdev_balanced_questions.json",
                      {"q1": {"answer": "left"}, "q2": {"answer": "red"}, "q3": {"answer": "cat"}, "q4": {"answer": "no"}})
    args = ["--tier", "testdev_balanced", "--questions", str(questions), "--predictions", str(preds)]
    assert eval_gqa.main(args) == 0
    assert "Accuracy: 25.00%" in capsys.readouterr().out  # only q1: exact match, no article removal


@pytest.mark.parametrize(
    "text, letter",
    [("B", "B"), ("C. a cat", "C"), ("I think so. The answer is D.", "D"), ("The answer is A. The answer is B.", "FAILED"),
     ("b", "FAILED"), ("Paris", "FAILED")],
)
def test_science_qa_letter_parsing(text: str, letter: str) -> None:
    assert eval_science_qa.parse_letter(text) == letter


def test_science_qa_accuracy_by_category(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    problems = {
        "1": {"choices": ["x", "y"], "answer": 1, "subject": "natural science", "hint": "", "image": "i.png", "grade": "grade3"},
        "2": {"choices": ["x", "y"], "answer": 0, "subject": "social science", "hint": "ctx", "image": None, "grade": "grade8"},
        "3": {"choices": ["x", "y"], "answer": 0, "subject": "natural science", "hint": "", "image": None, "grade": "grade10"},
        "4": {"choices": ["x", "y"], "answer": 0, "subject": "language science", "hint": "", "image": None, "grade": "grade1"},
        "9": {"choices": ["x"], "answer": 0, "subject": "language science", "hint": "", "image": None, "grade": "grade1"},
    }
    _json(tmp_path / "problems.json", problems)
    _json(tmp_path / "pid_splits.json", {"test": ["1", "2", "3", "4"], "val": ["9"]})
    # 1 right; 2 right ("A. x"); 3 wrong (C is not among 2 choices); 4 has no result -> wrong.
    r = _jsonl(tmp_path / "r.jsonl", [{"question_id": "1", "prompt": "<image>\nq", "text": "B"},
                                      {"question_id": "2", "prompt": "q", "text": "A. x"},
                                      {"question_id": "3", "prompt": "q", "text": "C"}])
    out_file, out_result = tmp_path / "o.json", tmp_path / "s.json"
    argv = ["--base-dir", str(tmp_path), "--result-file", str(r), "--output-file", str(out_file),
            "--output-result", str(out_result)]
    assert eval_science_qa.main(argv) == 0
    assert "Total: 4, Correct: 2, Accuracy: 50.00%" in capsys.readouterr().out
    summary = json.loads(out_result.read_text())
    assert summary["categories"] == {"G1-6": 50.0, "G7-12": 50.0, "IMG": 100.0, "LAN": 0.0, "NAT": 50.0,
                                     "NO": 0.0, "SOC": 100.0, "TXT": 100.0}
    assert summary["results"] == {"1": 1, "2": 0, "3": -1, "4": -1}
    assert len(json.loads(out_file.read_text())["correct"]) == 2


def test_mme_convert_and_acc_plus(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "MME_Benchmark_release_version"
    (data / "color").mkdir(parents=True)
    (data / "color" / "a.txt").write_text("Is it red? Please answer yes or no.\tYes\nIs it blue? Please answer yes or no.\tNo\n")
    (data / "color" / "b.txt").write_text("Is it red?  Please answer yes or no.\tNo\nIs it green? Please answer yes or no.\tYes\n")
    answers = tmp_path / "answers"
    answers.mkdir()
    short = "\nAnswer the question using a single word or phrase."
    _jsonl(answers / "exp.jsonl", [
        {"question_id": "color/a.jpg", "prompt": "Is it red?" + short, "text": "Yes"},
        {"question_id": "color/a.jpg", "prompt": "Is it blue?" + short, "text": "No, it is not."},
        {"question_id": "color/b.png", "prompt": "Is it red?" + short, "text": "No"},  # two-space question
        {"question_id": "color/b.png", "prompt": "Is it green?" + short, "text": "Maybe"},
    ])
    out = tmp_path / "eval_tool" / "answers"
    argv = ["--experiment", "exp", "--data-path", str(data), "--answers-dir", str(answers), "--output-dir", str(out)]
    assert convert_mme.main(argv) == 0
    lines = (out / "exp" / "color.txt").read_text().splitlines()
    assert lines[2] == "b.txt\tIs it red?  Please answer yes or no.\tNo\tNo"
    # 3 of 4 questions right -> acc 75; only image a has both right -> acc+ 50; score 125.
    assert eval_mme.subtask_score(lines, "color.txt") == (75.0, 50.0)
    assert eval_mme.main(["--results-dir", str(out / "exp")]) == 0
    text = capsys.readouterr().out
    assert "color  score: 125.00" in text and text.count("total score:") == 2


_MISSING = {
    "textvqa": (eval_textvqa, ["--annotation-file", "{m}", "--result-file", "{m}"]),
    "pope": (eval_pope, ["--annotation-dir", "{m}", "--question-file", "{m}", "--result-file", "{m}"]),
    "vqav2": (convert_vqav2_for_submission, ["--src", "{m}", "--dst", "{m}.out", "--test-file", "{m}"]),
    "gqa_convert": (convert_gqa_for_eval, ["--src", "{m}", "--dst", "{m}.out"]),
    "gqa_eval": (eval_gqa, ["--questions", "{m}", "--predictions", "{m}"]),
    "mme_convert": (convert_mme, ["--experiment", "x", "--data-path", "{m}"]),
    "mme_eval": (eval_mme, ["--results-dir", "{m}"]),
    "science_qa": (eval_science_qa, ["--base-dir", "{m}", "--result-file", "{m}", "--output-file", "{m}.o",
                                     "--output-result", "{m}.r"]),
}


@pytest.mark.parametrize("name", sorted(_MISSING))
def test_missing_file_exits_2(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    module, argv = _MISSING[name]
    missing = str(tmp_path / "nope")
    assert module.main([a.format(m=missing) for a in argv]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_malformed_jsonl_line_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text('{"question_id": 1, "text": "x"}\n{not json\n')
    assert convert_gqa_for_eval.main(["--src", str(src), "--dst", str(tmp_path / "p.json")]) == 2
    assert "a.jsonl:2: malformed json line" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
