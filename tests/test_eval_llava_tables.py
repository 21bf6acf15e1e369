"""Our scorers and converters against LLaVA's own: the EvalAI answer normaliser entry by entry (the
reference being LLaVA's processor class, vendored under tests/reference/), the MMBench upload cells as
LLaVA's pandas writes them, and every flag of LLaVA's scorer scripts, with LLaVA's meaning."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from reference.llava_m4c_processor import EvalAIAnswerProcessor

from dynamic_llava.eval import (
    convert_gqa_for_eval,
    convert_mmbench_for_submission,
    convert_sqa_to_llava,
    eval_mme,
    eval_pope,
    eval_science_qa,
    eval_textvqa,
    summarize_gpt_review,
)
from dynamic_llava.eval.vqa_answer import normalize_answer, vqa_accuracy

LLAVA = EvalAIAnswerProcessor()
# Copies taken before the oracle runs: its process_digit_article grows NUMBER_MAP through setdefault.
CONTRACTIONS = dict(EvalAIAnswerProcessor.CONTRACTIONS)
NUMBERS = dict(EvalAIAnswerProcessor.NUMBER_MAP)


def _variants(word: str) -> list[str]:
    """The word, upper-case, capitalised, without apostrophes, and inside a sentence with an article."""
    return sorted({word, word.upper(), word.capitalize(), word.replace("'", ""), word.replace("'", "").upper(),
                   f"the {word} one", f"{word}.", f"({word})"})


TABLE_INPUTS = sorted({v for word in [*CONTRACTIONS, *CONTRACTIONS.values(), *NUMBERS] for v in _variants(word)})

PUNCTUATION_INPUTS = [
    *("." * n for n in (1, 2, 31, 32, 33, 40, 100)),
    *(f"a{'.' * n}b" for n in (31, 32, 33, 50)),
    " . ".join("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ"),  # 45 periods between words
    "1.2.3." * 12, "3.5", ".5", "5.", "..5", "v1.0. ok.", "e.g. the U.S.A.",
    *(f"{mark}x{mark}" for mark in ";/[]\"{}()=+\\_-><@`,?!:'*#%&$^~|"),
    *(f"a {mark} b" for mark in ";/[]\"{}()=+\\_-><@`,?!"),
    *(f"a{mark}b" for mark in ";/[]\"{}()=+\\_-><@`,?!"),
    "1,000", "1,000,000 people", "a,b", "red, white and blue?", "t-shirt (large)", "x = y + z",
    "it's John's", "don't\ttab\nnewline", "  The  Two  DOGS  ", "none of them", "None", "an apple a day",
    "'twas", "'ows'at", "y'all'dve", "somebody'd", "somebodyd", "im", "ive", "lets", "id've", "shes", "yalldve",
]


@pytest.mark.parametrize("text", TABLE_INPUTS + PUNCTUATION_INPUTS)
def test_normaliser_matches_llava_processor(text: str) -> None:
    assert normalize_answer(text) == LLAVA(text)


@pytest.mark.parametrize("text, expected", [
    ("im", "im"), ("Im", "im"), ("ive", "ive"), ("lets", "lets"), ("id've", "id've"),  # dead entries in LLaVA
    ("somebody'd", "somebodyd"), ("yalldve", "yalldve"), ("yall'd've", "y'all'd've"), ("hes", "he's"),
    ("He's", "he 's"), ("." * 40, "." * 8), (f"a{'.' * 33}b", "a.b"),
])
def test_normaliser_llava_quirks(text: str, expected: str) -> None:
    # Written out by hand, so a change to the vendored oracle cannot hide a change here.
    assert normalize_answer(text) == expected


def _llava_textvqa_score(prediction: str, raw_answers: list[str]) -> float:
    """m4c_evaluator's TextVQAAccuracyEvaluator for one question, over the vendored processor."""
    answers = list(enumerate(LLAVA(a) for a in raw_answers))
    pred = LLAVA(prediction)
    accs = [min(1.0, sum(1 for other in answers if other != gt and other[1] == pred) / 3) for gt in answers]
    return sum(accs) / len(accs)


