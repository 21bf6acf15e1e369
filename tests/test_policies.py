"""Baseline token policies in the same engine: FastV, random, structure; budgets and FastV's ranking."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dynamic_llava.constants import IMAGE_TOKEN_INDEX
from dynamic_llava.errors import UserError
from dynamic_llava.generation import GenerationConfig, generate
from dynamic_llava.model.convert import convert_checkpoint
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.model.policy import DensePolicy, SparsityOptions, make_policy

N = 576


def _prompt(tokenizer, n_images: int) -> list[int]:
    ids = tokenizer("describe the picture in detail please").input_ids
    return ids[:2] + [IMAGE_TOKEN_INDEX] * n_images + ids[2:]


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 336, 336, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule", ["fastv", "random", "predictor"])
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_every_vision_rule_keeps_exactly_the_budget(tiny_llava_dir: Path, rule: str, rate: float) -> None:
    tokenizer, model, _, _ = load_pretrained_model(tiny_llava_dir, vision_policy=rule, vision_keep_rate=rate,
                                                   output_sparsity=False)
    prompts = [_prompt(tokenizer, 1), _prompt(tokenizer, 2)]
    results = generate(model, tokenizer, prompts, [_pixels(1, 0), _pixels(2, 1)],
                       GenerationConfig(max_new_tokens=1, eos_token_id=-1))
    k = math.floor(rate * N)
    assert [r.image_tokens_kept for r in results] == [k, 2 * k]
    assert [sum(m) for m in results[1].image_keep] == [k, k]


def test_rules_pick_different_tokens(tiny_llava_dir: Path) -> None:
    tokenizer, _, _, _ = load_pretrained_model(tiny_llava_dir)
    masks = {}
    for rule in ("fastv", "random", "predictor"):
        _, model, _, _ = load_pretrained_model(tiny_llava_dir, vision_policy=rule)
        out = model.forward_full([_prompt(tokenizer, 1)], [_pixels(1, 0)])
        masks[rule] = out.keep[0]
    assert not torch.equal(masks["fastv"], masks["random"])
    assert not torch.equal(masks["fastv"], masks["predictor"])


def test_fastv_ranking_matches_transformers_attention_weights(tiny_llava_dir: Path, tmp_path: Path) -> None:
    """FastV keeps the image tokens that layer K-1's last-token attention (mean over heads) ranks highest;
    the attention weights come from transformers' own LLaVA (eager attention) on the same weights."""
    tokenizer, model, _, _ = load_pretrained_model(tiny_llava_dir, vision_policy="fastv", vision_keep_rate=0.25,
                                                   sparse_layer=3, output_sparsity=False)
    ids, pixels = _prompt(tokenizer, 1), _pixels(1, 3)
    with torch.no_grad():
        ours = model.forward_full([ids], [pixels]).keep[0]
    reference = LlavaForConditionalGeneration.from_pretrained(
        convert_checkpoint(tiny_llava_dir, tmp_path / "hf", to="hf"), dtype=torch.float32,
        attn_implementation="eager").eval()
    expanded = []
    for token in ids:
        expanded += [reference.config.image_token_index] * N if token == IMAGE_TOKEN_INDEX else [token]
    with torch.no_grad():
        out = reference(input_ids=torch.tensor([expanded]), pixel_values=pixels, output_attentions=True)
    start = ids.index(IMAGE_TOKEN_INDEX)
    received = out.attentions[2][0, :, -1, start:start + N].mean(0)  # layer K-1 = 2, last query row
    expected = torch.zeros(N, dtype=torch.bool)
    expected[received.topk(math.floor(0.25 * N)).indices] = True
    assert torch.equal(ours[start:start + N], expected)
    assert bool(ours[:start].all()) and bool(ours[start + N:].all())  # text always kept


def test_output_rules(tiny_llava_dir: Path) -> None:
    tokenizer, model, _, _ = load_pretrained_model(tiny_llava_dir, output_policy="structure")
    config = GenerationConfig(max_new_tokens=24, eos_token_id=-1)
    prompt = _prompt(tokenizer, 0)
    structure = generate(model, tokenizer, [prompt], None, config)[0]
    # every other generated token enters the cache of the sparse layers (by position parity)
    assert structure.output_tokens_kept in (11, 12, 13)
    _, model, _, _ = load_pretrained_model(tiny_llava_dir, output_policy="random", output_text_keep_rate=0.25)
    random_kept = [r.output_tokens_kept for r in generate(model, tokenizer, [prompt] * 4, None, config)]
    assert 0 < sum(random_kept) < 0.5 * 4 * 23  # about a quarter of the 23 decided tokens per sample


def test_unknown_rule_is_one_clear_error(tiny_llava_dir: Path) -> None:
    with pytest.raises(UserError, match="vision_policy"):
        load_pretrained_model(tiny_llava_dir, vision_policy="h3o")


def test_policies_come_from_options_and_leave_the_checkpoint_config_alone(tiny_llava_dir: Path) -> None:
    """Load options are the default a policy is built from; other options make other policies of the same
    model side by side (as the server's per-request ones); neither rewrites config.sparse_config."""
    _, model, _, _ = load_pretrained_model(tiny_llava_dir, vision_keep_rate=0.5, sparse_layer=1)
    saved = dict(model.config.sparse_config)
    loaded = make_policy(model)
    other = make_policy(model, SparsityOptions(vision_policy="random", vision_keep_rate=0.25))
    dense = make_policy(model, SparsityOptions(sparse=False))
    assert (loaded.vision_rule, loaded.vision_keep_rate, loaded.sparse_layer) == ("predictor", 0.5, 1)
    assert (other.vision_rule, other.vision_keep_rate, other.sparse_layer) == ("random", 0.25, saved["sparse_layer"])
    assert isinstance(dense, DensePolicy) and dense.sparse_layer == saved["sparse_layer"] != 1
    assert loaded.eviction is other.eviction is dense.eviction is None
    assert make_policy(model, SparsityOptions(output_policy="h2o")).eviction is not None
    assert model.config.sparse_config == saved and saved["vision_keep_rate"] not in (0.5, 0.25)
