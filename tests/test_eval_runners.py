"""LLaVA's evaluation runners end to end on the tiny checkpoint and a tiny generated benchmark: answer
format and order, batching, chunking, resume after an interruption, and bad input -> exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dynamic_llava.eval import model_vqa, model_vqa_loader, model_vqa_science
from dynamic_llava.eval.runner import get_chunk
from dynamic_llava.eval.model_vqa_science import SINGLE_PRED_PROMPT

ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
STATS = {"image_tokens_kept", "output_tokens_kept", "kv_cache_bytes"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three images and five questions (question ids deliberately mixed) in LLaVA's jsonl layout."""
    root = tmp_path_factory.mktemp("bench")
    (root / "images").mkdir()
    for name, color, size in [("red.png", (200, 30, 30), (64, 48)), ("green.jpg", (20, 180, 40), (40, 80)),
                              ("blue.png", (10, 20, 220), (100, 100))]:
        Image.new("RGB", size, color).save(root / "images" / name)
    rows = [(7, "red.png", "What color is this?"), (3, "green.jpg", "Is it green?"),
            ("q5", "blue.png", "Describe the picture."), (1, "red.png", "How many objects?"),
            (9, "green.jpg", "Answer with one word.")]
    (root / "questions.jsonl").write_text(
        "".join(json.dumps({"question_id": q, "image": i, "text": t, "category": "c"}) + "\n" for q, i, t in rows))
    return root


def _loader_args(model_dir: Path, bench: Path, answers: Path, *extra: str) -> list[str]:
    return ["--model-path", str(model_dir), "--image-folder", str(bench / "images"),
            "--question-file", str(bench / "questions.jsonl"), "--answers-file", str(answers),
            "--temperature", "0", "--conv-mode", "vicuna_v1", "--max_new_tokens", "6", "--device", "cpu",
            "--dtype", "float32", *extra]  # exact: batched and single runs must give the same answers


def _answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ids_texts(answers: list[dict]) -> list[tuple]:
    return [(a["question_id"], a["text"]) for a in answers]


@pytest.fixture(scope="module")
def reference(tiny_llava_dir: Path, bench: Path) -> list[dict]:
    """The uninterrupted single-chunk run at batch size 1."""
    answers = bench / "reference.jsonl"
    assert model_vqa_loader.main(_loader_args(tiny_llava_dir, bench, answers)) == 0
    return _answers(answers)


def test_get_chunk_splits_contiguously_and_evenly() -> None:
    items = list(range(10))
    chunks = [get_chunk(items, 4, k) for k in range(4)]
    assert chunks == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [get_chunk([1, 2], 3, k) for k in range(3)] == [[1], [2], []]


