"""The seed's evaluation commands (`bash run/dynamic_eval/eval_for_{vqav2,gqa}.sh`, which run
scripts/eval/{vqav2,gqa}.sh) end to end on the tiny checkpoint: 2 CPU chunks, merge, converters, scorer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPTS = Path(__file__).resolve().parents[1] / "run" / "dynamic_eval"
QUESTIONS = [(11, "a.png", "What color?"), (12, "b.png", "Is it blue?"), (13, "a.png", "What is it?")]


def _run(script: str, model_dir: Path, evaldir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL": str(model_dir), "CKPT": "tiny", "EVALDIR": str(evaldir), "CHUNKS": "2",
           "DEVICES": "cpu", "EXTRA_ARGS": "--max_new_tokens 3",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(SCRIPTS / script)], env=env, capture_output=True, text=True, timeout=300)


def _write_questions(path: Path) -> None:
    path.write_text("".join(json.dumps({"question_id": q, "image": i, "text": t}) + "\n" for q, i, t in QUESTIONS))


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    Image.new("RGB", (32, 32), (220, 20, 20)).save(folder / "a.png")
    Image.new("RGB", (32, 48), (20, 20, 220)).save(folder / "b.png")


@pytest.mark.parametrize("script", ["eval_for_vqav2.sh", "eval_for_gqa.sh"])
def test_script_end_to_end(script: str, tiny_llava_dir: Path, tmp_path: Path) -> None:
    if script == "eval_for_vqav2.sh":
        split = "llava_vqav2_mscoco_test-dev2015"
        _write_images(tmp_path / "test2015")
        _write_questions(tmp_path / f"{split}.jsonl")
        _write_questions(tmp_path / "llava_vqav2_mscoco_test2015.jsonl")
    else:
        split = "llava_gqa_testdev_balanced"
        _write_images(tmp_path / "data" / "images")
        _write_questions(tmp_path / f"{split}.jsonl")
        (tmp_path / "data" / "testdev_balanced_questions.json").write_text(
            json.dumps({str(q): {"answer": "red"} for q, _, _ in QUESTIONS}))
    result = _run(script, tiny_llava_dir, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    merged = tmp_path / "answers" / split / "tiny" / "merge.jsonl"
    assert [json.loads(line)["question_id"] for line in merged.read_text().splitlines()] == [11, 12, 13]
    if script == "eval_for_vqav2.sh":
        upload = json.loads((tmp_path / "answers_upload" / split / "tiny.json").read_text())
        assert [u["question_id"] for u in upload] == [11, 12, 13]
    else:
        predictions = json.loads((tmp_path / "data" / "testdev_balanced_predictions.json").read_text())
        assert [p["questionId"] for p in predictions] == [11, 12, 13]
        assert "Accuracy:" in result.stdout
