"""Generation ability: teacher-forced NLL through the compressed cache, dense PPL, the CLI's output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dynamic_llava.eval.generation_ability import main, teacher_forced_nll
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.model.policy import SparsityOptions, make_policy
from dynamic_llava.prompting import prepare_request

ANSWER_IDS = [5, 17, 9, 23, 11, 30]


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir: Path):
    return load_pretrained_model(tiny_llava_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("genability")
    (root / "images").mkdir()
    lines = []
    for i, color in enumerate(["red", "navy"]):
        Image.new("RGB", (40 + 10 * i, 32), color).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"question_id": i, "image": f"{i}.png", "text": f"Describe picture {i}.",
                                 "answer": "A plain square of one colour with nothing else in it."}))
    (root / "q.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _request(loaded, data: Path):
    tokenizer, model, image_processor, _ = loaded
    return prepare_request("Describe it.", [data / "images" / "0.png"], tokenizer, image_processor,
                           model.config, "llava_v1")


def test_cache_path_equals_recomputing_without_cache_in_sparse_mode(loaded, data: Path) -> None:
    _, model, _, _ = loaded
    assert make_policy(model).output_rule == "predictor"
    request = _request(loaded, data)
    nlls, keeps, held = teacher_forced_nll(model, request.input_ids, request.pixel_values, ANSWER_IDS)
    assert len(nlls) == 6 and len(keeps) == 5
    assert held == sum(keeps)  # the predictor's kept tokens are exactly what the sparse cache holds
    with torch.inference_mode():
        for n, target in enumerate(ANSWER_IDS):
            ids = torch.cat([request.input_ids, torch.tensor(ANSWER_IDS[:n], dtype=torch.long)])
            batch = model.embed([ids], [request.pixel_values], generated_counts=[n])
            out = model.step(batch, model.new_cache(1), make_policy(model))
            expected = -float(torch.log_softmax(out.logits[0].float(), -1)[target])
            assert nlls[n] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_dense_ppl_equals_full_forward_cross_entropy(loaded, data: Path) -> None:
    _, model, _, _ = loaded
    dense = SparsityOptions(sparse=False)
    request = _request(loaded, data)
    nlls, _, _ = teacher_forced_nll(model, request.input_ids, request.pixel_values, ANSWER_IDS,
                                    make_policy(model, dense))
    ids = torch.cat([request.input_ids, torch.tensor(ANSWER_IDS, dtype=torch.long)])
    with torch.inference_mode():
        logits = model.forward_full([ids], [request.pixel_values], make_policy(model, dense)).logits[0].float()
    n_prompt = logits.shape[0] - len(ANSWER_IDS)
    ce = torch.nn.functional.cross_entropy(logits[n_prompt - 1:-1], torch.tensor(ANSWER_IDS))
    assert math.exp(sum(nlls) / len(nlls)) == pytest.approx(math.exp(float(ce)), rel=1e-5)


def test_cli_writes_sparse_and_dense_results(tiny_llava_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    assert main(["--model-path", str(tiny_llava_dir), "--question-file", str(data / "q.jsonl"),
                 "--image-folder", str(data / "images"), "--output", str(out), "--max-new-tokens", "8",
                 "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"model_path", "meteor_note", "summary", "samples"}
    assert set(result["summary"]) == {"sparse", "dense"}
    for summary in result["summary"].values():
        assert summary["samples"] == 2 and summary["ppl"] > 1
        assert 0 <= summary["output_tokens_kept"] <= summary["output_tokens"] <= 16
        if summary["meteor"] is not None:
            assert 0 <= summary["meteor"] <= 1
    assert result["summary"]["dense"]["output_tokens_kept"] == result["summary"]["dense"]["output_tokens"] - 2
    assert result["summary"]["sparse"]["kv_cache_bytes"] < result["summary"]["sparse"]["kv_cache_bytes_dense"]
    assert [s["question_id"] for s in result["samples"]] == [0, 1]


@pytest.mark.parametrize("line, message", [
    ({"question_id": 0, "image": "0.png", "text": "q"}, "answer"),
    ({"question_id": 0, "image": "missing.png", "text": "q", "answer": "a"}, "image file not found"),
])
def test_bad_input_exits_2(tiny_llava_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                           line: dict, message: str) -> None:
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps(line) + "\n")
    assert main(["--model-path", str(tiny_llava_dir), "--question-file", str(questions), "--image-folder",
                 str(data / "images"), "--output", str(tmp_path / "o.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
