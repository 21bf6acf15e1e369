"""Registers `--model dynamic_llava` with lmms-eval through its entry-point group `lmms_eval.models`
(declared in pyproject.toml). Kept apart from `lmms_eval_model` because lmms-eval loads every entry point
at start-up: the model code is imported only when the model is actually used."""

from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    return ModelManifest(model_id="dynamic_llava",
                         simple_class_path="dynamic_llava.eval.lmms_eval_model.DynamicLlava")
