"""The interactive chat command (a real process reading stdin) and the serving commands' flag errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dynamic_llava.serve import controller, load_test, model_worker, openai_api
from dynamic_llava.serve import cli as chat_cli
from serve_helpers import REPO

SAMPLE = REPO / "dynamic_llava" / "assets" / "sample.png"


def _chat(tiny: Path, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynamic_llava.serve.cli", "--model-path", str(tiny), *flags],
                          input=stdin, capture_output=True, text=True, cwd=REPO, timeout=180)


def test_two_turn_chat_streams_answers_and_reuses_the_cache(tiny_llava_dir: Path) -> None:
    run = _chat(tiny_llava_dir, "What is in the image?\nWhy?\n", "--image-file", str(SAMPLE), "--temperature", "0",
                "--max-new-tokens", "5")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("ASSISTANT: ") == 2 and run.stdout.count("USER: ") == 3  # the third one meets EOF
    stats = re.findall(r"\[(\d+) new tokens prefilled after (\d+) cached; image tokens kept (\d+)/(\d+)", run.stderr)
    stats += re.findall(r"\[(\d+) new tokens prefilled after (\d+) cached; generated", run.stderr)
    first, second = stats[0], stats[1]
    assert first[1] == "0" and first[2:] == ("115", "576")  # turn 1: the image, sparsified
    new, cached = int(second[0]), int(second[1])
    assert cached > int(first[0]) and new < 20  # turn 2 prefills only its own tokens after the cached ones
    assert "Traceback" not in run.stderr


def test_an_empty_line_ends_the_chat(tiny_llava_dir: Path) -> None:
    run = _chat(tiny_llava_dir, "Hello\n\nnot asked\n", "--temperature", "0", "--max-new-tokens", "2")
    assert run.returncode == 0 and run.stdout.count("ASSISTANT: ") == 1


@pytest.mark.parametrize("main, argv, message", [
    (chat_cli.main, ["--model-path", "x", "--image-file", "/no/such.png"], "image file not found"),
    (chat_cli.main, ["--model-path", "x", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (chat_cli.main, ["--model-path", "x", "--conv-mode", "nope"], "unknown conversation template"),
    (model_worker.main, ["--model-path", "x", "--host", "0.0.0.0"], "--worker http://<this machine's address>"),
    (model_worker.main, ["--model-path", "x", "--num-gpus", "0"], "--num-gpus must be >= 1"),
    (model_worker.main, ["--model-path", "x", "--num-gpus", "2", "--device", "cpu"], "leave --device unset or cuda"),
    (model_worker.main, ["--model-path", "x", "--max-queue", "0"], "must be >= 1"),
    (model_worker.main, ["--model-path", "/no/such/checkpoint"], "/no/such/checkpoint"),
    (openai_api.main, ["--model-path", "x", "--conv-mode", "nope"], "unknown conversation template"),
    (openai_api.main, ["--model-path", "x", "--max-image-bytes", "0"], "--max-image-bytes"),
    (controller.main, ["--heart-beat-expiration", "0"], "--heart-beat-expiration"),
    (load_test.main, ["--model", "m", "--requests", "0"], "--requests"),
    (load_test.main, ["--model", "m", "--image-file", "/no/such.png"], "cannot read --image-file"),
])
def test_bad_flags_exit_2_with_one_message(main, argv, message, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
