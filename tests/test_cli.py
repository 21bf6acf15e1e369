"""The `dynamic-llava` command: ask end to end on a tiny checkpoint, and bad input -> one message, exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynamic_llava.cli import main
from dynamic_llava.eval import run_llava
from dynamic_llava.visualize import kept_patches_overlay

SAMPLE = Path(__file__).resolve().parents[1] / "dynamic_llava" / "assets" / "sample.png"


def _ask(model_dir: Path, *extra: str) -> list[str]:
    return ["ask", "--model-path", str(model_dir), "--image-file", str(SAMPLE), "--query", "What is here?",
            "--max-new-tokens", "8", "--temperature", "0", *extra]


def test_ask_json_reports_sparsity(tiny_llava_dir: Path, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    mask = tmp_path / "mask.png"
    assert main(_ask(tiny_llava_dir, "--json", "--save-mask", str(mask))) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("answer", "image_tokens", "image_tokens_kept", "output_tokens", "output_tokens_kept",
                "kv_cache_bytes", "kv_cache_bytes_dense", "prefill_seconds", "decode_seconds"):
        assert key in out
    assert out["image_tokens"] == 576 and out["image_tokens_kept"] == 115
    assert out["kv_cache_bytes"] < out["kv_cache_bytes_dense"]
    picture = np.asarray(Image.open(mask).convert("RGB"), dtype=np.int16)
    assert picture.shape == (336, 336, 3)
    # exactly the kept patches are unchanged from the tower's view of the image; the rest are greyed
    view = np.asarray(kept_patches_overlay(Image.open(SAMPLE), [True] * 576, "pad",
                                           background=(122, 116, 104)), dtype=np.int16)
    cells = (picture == view).all(-1).reshape(24, 14, 24, 14).all(axis=(1, 3))
    assert int(cells.sum()) == 115


def test_ask_vision_keep_rate_and_no_sparse(tiny_llava_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_ask(tiny_llava_dir, "--json", "--vision-keep-rate", "0.5")) == 0
    half = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert half["image_tokens_kept"] == 288
    assert main(_ask(tiny_llava_dir, "--json", "--no-sparse")) == 0
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dense["image_tokens_kept"] == 576
    assert dense["kv_cache_bytes"] == dense["kv_cache_bytes_dense"]


def test_ask_with_baseline_policies(tiny_llava_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_ask(tiny_llava_dir, "--json", "--vision-policy", "fastv", "--sparse-layer", "3",
                     "--vision-keep-rate", "0.1", "--output-policy", "structure")) == 0
    fastv = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert fastv["image_tokens_kept"] == 57
    assert main(_ask(tiny_llava_dir, "--json", "--vision-policy", "random", "--no-output-sparsity")) == 0
    random_run = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert random_run["image_tokens_kept"] == 115
    assert main(_ask(tiny_llava_dir, "--json", "--no-sparse")) == 0
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert random_run["output_tokens_kept"] == dense["output_tokens_kept"]  # every generated token kept
    with pytest.raises(SystemExit) as exit_info:
        main(_ask(tiny_llava_dir, "--vision-policy", "h2o"))
    assert exit_info.value.code == 2


def test_ask_streams_plain_text_and_run_llava_agrees(tiny_llava_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(_ask(tiny_llava_dir)) == 0
    plain = capsys.readouterr().out
    assert run_llava.main(_ask(tiny_llava_dir)[1:]) == 0
    assert capsys.readouterr().out == plain
    assert main(_ask(tiny_llava_dir, "--json")) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"] == plain.strip()


def _fails(argv: list[str], capsys: pytest.CaptureFixture, *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in err


def test_bad_inputs_exit_2(tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mask = tmp_path / "never.png"
    missing = tmp_path / "missing.png"
    args = _ask(tiny_llava_dir, "--save-mask", str(mask))
    _fails([*args[:4], str(missing), *args[5:]], capsys, str(missing))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _fails([*args[:4], str(corrupt), *args[5:]], capsys, str(corrupt))
    _fails(_ask(tiny_llava_dir, "--conv-mode", "nope"), capsys, "nope")
    two = _ask(tiny_llava_dir)
    two[two.index("--query") + 1] = "<image> and <image>: what differs?"
    _fails(two, capsys, "placeholder")
    _fails(_ask(tiny_llava_dir, "--max-new-tokens", "100000"), capsys, "context")
    _fails(_ask(tiny_llava_dir, "--save-mask", str(tmp_path / "no" / "dir" / "m.png")), capsys, "does not exist")
    assert not mask.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(_ask(tiny_llava_dir, "--vision-keep-rate", "1.5"))
    assert exit_info.value.code == 2


def test_bad_checkpoints_exit_2(tiny_llava_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(_ask(empty), capsys, str(empty))
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_llava_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    config["model_type"] = "bert"
    (unknown / "config.json").write_text(json.dumps(config))
    _fails(_ask(unknown), capsys, "bert")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tiny_llava_dir, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json"))
    _fails(_ask(no_weights), capsys, str(no_weights))


def test_entry_point_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "dynamic_llava.cli", "ask", "--model-path", str(tmp_path),
                           "--query", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_make_tiny_and_convert_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tiny"
    assert main(["make-tiny", str(out), "--seed", "1"]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.model").exists()
    _fails(["make-tiny", str(out)], capsys, "not empty")
    hf = tmp_path / "hf"
    assert main(["convert", str(out), str(hf), "--to", "hf"]) == 0
    assert json.loads((hf / "config.json").read_text())["model_type"] == "llava"
    _fails(["convert", str(tmp_path / "nothing"), str(tmp_path / "dst"), "--to", "hf"], capsys, "nothing")
    assert not (tmp_path / "dst").exists()


def test_ask_gives_the_same_answer_from_both_layouts(tiny_llava_dir: Path, tiny_hf_dir: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    answers = []
    for model_dir in (tiny_llava_dir, tiny_hf_dir):
        assert main(_ask(model_dir, "--json")) == 0
        answers.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert answers[0]["answer"] and answers[0]["answer"] == answers[1]["answer"]
    assert answers[0]["image_tokens_kept"] == answers[1]["image_tokens_kept"] == 115