def test_loader_writes_one_answer_per_question_in_order(reference: list[dict], bench: Path) -> None:
    questions = [json.loads(line) for line in (bench / "questions.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in reference] == [q["question_id"] for q in questions]
    assert [a["prompt"] for a in reference] == [q["text"] for q in questions]
    for answer in reference:
        assert set(answer) == ANSWER_KEYS and STATS <= set(answer["metadata"])
        assert answer["model_id"] == "llava" and isinstance(answer["text"], str)
        assert answer["metadata"]["image_tokens_kept"] < answer["metadata"]["image_tokens"]
    assert len({a["answer_id"] for a in reference}) == len(reference)


def test_batching_gives_the_same_answers(tiny_llava_dir: Path, bench: Path, reference: list[dict],
                                         tmp_path: Path) -> None:
    answers = tmp_path / "bs3.jsonl"
    assert model_vqa_loader.main(_loader_args(tiny_llava_dir, bench, answers, "--batch-size", "3")) == 0
    batched = _answers(answers)
    assert _ids_texts(batched) == _ids_texts(reference)
    assert [a["metadata"] for a in batched] == [a["metadata"] for a in reference]


def test_chunks_concatenate_to_the_single_run(tiny_llava_dir: Path, bench: Path, reference: list[dict],
                                              tmp_path: Path) -> None:
    parts = []
    for idx in range(2):
        answers = tmp_path / "chunks" / f"2_{idx}.jsonl"  # the folder is created by the runner
        args = _loader_args(tiny_llava_dir, bench, answers, "--num-chunks", "2", "--chunk-idx", str(idx),
                            "--batch-size", "2")
        assert model_vqa_loader.main(args) == 0
        parts += _answers(answers)
    assert _ids_texts(parts) == _ids_texts(reference)


@pytest.mark.parametrize("cut", ["line", "partial"])
def test_resume_after_interruption(tiny_llava_dir: Path, bench: Path, reference: list[dict], tmp_path: Path,
                                   cut: str, capsys: pytest.CaptureFixture) -> None:
    answers = tmp_path / "answers.jsonl"
    lines = (bench / "reference.jsonl").read_text().splitlines(keepends=True)
    # interrupted after the first batch, or in the middle of writing the second line
    answers.write_text(lines[0] if cut == "line" else lines[0] + lines[1][:20])
    assert model_vqa_loader.main(_loader_args(tiny_llava_dir, bench, answers, "--batch-size", "2")) == 0
    resumed = _answers(answers)
    assert _ids_texts(resumed) == _ids_texts(reference)
    assert resumed[0] == reference[0]  # the finished line is kept as it was
    assert "1 of 5 questions already answered" in capsys.readouterr().err
    # a finished file: nothing more to do, nothing appended
    assert model_vqa_loader.main(_loader_args(tiny_llava_dir, bench, answers)) == 0
    assert _answers(answers) == resumed


def test_model_vqa_open_ended(tiny_llava_dir: Path, bench: Path, reference: list[dict], tmp_path: Path) -> None:
    answers = tmp_path / "llava_bench.jsonl"
    assert model_vqa.main(_loader_args(tiny_llava_dir, bench, answers, "--batch-size", "5")) == 0
    assert _ids_texts(_answers(answers)) == _ids_texts(reference)


def test_science_mixes_image_and_text_only_questions(tiny_llava_dir: Path, bench: Path, tmp_path: Path) -> None:
    rows = [{"id": "s1", "image": "red.png",
             "conversations": [{"from": "human", "value": "<image>\nWhich color?\nA. red\nB. blue"},
                               {"from": "gpt", "value": "A"}]},
            {"id": "s2", "conversations": [{"from": "human", "value": "Which is a mammal?\nA. cat\nB. fish"}]},
            {"id": "s3", "image": "blue.png",
             "conversations": [{"from": "human", "value": "Which color?\nA. red\nB. blue\n<image>"}]}]
    questions = tmp_path / "llava_test.json"
    questions.write_text(json.dumps(rows))
    runs = []
    for batch_size in ("1", "3"):
        answers = tmp_path / f"science_{batch_size}.jsonl"
        args = ["--model-path", str(tiny_llava_dir), "--image-folder", str(bench / "images"),
                "--question-file", str(questions), "--answers-file", str(answers), "--single-pred-prompt",
                "--conv-mode", "vicuna_v1", "--max_new_tokens", "4", "--batch-size", batch_size, "--device", "cpu"]
        assert model_vqa_science.main(args) == 0
        runs.append(_answers(answers))
    assert _ids_texts(runs[0]) == _ids_texts(runs[1])
    first, text_only, last = runs[0]
    assert [a["question_id"] for a in runs[0]] == ["s1", "s2", "s3"]
    assert first["prompt"] == f"<image>\nWhich color?\nA. red\nB. blue\n{SINGLE_PRED_PROMPT}"
    assert last["prompt"].startswith("<image>\nWhich color?") and last["prompt"].count("<image>") == 1
    assert text_only["prompt"] == f"Which is a mammal?\nA. cat\nB. fish\n{SINGLE_PRED_PROMPT}"
    assert text_only["metadata"]["image_tokens"] == 0 and first["metadata"]["image_tokens"] > 0


def test_bad_input_exits_2_with_one_message(tiny_llava_dir: Path, bench: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    answers = tmp_path / "answers.jsonl"
    missing = _loader_args(tiny_llava_dir, bench, answers)
    missing[missing.index("--question-file") + 1] = str(tmp_path / "nope.jsonl")
    assert model_vqa_loader.main(missing) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: question file not found") and err.count("\n") == 1

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"question_id": 1, "image": "gone.png", "text": "?"}) + "\n")
    args = _loader_args(tiny_llava_dir, bench, answers)
    args[args.index("--question-file") + 1] = str(broken)
    assert model_vqa_loader.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: image file not found") and "gone.png" in err and err.count("\n") == 1
    assert not answers.exists()

    assert model_vqa_loader.main(_loader_args(tiny_llava_dir, bench, answers, "--num-chunks", "2",
                                              "--chunk-idx", "2")) == 2
    assert capsys.readouterr().err.startswith("error: --chunk-idx must be in [0, 2)")
