"""Stage 1 of the demo chain: the word-embedding slot of each patch, and a short alignment run that fits the
projector to the slots and saves it as LLaVA's stage 1 does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynamic_llava.data.scenes import Scene, SceneObject
from dynamic_llava.data.synth import SynthConfig, write_dataset
from dynamic_llava.demo import tower_pretrain
from dynamic_llava.demo.projector_align import align_projector, patch_slots, place_slots, slot_tables
from dynamic_llava.demo.tower_pretrain import patch_labels
from dynamic_llava.model.checkpoint_files import load_image_processor, open_tokenizer
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.tiny.checkpoint import make_tiny_checkpoint
from dynamic_llava.tiny.vision_tower import write_tiny_clip_tower


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("align")
    write_dataset(SynthConfig(seed=0, image_size=112, n_train=16, n_val=4, n_test=1), root / "data")
    make_tiny_checkpoint(root / "llm", fmt="llm", seed=0)
    write_tiny_clip_tower(root / "tower", seed=0, image_size=112, patch_size=14, hidden_size=32, num_layers=2,
                          num_heads=4, intermediate_size=64)
    return root


def test_a_patch_slot_sums_the_embeddings_of_its_object_words(parts: Path) -> None:
    tokenizer = open_tokenizer(parts / "llm")
    embeddings = load_file(parts / "llm" / "model.safetensors")["model.embed_tokens.weight"]

    def word(text: str) -> torch.Tensor:
        return embeddings[tokenizer(text, add_special_tokens=False).input_ids].mean(dim=0)

    # A green square and a grey star in two cells of a 112-px image, 8 x 8 patches of 14 px
    scene = Scene("train_000000", 0, (SceneObject("square", "green", 3, 3, 3.5 / 8, 3.5 / 8),
                                      SceneObject("star", "grey", 3, 7, 7.5 / 8, 3.5 / 8)))
    slots = patch_slots(patch_labels(scene, 112, 14), slot_tables(tokenizer, embeddings)).view(8, 8, -1)
    assert torch.allclose(slots[3, 3], word("green") + word("square"), atol=1e-6)
    assert torch.allclose(slots[3, 7], word("grey") + word("star"), atol=1e-6)
    for row, col in [(0, 0), (3, 4), (4, 3)]:  # every other patch, the neighbours of an object's too
        assert torch.allclose(slots[row, col], 2 * word("background"), atol=1e-6)


def test_a_patch_slot_carries_its_place_along_the_position_words(parts: Path) -> None:
    """The place slot of the patch at (row, col) is x (right - left) / 2 + y (below - above) / 2 with x, y in
    [-1, 1]; so two patches' slots differ along right - left exactly by their column difference."""
    tokenizer = open_tokenizer(parts / "llm")
    embeddings = load_file(parts / "llm" / "model.safetensors")["model.embed_tokens.weight"]

    def word(text: str) -> torch.Tensor:
        return embeddings[tokenizer(text, add_special_tokens=False).input_ids].mean(dim=0)

    places = place_slots(tokenizer, embeddings, 8).view(8, 8, -1)
    across, down = (word("right") - word("left")) / 2, (word("below") - word("above")) / 2
    assert torch.allclose(places[0, 0], -across - down, atol=1e-6)  # top left
    assert torch.allclose(places[7, 7], across + down, atol=1e-6)  # bottom right
    assert torch.allclose(places[2, 5], (3 / 7) * across - (3 / 7) * down, atol=1e-6)
    scene = Scene("train_000000", 0, (SceneObject("square", "green", 3, 3, 3.5 / 8, 3.5 / 8),))
    labels = patch_labels(scene, 112, 14)
    tables = slot_tables(tokenizer, embeddings)
    with_place = patch_slots(labels, tables, place_slots(tokenizer, embeddings, 8)).view(8, 8, -1)
    torch.testing.assert_close(with_place - patch_slots(labels, tables).view(8, 8, -1), places)


@pytest.mark.parametrize("select_layer", [-1, -2])
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])  # fp32: the chain on CPUs without native bf16
def test_alignment_fits_the_slots_and_saves_a_stage1_folder(parts: Path, tmp_path: Path, select_layer: int,
                                                            bf16: bool) -> None:
    out = tmp_path / "stage1"
    result = align_projector(parts / "data", parts / "llm", parts / "tower", out, steps=80, lr=3e-3, batch_size=8,
                             select_layer=select_layer, bf16=bf16)
    losses = [loss for _, loss in result["loss_history"]]
    assert losses[-1] < 0.5 * losses[0]
    assert 0.0 < result["val"]["cosine"] <= 1.0 and result["val"]["mse"] > 0.0
    saved = torch.load(out / "mm_projector.bin", weights_only=True)
    assert set(saved) == {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    _, model, _, _ = load_pretrained_model(out, model_base=parts / "llm", sparse=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert model.config.mm_vision_select_layer == select_layer and model.config.image_aspect_ratio == "pad"


def test_stages_0_and_1_share_one_load_of_the_images(parts: Path, tmp_path: Path, monkeypatch) -> None:
    """The chain loads each split once for both stages, and stage 1 fits the same projector either way."""
    loads: list[str] = []
    real = tower_pretrain.load_split
    monkeypatch.setattr(tower_pretrain, "load_split", lambda *args: loads.append(args[1]) or real(*args))
    splits = tower_pretrain.SceneSplits(parts / "data", load_image_processor(parts / "tower"), 112, 14)
    tower_pretrain.pretrain_tower(parts / "data", parts / "tower", tmp_path / "stage0", steps=4, batch_size=4,
                                  warmup_steps=1, splits=splits)
    shared = align_projector(parts / "data", parts / "llm", tmp_path / "stage0", tmp_path / "a", steps=10,
                             batch_size=8, splits=splits)
    assert loads == ["train", "val"]
    alone = align_projector(parts / "data", parts / "llm", tmp_path / "stage0", tmp_path / "b", steps=10, batch_size=8)
    assert loads == ["train", "val", "train", "val"]
    assert alone["val"] == shared["val"]
