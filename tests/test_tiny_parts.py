"""Tests for the model-independent parts of the tiny-checkpoint factory (tokenizer, CLIP tower)."""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel

from dynamic_llava.tiny.tokenizer import train_tiny_tokenizer
from dynamic_llava.tiny.vision_tower import write_tiny_clip_tower


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tower")
    write_tiny_clip_tower(out, seed=0)
    return out


def test_tokenizer_is_deterministic(tokenizer_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    train_tiny_tokenizer(tmp_path)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes()


def test_tokenizer_has_llama_special_ids(tokenizer_dir: pathlib.Path) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert len(tok) == 1000
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token is None
    assert tok.padding_side == "right" and tok.model_max_length == 2048
    ids = tok("hello world").input_ids
    assert ids[0] == 1 and 2 not in ids
    assert tok("hello world", add_special_tokens=False).input_ids == ids[1:]


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "A chat between a curious user and an artificial intelligence assistant. USER: <image>\nHi? ASSISTANT:",
        "Zürich 東京 🙂 naïve — ∑ x² ok\ttab",
        "12345 + 0.75 = ???",
    ],
)
def test_tokenizer_round_trips(tokenizer_dir: pathlib.Path, text: str) -> None:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    ids = tok(text).input_ids
    assert 0 not in ids, "byte fallback should leave nothing unknown"
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tower_loads_with_expected_shapes(tower_dir: pathlib.Path) -> None:
    model, info = CLIPVisionModel.from_pretrained(tower_dir, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    for key, value in load_file(tower_dir / "model.safetensors").items():
        # transformers v5 flattens CLIPVisionModel (no `vision_model.` level); older versions keep it.
        assert torch.equal(loaded.get(key, loaded.get(key.removeprefix("vision_model."))), value)
    processor = CLIPImageProcessor.from_pretrained(tower_dir, local_files_only=True)
    assert processor.crop_size["height"] == processor.crop_size["width"] == 336
    image = torch.zeros(3, 200, 300, dtype=torch.uint8)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 336, 336)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True)
    features = out.hidden_states[-2][:, 1:]
    assert features.shape == (1, 24 * 24, 32)
    assert features.std() > 0.1


def test_tower_weights_follow_the_seed(tower_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    write_tiny_clip_tower(tmp_path / "same", seed=0)
    write_tiny_clip_tower(tmp_path / "other", seed=1)
    reference = load_file(tower_dir / "model.safetensors")
    same = load_file(tmp_path / "same" / "model.safetensors")
    other = load_file(tmp_path / "other" / "model.safetensors")
    assert all(key.startswith("vision_model.") for key in reference)
    assert reference.keys() == same.keys() == other.keys()
    assert all(torch.equal(reference[key], same[key]) for key in reference)
    weight = "vision_model.encoder.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(reference[weight], other[weight])
