"""The data-parallel launcher: two CPU chunk processes merge to the single-process answers; failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dynamic_llava.eval import launch, model_vqa_loader


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("launch")
    Image.new("RGB", (48, 32), (200, 40, 40)).save(root / "red.png")
    Image.new("RGB", (32, 64), (40, 40, 200)).save(root / "blue.png")
    rows = [(4, "red.png", "What color?"), ("b", "blue.png", "Is it blue?"), (2, "red.png", "Describe it."),
            (8, "blue.png", "One word.")]
    (root / "questions.jsonl").write_text(
        "".join(json.dumps({"question_id": q, "image": i, "text": t}) + "\n" for q, i, t in rows))
    return root


def _runner_args(model_dir: Path, bench: Path) -> list[str]:
    return ["--model-path", str(model_dir), "--image-folder", str(bench), "--question-file",
            str(bench / "questions.jsonl"), "--conv-mode", "vicuna_v1", "--max_new_tokens", "4"]


def _answers(path: Path) -> list[tuple]:
    return [(a["question_id"], a["prompt"], a["text"], a["metadata"])
            for a in map(json.loads, path.read_text().splitlines())]


def test_two_cpu_chunks_equal_a_single_run(tiny_llava_dir: Path, bench: Path, tmp_path: Path) -> None:
    single = tmp_path / "single.jsonl"
    assert model_vqa_loader.main(_runner_args(tiny_llava_dir, bench) + ["--answers-file", str(single),
                                                                         "--device", "cpu"]) == 0
    merged = tmp_path / "out" / "merge.jsonl"
    assert launch.main(["--runner", "model_vqa_loader", "--num-chunks", "2", "--devices", "cpu,cpu",
                        "--answers-file", str(merged), "--", *_runner_args(tiny_llava_dir, bench)]) == 0
    assert _answers(merged) == _answers(single)
    assert [len(_answers(launch.chunk_file(merged, i))) for i in range(2)] == [2, 2]


def test_a_failing_chunk_is_reported_and_nothing_merged(tiny_llava_dir: Path, bench: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    merged = tmp_path / "merge.jsonl"
    args = _runner_args(tiny_llava_dir, bench)
    args[args.index("--question-file") + 1] = str(tmp_path / "missing.jsonl")
    assert launch.main(["--num-chunks", "2", "--devices", "cpu", "--answers-file", str(merged), "--", *args]) == 1
    err = capsys.readouterr().err
    assert "chunk 0 on cpu (exit code 2); chunk 1 on cpu (exit code 2) failed" in err
    assert not merged.exists()


def test_launcher_flags_in_runner_args_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert launch.main(["--num-chunks", "2", "--devices", "cpu", "--answers-file", str(tmp_path / "m.jsonl"),
                        "--", "--model-path", "x", "--chunk-idx=1"]) == 2
    assert capsys.readouterr().err.startswith("error: --chunk-idx=1: set by the launcher")
