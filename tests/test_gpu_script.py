"""scripts/gpu_check.sh: valid bash, and without CUDA it says so, writes its log and fails fast."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def _path_without_nvidia_smi(extra: Path | None = None) -> str:
    """The current PATH less every folder holding an nvidia-smi (and the venv's python first)."""
    folders = [str(Path(sys.executable).parent)] + os.environ.get("PATH", "").split(os.pathsep)
    kept = [f for f in folders if f and not (Path(f) / "nvidia-smi").exists()]
    return os.pathsep.join(([str(extra)] if extra else []) + kept)


def _run(out: Path, path: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PATH": path, "PYTHON": sys.executable}
    began = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - began


def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_without_nvidia_smi_it_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    path = _path_without_nvidia_smi()
    assert shutil.which("nvidia-smi", path=path) is None
    done, seconds = _run(tmp_path / "out", path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert seconds < 20
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "no CUDA: nvidia-smi is not on PATH" in log and "no CUDA" in done.stdout
    assert "cuda absent" in (tmp_path / "out" / "summary.txt").read_text()
    assert "== install" not in log  # nothing installed or run


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA path of torch")
def test_with_nvidia_smi_but_no_cuda_in_torch_it_stops_before_installing(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI (fake)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    done, seconds = _run(tmp_path / "out", _path_without_nvidia_smi(fake))
    assert done.returncode == 3, done.stdout + done.stderr
    assert seconds < 60
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "NVIDIA-SMI (fake)" in log and "torch" in log and "cuda available: False" in log
    assert "no CUDA: torch.cuda.is_available() is False" in log
    assert "== install" not in log