def test_textvqa_mixed_spellings_score_like_llava(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [  # (prediction, human answers): spellings the old rebuilt table merged and LLaVA's does not
        ("I'm", ["im"] * 4 + ["i'm"] * 2 + ["Im"] * 4),
        ("ive", ["i've"] * 3 + ["ive"] * 2 + ["i have"] * 5),
        ("lets go", ["let's go"] * 5 + ["lets go"] * 2 + ["go"] * 3),
        ("stop" + "." * 40, ["stop"] * 10),
        ("somebodyd", ["somebody'd"] * 3 + ["somebodyd"] * 7),
    ]
    data = [{"question_id": i, "image_id": f"img{i}", "question": f"q{i}?", "answers": answers}
            for i, (_, answers) in enumerate(cases)]
    (tmp_path / "ann.json").write_text(json.dumps({"data": data}))
    (tmp_path / "res.jsonl").write_text("".join(
        json.dumps({"question_id": f"img{i}", "prompt": f"q{i}?\nAnswer briefly.", "text": pred}) + "\n"
        for i, (pred, _) in enumerate(cases)))
    expected = [_llava_textvqa_score(pred, answers) for pred, answers in cases]
    assert [vqa_accuracy(pred, answers) for pred, answers in cases] == pytest.approx(expected)
    assert eval_textvqa.main(["--annotation-file", str(tmp_path / "ann.json"),
                              "--result-file", str(tmp_path / "res.jsonl")]) == 0
    assert f"Accuracy: {100 * sum(expected) / len(expected):.2f}%" in capsys.readouterr().out


# MMBench: pandas reads "None", "NA", "null", "" ... as NaN (written empty) and types whole-number
# columns as integers; a column of numbers with gaps is decimal.
MMBENCH_ROWS = [
    ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
     "comment", "split"],
    ["0", "Which?", "h", "None", "NA", "N/A", "", "A", "c", "aW1n", "s", "l2", "", "dev"],
    ["1", "Count?", "nan", "3", "null", "nan", "7.5", "B", "c", "aW1n", "s", "l2", "x", "dev"],
    ["2", 'Q "quoted"', "", "  spaced ", "#N/A", "", "", "C", "c", "aW1n", "s", "l2", "", "dev"],
]
MMBENCH_EXPECTED = [
    ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"],
    [0, "Which?", None, None, None, None, "A", "A", "dev"],
    [1, "Count?", "3", None, None, 7.5, None, "B", "dev"],  # "3" stays text: column A holds words too
    [2, 'Q "quoted"', "  spaced ", None, None, None, "", "C", "dev"],  # an empty answer stays ""
]


def _mmbench_files(tmp_path: Path) -> tuple[Path, Path]:
    tsv = tmp_path / "mmbench_dev.tsv"
    with tsv.open("w", newline="") as handle:
        csv.writer(handle, delimiter="\t").writerows(MMBENCH_ROWS)
    results = tmp_path / "answers"
    results.mkdir()
    (results / "exp.jsonl").write_text(json.dumps({"question_id": 0, "text": "A"}) + "\n"
                                       + json.dumps({"question_id": 2, "text": ""}) + "\n")
    return tsv, results


def _convert_mmbench(tsv: Path, results: Path, upload: Path, fmt: str) -> None:
    assert convert_mmbench_for_submission.main(["--annotation-file", str(tsv), "--result-dir", str(results),
                                                "--upload-dir", str(upload), "--experiment", "exp",
                                                "--format", fmt]) == 0


def test_mmbench_tsv_cells_as_llava_writes_them(tmp_path: Path) -> None:
    tsv, results = _mmbench_files(tmp_path)
    _convert_mmbench(tsv, results, tmp_path / "up", "tsv")
    with (tmp_path / "up" / "exp.tsv").open(newline="") as handle:
        table = list(csv.reader(handle, delimiter="\t"))
    # What pandas' to_csv(sep="\t", index=False) would give for LLaVA's frame: NaN empty, 7.5 as a decimal.
    assert table == [[str(v) if v is not None else "" for v in row] for row in MMBENCH_EXPECTED]


