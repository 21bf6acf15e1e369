"""Our own calls trigger none of transformers' deprecation messages: loading (both layouts), one training step
with gradient checkpointing (LLaVA's --gradient_checkpointing flag), and exporting a checkpoint."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import transformers
from PIL import Image

from dynamic_llava.demo.export import export_model
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.train.train import train


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def no_transformers_deprecations() -> Iterator[None]:
    """Deprecation and future warnings raised from transformers become errors; its logged deprecation notices
    (logger.warning_once, e.g. for config.torch_dtype) fail the test too."""
    transformers.utils.logging.warning_once.cache_clear()  # notices already given this session count again
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning):
                warnings.filterwarnings("error", category=category, module="transformers")
            yield
    finally:
        logger.removeHandler(handler)
    deprecated = [m for m in handler.messages if "deprecat" in m.lower()]
    assert not deprecated, deprecated


def test_the_guard_catches_what_it_is_meant_to_catch() -> None:
    config = transformers.LlamaConfig()
    with pytest.raises(AssertionError, match="torch_dtype"):
        with no_transformers_deprecations():
            config.torch_dtype = "float32"  # the deprecated attribute: a logged notice
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    if hasattr(model, "activation_checkpointing_enable"):  # transformers versions that renamed it
        with pytest.raises(FutureWarning):
            with no_transformers_deprecations():
                model.gradient_checkpointing_enable()


def test_loading_training_and_export_raise_no_deprecation(tiny_llava_dir: Path, tiny_hf_dir: Path,
                                                          tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    records = []
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (40, 30), colour).save(tmp_path / "img" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"It is {colour}."}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    with no_transformers_deprecations():
        load_pretrained_model(tiny_llava_dir)
        load_pretrained_model(tiny_hf_dir, dtype="auto")
        trainer = train(["--model_name_or_path", str(tiny_llava_dir), "--version", "v1",
                         "--data_path", str(tmp_path / "data.json"), "--image_folder", str(tmp_path / "img"),
                         "--output_dir", str(tmp_path / "out"), "--image_aspect_ratio", "pad",
                         "--per_device_train_batch_size", "2", "--max_steps", "1", "--report_to", "none",
                         "--save_strategy", "no", "--dataloader_num_workers", "0", "--model_max_length", "256",
                         "--gradient_checkpointing", "True"], sparse=True)
        export_model(tiny_llava_dir, tmp_path / "export")
    assert trainer.state.global_step == 1
    assert trainer.core_model.model.gradient_checkpointing  # the flag still turns checkpointing on
    assert json.loads((tmp_path / "export" / "config.json").read_text())["torch_dtype"] == "bfloat16"
