"""Session-wide tiny checkpoints in the real on-disk layouts, built once by the project's own factory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Everything runs offline: nothing may try to reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dynamic_llava.tiny.checkpoint import make_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dynamic-LLaVA checkpoint (LLaVA layout with `sparse_config` and predictor weights), seed 0."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava", fmt="llava", seed=0)


@pytest.fixture(scope="session")
def tiny_llava_nopred_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain LLaVA-1.5 checkpoint (no predictors, no `sparse_config`), seed 0."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava_nopred", predictors=False, seed=0)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed-0 Dynamic-LLaVA checkpoint in the llava-hf layout."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", fmt="hf", seed=0)


@pytest.fixture(autouse=True)
def pil_refuses_truncated_images() -> None:
    """PIL's default, which importing lmms-eval (tests/test_lmms_eval.py) turns off for the whole process."""
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