def _xlsx_cells(path: Path) -> list[list[tuple]]:
    import openpyxl

    return [[(c.value, c.data_type) for c in row] for row in openpyxl.load_workbook(path).active.iter_rows()]


def test_mmbench_xlsx_cells_as_llava_writes_them(tmp_path: Path) -> None:
    pytest.importorskip("openpyxl")
    tsv, results = _mmbench_files(tmp_path)
    _convert_mmbench(tsv, results, tmp_path / "up", "xlsx")
    cells = _xlsx_cells(tmp_path / "up" / "exp.xlsx")
    assert [[value for value, _ in row] for row in cells] == [
        [None if v == "" else v for v in row] for row in MMBENCH_EXPECTED]  # openpyxl reads "" back as None
    assert cells[1][0] == (0, "n")  # the index is a number, not text


def test_mmbench_xlsx_equals_llavas_pandas_output(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("openpyxl")
    tsv, results = _mmbench_files(tmp_path)
    # LLaVA's scripts/convert_mmbench_for_submission.py, run on the same files.
    df = pd.read_table(tsv)
    cur_df = df.copy()
    cur_df = cur_df.drop(columns=["hint", "category", "source", "image", "comment", "l2-category"])
    cur_df.insert(6, "prediction", None)
    for line in (results / "exp.jsonl").read_text().splitlines():
        pred = json.loads(line)
        cur_df.loc[df["index"] == pred["question_id"], "prediction"] = pred["text"]
    cur_df.to_excel(tmp_path / "llava.xlsx", index=False, engine="openpyxl")
    _convert_mmbench(tsv, results, tmp_path / "up", "xlsx")
    assert _xlsx_cells(tmp_path / "up" / "exp.xlsx") == _xlsx_cells(tmp_path / "llava.xlsx")


# Flags LLaVA's scripts take (MME's through its calculation.py), each used on tiny inputs.

def test_textvqa_result_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = [{"question_id": 1, "image_id": "img", "question": "What?", "answers": ["nike"] * 10}]
    (tmp_path / "ann.json").write_text(json.dumps({"data": data}))
    runs = tmp_path / "answers"
    runs.mkdir()
    for name, text in (("b_run", "adidas"), ("a_run", "Nike")):
        (runs / f"{name}.jsonl").write_text(json.dumps({"question_id": "img", "prompt": "What?\nx", "text": text}))
    (runs / "notes.txt").write_text("not answers")
    assert eval_textvqa.main(["--annotation-file", str(tmp_path / "ann.json"), "--result-dir", str(runs)]) == 0
    assert capsys.readouterr().out.split("\n") == [
        "a_run", "Samples: 1", "Accuracy: 100.00%", "", "b_run", "Samples: 1", "Accuracy: 0.00%", "",
        "Skipping notes.txt", ""]
    assert eval_textvqa.main(["--annotation-file", str(tmp_path / "ann.json")]) == 2
    assert "give --result-file or --result-dir" in capsys.readouterr().err


def test_mme_results_dir_underscore(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "count.txt").write_text("a.jpg\tq1\tYes\tyes\na.jpg\tq2\tNo\tyes\n")
    assert eval_mme.main(["--results_dir", str(tmp_path)]) == 0
    assert "count  score: 50.00 (acc 50.00, acc+ 0.00)" in capsys.readouterr().out


def _science_qa(tmp_path: Path) -> list[str]:
    problems = {"1": {"choices": ["x", "y", "z"], "answer": 2}, "2": {"choices": ["x", "y"], "answer": 1}}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1", "2"]}))
    (tmp_path / "r.jsonl").write_text(json.dumps({"question_id": "1", "prompt": "<image>\nq", "text": "Z"}) + "\n"
                                      + json.dumps({"question_id": "2", "prompt": "q", "text": "Y. y"}) + "\n")
    return ["--base-dir", str(tmp_path), "--result-file", str(tmp_path / "r.jsonl"),
            "--output-file", str(tmp_path / "o.json"), "--output-result", str(tmp_path / "s.json")]


def test_science_qa_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = _science_qa(tmp_path)
    assert eval_science_qa.main(argv) == 0  # letters A-E: "Z" and "Y. y" are failures
    assert "Total: 2, Correct: 0, Accuracy: 0.00%, IMG-Accuracy: 0.00%" in capsys.readouterr().out
    assert eval_science_qa.main(argv + ["--options", "XYZ"]) == 0  # LLaVA's type=list: one letter a character
    assert "Total: 2, Correct: 2, Accuracy: 100.00%, IMG-Accuracy: 100.00%" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.json").read_text())["correct"][0]["ground_truth"] == "Z"
    assert eval_science_qa.main(argv + ["--options", "XY"]) == 2  # answer 2 has no letter
    assert "answer 2 has no letter among the options" in capsys.readouterr().err


def _reviews(path: Path, pairs: list[list[int]], key: str = "tuple") -> None:
    path.write_text("".join(json.dumps({"question_id": i, key: pair}) + "\n" for i, pair in enumerate(pairs)))


def test_summarize_version_and_dir_with_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _reviews(tmp_path / "review_a_0613.jsonl", [[8, 4]])
    _reviews(tmp_path / "review_b.jsonl", [[5, 5]])
    _reviews(tmp_path / "c.jsonl", [[10, 5]], key="score")  # LLaVA reads `score` when there is no `tuple`
    assert summarize_gpt_review.main(["-d", str(tmp_path), "-v", "0613"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["review_a_0613", "all 50.0 80.0 40.0"]
    assert summarize_gpt_review.main(["-d", str(tmp_path), "-v", "0314"]) == 0
    assert capsys.readouterr().out.splitlines()[:2] == ["review_b", "all 100.0 50.0 50.0"]
    # -d with -f: the files are names inside -d, read in name order.
    assert summarize_gpt_review.main(["-d", str(tmp_path), "-f", "c.jsonl", "review_b.jsonl"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if not line.startswith(("all", "="))] == [
        "c", "review_b"]
    assert summarize_gpt_review.main(["-f"]) == 2
    assert "give -d DIR or -f FILE" in capsys.readouterr().err


def test_pope_prints_llavas_summary_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "coco_pope_random.json").write_text(
        "".join(json.dumps({"label": label}) + "\n" for label in ("yes", "yes", "no", "no")))
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question_id": i, "category": "random"}) + "\n"
                                              for i in range(4)))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"question_id": i, "text": t}) + "\n"
                                              for i, t in enumerate(["Yes.", "No, it is not", "Yes", "no"])))
    assert eval_pope.main(["--annotation-dir", str(tmp_path / "coco"), "--question-file", str(tmp_path / "q.jsonl"),
                           "--result-file", str(tmp_path / "r.jsonl")]) == 0
    # TP 1, FN 1, FP 1, TN 1: F1 0.5, accuracy 0.5, precision 0.5, recall 0.5, yes ratio 0.5.
    assert "0.500, 0.500, 0.500, 0.500, 0.500" in capsys.readouterr().out.splitlines()


def test_gqa_conversion_is_llavas(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"question_id": "q1", "text": "Left.."}) + "\n"
                   + json.dumps({"question_id": "q2", "text": "Yes. "}) + "\n")
    assert convert_gqa_for_eval.main(["--src", str(src), "--dst", str(tmp_path / "p.json")]) == 0
    # `text.rstrip('.').lower()`: a period before trailing whitespace stays.
    assert [p["prediction"] for p in json.loads((tmp_path / "p.json").read_text())] == ["left", "yes. "]


def test_sqa_convert_to_llava_default_format(tmp_path: Path) -> None:
    problem = {"question": "Which?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
               "lecture": "L", "solution": "S", "split": "test"}
    (tmp_path / "problems.json").write_text(json.dumps({"7": problem}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["7"]}))
    assert convert_sqa_to_llava.main(["convert_to_llava", "--base_dir", str(tmp_path), "--split", "test"]) == 0
    assert (tmp_path / "llava_test_QCM-LEA.json").is_file()  # LLaVA's convert_to_llava default
    assert convert_sqa_to_llava.main(["convert_to_jsonl", "--base_dir", str(tmp_path), "--split", "test"]) == 0
    assert (tmp_path / "scienceqa_test_QCM-LEPA.jsonl").is_file()
