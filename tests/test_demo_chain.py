"""`dynamic-llava demo train --quick`: the whole chain (data, start model, stages 1-3, evaluation) end to end
at toy size; every stage's output loads and the summary holds what the demo reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dynamic_llava.cli import main as cli_main
from dynamic_llava.data.questions import SHORT_ANSWER_TYPES
from dynamic_llava.eval.io import read_jsonl
from dynamic_llava.model.loading import load_pretrained_model


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "chain"
    assert cli_main(["demo", "train", "--out", str(out), "--quick", "--seed", "0"]) == 0
    return out


def test_every_stage_output_exists_and_loads(chain: Path) -> None:
    data = chain / "data"
    for name in ("stats.json", "train/pretrain.json", "train/instruct.json", "test/questions.jsonl",
                 "test/answers.jsonl"):
        assert (data / name).is_file(), name
    assert (chain / "start" / "config.json").is_file() and (chain / "start" / "vision_tower").is_dir()
    # stage 1: the projector over the start LLM
    _, aligned, _, _ = load_pretrained_model(chain / "stage1", model_base=chain / "start", sparse=False)
    assert aligned.model.mm_projector is not None
    # stage 2: a dense LLaVA carrying its trained tower
    _, dense, processor, _ = load_pretrained_model(chain / "stage2", sparse=False)
    assert (chain / "stage2" / "vision_tower" / "model.safetensors").is_file()
    assert processor.crop_size["height"] == dense.model.vision_tower.vision_tower.config.image_size
    assert "sparse_config" not in json.loads((chain / "stage2" / "config.json").read_text())
    # stage 3: a Dynamic-LLaVA checkpoint with the paper's keep rates
    _, sparse, _, _ = load_pretrained_model(chain / "stage3")
    assert sparse.sparse.vision_keep_rate == 0.2 and sparse.sparse.output_text_keep_rate == 0.5
    assert any("image_score_predictor" in name for name, _ in sparse.named_parameters())


def test_summary_has_per_type_accuracies_and_stage_times(chain: Path) -> None:
    summary = json.loads((chain / "summary.json").read_text())
    for model in ("dense", "dynamic_llava"):
        per_type = summary[model]["per_type"]
        assert set(per_type) == set(SHORT_ANSWER_TYPES)
        assert all(0.0 <= row["accuracy"] <= 1.0 for row in per_type.values())
        assert 0.0 <= summary[model]["overall"]["accuracy"] <= 1.0
    assert set(summary["majority_baseline_test"]) == {*SHORT_ANSWER_TYPES, "overall"}
    assert {"data", "start", "stage1", "stage2", "stage3", "eval_dense", "eval_sparse"} <= set(summary["timings"])


def test_the_sparse_model_keeps_a_fifth_of_the_image_tokens(chain: Path) -> None:
    sparse = read_jsonl(chain / "eval" / "dynamic" / "answers.jsonl")
    dense = read_jsonl(chain / "eval" / "dense" / "answers.jsonl")
    assert sparse and len(sparse) == len(dense)
    for row in sparse:
        stats = row["metadata"]
        assert stats["image_tokens_kept"] == math.floor(0.2 * stats["image_tokens"] + 1e-6)
    assert all(row["metadata"]["image_tokens_kept"] == row["metadata"]["image_tokens"] for row in dense)
    summary = json.loads((chain / "summary.json").read_text())
    assert summary["dynamic_llava"]["image_tokens_kept"] == pytest.approx(0.2, abs=0.02)
    assert summary["dense"]["image_tokens_kept"] == 1.0
