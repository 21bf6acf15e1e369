"""Stage 0 of the demo chain: patch labels from the scene spec, and a short pre-training run of a tiny tower."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from dynamic_llava.data.scenes import COLOURS, SHAPES, Scene, SceneObject
from dynamic_llava.data.synth import SynthConfig, write_dataset
from dynamic_llava.demo.tower_pretrain import HEADS, patch_labels, place_labels, pretrain_tower
from dynamic_llava.tiny.vision_tower import write_tiny_clip_tower

GREY = HEADS["colour"].index("grey")
SCENE = Scene("train_000000", 0, (SceneObject("square", "grey", 0, 6, 6.5 / 8, 0.5 / 8),
                                  SceneObject("star", "green", 3, 2, 2.5 / 8, 3.5 / 8)))


def test_patch_labels_mark_each_object_in_its_own_patch_and_the_rest_background() -> None:
    # 112-px image, 8 x 8 patches of 14 px: one patch per scene cell
    labels = patch_labels(SCENE, 112, 14)
    colour, shape = (labels[h].view(8, 8) for h in ("colour", "shape"))
    assert colour[3, 2] == COLOURS.index("green") and shape[3, 2] == SHAPES.index("star")
    assert colour[0, 6] == GREY and shape[0, 6] == SHAPES.index("square")
    background = torch.ones(8, 8, dtype=torch.bool)
    background[3, 2] = background[0, 6] = False
    assert colour[background].eq(len(COLOURS) + 1).all() and shape[background].eq(len(SHAPES)).all()


def test_patch_labels_on_finer_grids_and_refused_on_grids_that_do_not_tile_the_cells() -> None:
    # 224 px / 14 px = 16 x 16 patches: each cell is 2 x 2 patches
    fine = patch_labels(SCENE, 224, 14)["colour"].view(16, 16)
    assert fine[6:8, 4:6].eq(COLOURS.index("green")).all()
    assert (fine != len(COLOURS) + 1).sum() == 8
    with pytest.raises(ValueError, match="does not tile"):
        patch_labels(SCENE, 56, 14)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(SynthConfig(seed=0, image_size=112, n_train=12, n_val=4, n_test=1), out)
    return out


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])  # fp32: CPUs without native bf16
def test_pretraining_lowers_the_loss_and_saves_a_loadable_changed_tower(data: Path, tmp_path: Path, bf16: bool) -> None:
    tower_dir, out_dir = tmp_path / "tower", tmp_path / "pretrained"
    write_tiny_clip_tower(tower_dir, seed=0, image_size=112, patch_size=14, hidden_size=32, num_layers=2,
                          num_heads=4, intermediate_size=64)
    result = pretrain_tower(data, tower_dir, out_dir, steps=40, lr=3e-3, batch_size=8, seed=0, warmup_steps=5,
                            log_every=10, bf16=bf16)
    losses = [loss for _, loss in result["loss_history"]]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    assert set(result["val"]) == {"colour_accuracy_object_patches", "shape_accuracy_object_patches",
                                  "object_vs_background_accuracy", "target_vs_rest_accuracy", "row_accuracy",
                                  "column_accuracy"}

    assert (out_dir / "preprocessor_config.json").read_bytes() == (tower_dir / "preprocessor_config.json").read_bytes()
    before, after = load_file(tower_dir / "model.safetensors"), load_file(out_dir / "model.safetensors")
    assert before.keys() == after.keys()
    assert not torch.equal(before["vision_model.encoder.layers.0.self_attn.q_proj.weight"],
                           after["vision_model.encoder.layers.0.self_attn.q_proj.weight"])
    # transformers 5 names the weights without the `vision_model.` prefix the file carries
    clip = CLIPVisionModel.from_pretrained(out_dir)
    loaded = {k.removeprefix("vision_model."): v for k, v in clip.state_dict().items()}
    assert loaded.keys() == {k.removeprefix("vision_model.") for k in after}
    assert all(torch.equal(loaded[k.removeprefix("vision_model.")], v) for k, v in after.items())


def test_place_labels_are_each_patch_row_and_column() -> None:
    labels = place_labels(8)
    assert labels["row"].tolist()[:9] == [0] * 8 + [1] and labels["column"].tolist()[:9] == [*range(8), 0]
    assert labels["row"][63] == labels["column"][63] == 7
