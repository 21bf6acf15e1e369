"""`bench.flops` at a loaded checkpoint's own shape (what `demo compare` reports): the exact count equals an
operator-level count of the real prefill, with the checkpoint's vocabulary, tower and predictor sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("vision_rule", ["dense", "predictor", "random"])
def test_exact_flops_of_a_checkpoint_shape_match_the_real_forward(tmp_path: Path, vision_rule: str) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dynamic_llava.bench.flops import Schedule, exact_prefill_flops, shape_from_configs
    from dynamic_llava.constants import IMAGE_TOKEN_INDEX
    from dynamic_llava.model.loading import load_pretrained_model
    from dynamic_llava.model.policy import SparsityOptions, make_policy
    from dynamic_llava.tiny.checkpoint import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path / "m", hidden_size=48, intermediate_size=96, num_key_value_heads=2, d_model=32,
                         nhead=4, dim_feedforward=64, vision_keep_rate=0.25)
    _, model, _, _ = load_pretrained_model(tmp_path / "m", vision_policy="random" if vision_rule == "random"
                                           else "predictor")
    tower = model.model.vision_tower.vision_tower.config
    shape = shape_from_configs(model.config, tower)
    assert shape.llm["num_key_value_heads"] == 2 and shape.sparse["d_model"] == 32
    n_image = (tower.image_size // tower.patch_size) ** 2
    policy = make_policy(model, SparsityOptions(sparse=False)) if vision_rule == "dense" else make_policy(model)
    schedule = (Schedule("dense", 0, n_image) if vision_rule == "dense" else
                Schedule(vision_rule, policy.sparse_layer, n_image // 4, vision_rule == "predictor"))
    text = 17
    prompt = [1] * 4 + [IMAGE_TOKEN_INDEX] + [9] * (text - 4)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        batch = model.embed([prompt], [torch.randn(1, 3, tower.image_size, tower.image_size)])
        model.step(batch, model.new_cache(1), policy)
    expected = exact_prefill_flops(shape, schedule, text, n_image, causal=False, vocab=model.config.vocab_size)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)
