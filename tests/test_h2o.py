"""H2O decoding baseline (output_policy="h2o"): budget, eviction rule, batching, parity, cost for others."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

import pytest
import torch

from dynamic_llava.constants import IMAGE_TOKEN_INDEX
from dynamic_llava.errors import UserError
from dynamic_llava.generation import GenerationConfig, generate
from dynamic_llava.model import decoder
from dynamic_llava.model.cache import LayerKVCache, SparseKVCache
from dynamic_llava.model.llava import DynamicLlavaForCausalLM
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.model.policy import make_policy
from dynamic_llava.sparsity_options import add_sparsity_arguments, sparsity_overrides
from dynamic_llava.tiny.checkpoint import make_tiny_checkpoint

RATE = 0.4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # grouped K/V heads (4 query heads, 2 K/V heads), so the explicit attention's head grouping is exercised
    return make_tiny_checkpoint(tmp_path_factory.mktemp("h2o") / "llava", num_key_value_heads=2, seed=1)


def _load(checkpoint: Path, **overrides: object):
    return load_pretrained_model(checkpoint, **{"output_policy": "h2o", "output_text_keep_rate": RATE, **overrides})


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):
    return _load(checkpoint)[0]


@pytest.fixture(scope="module")
def text_batch(tokenizer) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """Three text prompts of different lengths."""
    texts = ["describe the whole scene in detail please", "hi", "what colour is the cube"]
    return [tokenizer(t).input_ids for t in texts], [None, None, None]


@pytest.fixture(scope="module")
def mixed_batch(text_batch) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """The same, the last with an image (whose kept entries H2O must leave alone)."""
    prompts = [list(p) for p in text_batch[0]]
    prompts[2] = prompts[2][:2] + [IMAGE_TOKEN_INDEX] + prompts[2][2:]
    image = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    return prompts, [None, None, image]


def _budget(n: int) -> int:
    return math.ceil(RATE * n - 1e-6)


def _decode(model: DynamicLlavaForCausalLM, prompts: list[list[int]], images: list[torch.Tensor | None] | None,
            steps: int, after_step: Callable[[int, SparseKVCache], None] | None = None) -> SparseKVCache:
    """Greedy decoding with the cache via `model.step`; after_step(n fed tokens, cache) after each step."""
    policy = make_policy(model)
    with torch.inference_mode():
        batch = model.embed(prompts, images)
        cache = model.new_cache(len(prompts))
        out = model.step(batch, cache, policy)
        positions = batch.lengths.clone()
        for n in range(1, steps + 1):
            out = model.step(model.embed_generated(out.logits.argmax(-1), positions), cache, policy)
            positions = positions + 1
            if after_step is not None:
                after_step(n, cache)
    return cache


def _held_generated(layer: LayerKVCache) -> torch.Tensor:
    """[B] generated-token entries a layer holds."""
    used = torch.arange(layer.capacity)[None, :] < layer.lengths[:, None]
    return (layer.generated & used).sum(1)


@pytest.mark.parametrize("batch", ["one", "mixed"])
def test_cache_never_holds_more_generated_entries_than_the_budget(checkpoint: Path, mixed_batch, batch: str) -> None:
    _, model, _, _ = _load(checkpoint)
    prompts, images = mixed_batch
    if batch == "one":
        prompts, images = prompts[:1], images[:1]
    k, n_layers = make_policy(model).sparse_layer, model.config.num_hidden_layers
    images_per_prompt = [p.count(IMAGE_TOKEN_INDEX) for p in prompts]
    # prompt text, and the image tokens the vision rule kept (115 of 576): never evicted
    sparse_prompt = [len(p) - n + 115 * n for p, n in zip(prompts, images_per_prompt)]
    dense_prompt = torch.tensor([len(p) - n + 576 * n for p, n in zip(prompts, images_per_prompt)])

    def check(n: int, cache: SparseKVCache) -> None:
        for index in range(n_layers):
            layer = cache[index]
            if index < k:  # layers before sparse_layer hold everything and never track attention
                assert layer.scores is None and torch.equal(layer.lengths, dense_prompt + n)
                continue
            held = _held_generated(layer)
            assert held.tolist() == [min(n, _budget(n))] * len(prompts)
            assert (layer.lengths - held).tolist() == sparse_prompt

    _decode(model, prompts, images, 16, check)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def test_evicts_the_lowest_accumulated_attention_outside_the_recent_window(checkpoint: Path, tokenizer) -> None:
    """A naive reference, keyed by token position: keys and queries recomputed from each sparse layer's
    input with the layer's own projections, per-head softmax, accumulated mass, and H2O's eviction."""
    _, model, _, _ = _load(checkpoint)
    cfg = model.config
    heads, kv_heads, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    sparse_layers = range(make_policy(model).sparse_layer, cfg.num_hidden_layers)
    keys: dict[int, dict[int, torch.Tensor]] = {i: {} for i in sparse_layers}  # layer -> position -> [Hkv, D]
    mass: dict[int, dict[int, float]] = {i: {} for i in sparse_layers}  # accumulated, held generated tokens
    history: list[tuple[int, set[int], int]] = []  # (layer, held generated positions, n fed)

    def reference(index: int):
        def hook(attn, args, output) -> None:
            x, cos, sin, positions = args[0][0], args[1][0, 0], args[2][0, 0], args[3][0].tolist()
            k_new = _rope(attn.k_proj(x).view(len(positions), kv_heads, head_dim), cos[:, None], sin[:, None])
            keys[index].update(zip(positions, k_new))
            if len(positions) > 1:  # prefill: only keys
                return
            p = positions[0]
            q = _rope(attn.q_proj(x[0]).view(heads, head_dim), cos[0], sin[0])
            visible = sorted(keys[index])  # every held key, and all are at positions <= p
            received = torch.zeros(len(visible))
            for h in range(heads):
                k_h = torch.stack([keys[index][j][h // (heads // kv_heads)] for j in visible])
                received += torch.softmax(k_h @ q[h] / head_dim ** 0.5, dim=0)
            acc = mass[index]
            acc[p] = 0.0
            for j, m in zip(visible, received.tolist()):
                if j in acc:
                    acc[j] += m
            n = len(history) // len(sparse_layers) + 1
            budget = _budget(n)
            if len(acc) > budget:
                window = (budget + 1) // 2
                victim = min((j for j in acc if j <= p - window), key=acc.__getitem__)
                del acc[victim], keys[index][victim]
            history.append((index, set(acc), n))
        return hook

    hooks = [model.model.layers[i].self_attn.register_forward_hook(reference(i)) for i in sparse_layers]
    try:
        def compare(n: int, cache: SparseKVCache) -> None:
            for index in sparse_layers:
                layer = cache[index]
                used = int(layer.lengths[0])
                generated = layer.generated[0, :used]
                positions = layer.positions[0, :used][generated].tolist()
                assert set(positions) == set(mass[index])
                expected = torch.tensor([mass[index][p] for p in positions])
                torch.testing.assert_close(layer.scores[0, :used][generated], expected, rtol=1e-5, atol=1e-6)
                cached_keys = layer.k[0, :, :used].transpose(0, 1)  # [used, Hkv, D]
                for slot, p in enumerate(layer.positions[0, :used].tolist()):
                    torch.testing.assert_close(cached_keys[slot], keys[index][p], rtol=1e-5, atol=1e-6)

        prompt = tokenizer("describe the whole scene in detail please").input_ids
        _decode(model, [prompt], None, 24, compare)
    finally:
        for hook in hooks:
            hook.remove()
    # The rule is not a sliding window: some held token is older than the newest `budget` ones ...
    assert any(min(held) < len(prompt) + n - _budget(n) for _, held, n in history)
    # ... and layers evict on their own attention
    last = {index: held for index, held, _ in history}
    assert len({frozenset(held) for held in last.values()}) > 1


def test_batched_equals_one_by_one_with_finished_samples_leaving(checkpoint: Path, tokenizer, text_batch) -> None:
    _, model, _, _ = _load(checkpoint)
    prompts, images = text_batch
    free = generate(model, tokenizer, prompts, images, GenerationConfig(max_new_tokens=14, eos_token_id=-1))
    eos = free[0].token_ids[5]  # the first sample stops early, the batch shrinks (cache.select)
    config = GenerationConfig(max_new_tokens=14, eos_token_id=eos)
    batched = generate(model, tokenizer, prompts, images, config)
    assert len({r.output_tokens for r in batched}) > 1
    cfg = model.config
    per_entry = 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    k, n_layers = make_policy(model).sparse_layer, cfg.num_hidden_layers
    for prompt, image, together in zip(prompts, images, batched):
        alone = generate(model, tokenizer, [prompt], [image], config)[0]
        assert together.token_ids == alone.token_ids
        assert together.efficiency_stats() == alone.efficiency_stats()
        fed = together.output_tokens - 1
        assert together.output_tokens_kept == min(fed, _budget(fed)) <= sum(together.output_keep) == fed
        text = together.prompt_tokens - together.image_tokens
        held = k * (together.prompt_tokens + fed) + (n_layers - k) * (
            text + together.image_tokens_kept + together.output_tokens_kept)
        assert together.kv_cache_bytes == held * per_entry


def test_budget_ratio_one_equals_no_output_sparsification(checkpoint: Path, tokenizer, text_batch) -> None:
    prompts, images = text_batch
    config = GenerationConfig(max_new_tokens=12, eos_token_id=-1)
    _, h2o, _, _ = _load(checkpoint, output_text_keep_rate=1.0)
    _, off, _, _ = _load(checkpoint, output_sparsity=False)
    with_h2o = generate(h2o, tokenizer, prompts, images, config)
    without = generate(off, tokenizer, prompts, images, config)
    assert [r.token_ids for r in with_h2o] == [r.token_ids for r in without]
    assert [r.efficiency_stats() for r in with_h2o] == [r.efficiency_stats() for r in without]
    # and at RATE it does evict and change the cache
    _, model, _, _ = _load(checkpoint)
    evicting = generate(model, tokenizer, prompts, images, config)
    assert all(a.kv_cache_bytes < b.kv_cache_bytes for a, b in zip(evicting, without))


@pytest.mark.parametrize("overrides", [dict(output_policy="predictor"), dict(output_policy="random"),
                                       dict(output_policy="structure"), dict(sparse=False), dict()])
def test_only_h2o_leaves_the_fused_attention(checkpoint: Path, tokenizer, monkeypatch, overrides: dict) -> None:
    _, model, _, _ = _load(checkpoint, **overrides)
    calls = {"sdpa": 0, "explicit": 0}

    def counting(name: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(decoder, "_sdpa", counting("sdpa", decoder._sdpa))
    monkeypatch.setattr(decoder, "_explicit_attention", counting("explicit", decoder._explicit_attention))
    steps, n_layers, k = 5, model.config.num_hidden_layers, make_policy(model).sparse_layer
    cache = _decode(model, [tokenizer("describe the scene").input_ids], None, steps)
    if overrides:
        assert all(layer.scores is None and layer.generated is None for layer in cache.layers)
        assert calls == {"sdpa": n_layers * (steps + 1), "explicit": 0}
    else:  # H2O: explicit attention in the sparse layers while decoding, SDPA at prefill and in layers < K
        assert [layer.scores is not None for layer in cache.layers] == [i >= k for i in range(n_layers)]
        assert calls == {"sdpa": n_layers + k * steps, "explicit": (n_layers - k) * steps}


def test_prefill_does_nothing_and_decoding_without_cache_is_refused(checkpoint: Path, tokenizer, mixed_batch) -> None:
    prompts, images = mixed_batch
    _, model, _, _ = _load(checkpoint)
    _, off, _, _ = _load(checkpoint, output_sparsity=False)
    with torch.inference_mode():
        cache = model.new_cache(len(prompts))
        ours = model.step(model.embed(prompts, images), cache, make_policy(model))
        reference = off.step(off.embed(prompts, images), off.new_cache(len(prompts)), make_policy(off))
    assert torch.equal(ours.logits, reference.logits) and torch.equal(ours.keep, reference.keep)
    assert all(layer.scores is None for layer in cache.layers)
    with pytest.raises(UserError, match="h2o.*use_cache=True"):
        generate(model, tokenizer, prompts, images, GenerationConfig(max_new_tokens=4, use_cache=False))


def test_output_policy_flag_accepts_h2o(checkpoint: Path) -> None:
    parser = argparse.ArgumentParser()
    add_sparsity_arguments(parser)
    overrides = sparsity_overrides(parser.parse_args(["--output-policy", "h2o", "--output-keep-rate", "0.5"]))
    _, model, _, _ = load_pretrained_model(checkpoint, **overrides)
    assert make_policy(model).eviction is not None
