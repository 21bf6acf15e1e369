"""MMBench runner on a tiny generated TSV (base64 images, empty options and hints, circular rounds)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from dynamic_llava.eval import model_vqa_mmbench
from dynamic_llava.eval.io import read_tsv
from dynamic_llava.eval.model_vqa_mmbench import SINGLE_PRED_PROMPTS

COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]


def _b64_png(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three questions: 4 options with a multi-line hint, 2 options without a hint, 3 options."""
    path = tmp_path_factory.mktemp("mmbench") / "mmbench_dev.tsv"
    rows = [[10, "What color?", "Look closely.\nIt is bright.", "red", "green", "blue", "black", "A", "color",
             _b64_png((200, 20, 20))],
            [11, "Is it a square?", "", "yes", "no", "", "", "B", "shape", _b64_png((20, 200, 20))],
            [12, "Which one?", "nan", "x", "y", "z", "", "C", "misc", _b64_png((20, 20, 200))]]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
    return path


def _args(model_dir: Path, tsv: Path, answers: Path, *extra: str) -> list[str]:
    return ["--model-path", str(model_dir), "--question-file", str(tsv), "--answers-file", str(answers),
            "--conv-mode", "vicuna_v1", "--max_new_tokens", "3", "--device", "cpu", *extra]


def _answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompts_and_rounds_without_the_model(tsv: Path) -> None:
    rows = read_tsv(tsv, model_vqa_mmbench.COLUMNS)
    rounds = model_vqa_mmbench.row_questions(rows[0], all_rounds=True, suffix=SINGLE_PRED_PROMPTS["cn"])
    assert [q.extra["round_id"] for q in rounds] == [0, 1, 2, 3]
    assert rounds[0].extra["prompt"] == "Look closely.\nIt is bright.\nWhat color?\nA. red\nB. green\nC. blue\nD. black"
    assert rounds[1].extra["prompt"].endswith("\nA. green\nB. blue\nC. black\nD. red")
    assert rounds[1].extra["option_char"] == ["B", "C", "D", "A"]
    assert rounds[1].extra["options"] == ["green", "blue", "black", "red"]
    assert rounds[0].text == rounds[0].extra["prompt"] + "\n请直接回答选项字母。"
    assert all(q.question_id == 10 and q.image_data == rows[0]["image"] for q in rounds)
    two = model_vqa_mmbench.row_questions(rows[1], all_rounds=False, suffix=None)
    assert len(two) == 1 and two[0].text == "Is it a square?\nA. yes\nB. no"
    three = model_vqa_mmbench.row_questions(rows[2], all_rounds=True, suffix=None)
    assert len(three) == 3 and three[0].text == "Which one?\nA. x\nB. y\nC. z"


def test_all_rounds_answers_chunks_and_resume(tiny_llava_dir: Path, tsv: Path, tmp_path: Path) -> None:
    answers = tmp_path / "all.jsonl"
    args = _args(tiny_llava_dir, tsv, answers, "--all-rounds", "--single-pred-prompt", "--batch-size", "4")
    assert model_vqa_mmbench.main(args) == 0
    full = _answers(answers)
    assert [(a["question_id"], a["round_id"]) for a in full] == \
        [(10, 0), (10, 1), (10, 2), (10, 3), (11, 0), (11, 1), (12, 0), (12, 1), (12, 2)]
    keys = {"question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id", "model_id",
            "metadata"}
    assert all(set(a) == keys for a in full)
    assert full[5]["option_char"] == ["B", "A"] and full[5]["prompt"] == "Is it a square?\nA. no\nB. yes"
    assert full[0]["metadata"]["image_tokens"] > 0

    # chunks split by question (all rounds of a question in one chunk) and concatenate to the full run
    parts = []
    for idx in range(2):
        part = tmp_path / f"chunk{idx}.jsonl"
        assert model_vqa_mmbench.main(args[:5] + [str(part)] + args[6:]
                                      + ["--num-chunks", "2", "--chunk-idx", str(idx)]) == 0
        parts.append(_answers(part))
    assert {a["question_id"] for a in parts[0]} == {10, 11} and {a["question_id"] for a in parts[1]} == {12}
    texts = [(a["question_id"], a["round_id"], a["text"]) for a in full]
    assert [(a["question_id"], a["round_id"], a["text"]) for a in parts[0] + parts[1]] == texts

    # resume: rounds already answered are kept, the missing ones (same question ids) are added
    resumed = tmp_path / "resumed.jsonl"
    resumed.write_text("".join(json.dumps(a) + "\n" for a in full[:2]))
    assert model_vqa_mmbench.main(args[:5] + [str(resumed)] + args[6:]) == 0
    assert [(a["question_id"], a["round_id"], a["text"]) for a in _answers(resumed)] == texts


def test_bad_tsv_exits_2(tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tquestion\n1\twhat?\n")
    assert model_vqa_mmbench.main(_args(tiny_llava_dir, bad, tmp_path / "a.jsonl")) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "a.jsonl").exists()
