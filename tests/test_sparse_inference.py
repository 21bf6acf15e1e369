"""Sparse inference: dropping == masking, cache == no cache, batched == alone, stats and budgets."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, CLIPVisionModel

from dynamic_llava.constants import IMAGE_TOKEN_INDEX
from dynamic_llava.errors import UserError
from dynamic_llava.generation import GenerationConfig, generate, stream_generate
from dynamic_llava.model.config import DynamicLlavaConfig
from dynamic_llava.model.llava import DynamicLlavaForCausalLM
from dynamic_llava.model.policy import SparsityOptions, make_policy
from dynamic_llava.model.vision import CLIPVisionTower
from dynamic_llava.tiny.tokenizer import train_tiny_tokenizer
from dynamic_llava.tiny.vision_tower import write_tiny_clip_tower

N_PATCHES = 576


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> DynamicLlavaForCausalLM:
    tower_dir = tmp_path_factory.mktemp("tower")
    write_tiny_clip_tower(tower_dir, seed=0)
    torch.manual_seed(0)
    config = DynamicLlavaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, mm_hidden_size=32, mm_vision_tower=str(tower_dir), initializer_range=0.1,
        sparse_config=dict(d_model=64, nhead=4, dim_feedforward=128))
    model = DynamicLlavaForCausalLM(config).eval()
    # A random output predictor with a large last layer decides keep / drop about evenly.
    torch.nn.init.normal_(model.model.output_text_score_predictor.output_mlp[-1].weight, std=3.0)
    model.model.vision_tower = CLIPVisionTower(CLIPVisionModel.from_pretrained(tower_dir), -2, "patch")
    return model


def _images(n: int, seed: int) -> torch.Tensor | None:
    if n == 0:
        return None
    return torch.randn(n, 3, 336, 336, generator=torch.Generator().manual_seed(seed))


def _prompt(tokenizer, text: str, n_images: int) -> list[int]:
    ids = tokenizer(text).input_ids
    return ids[:2] + [IMAGE_TOKEN_INDEX, *ids[2:3]] * n_images + ids[2:]


@pytest.fixture(scope="module")
def mixed_batch(tokenizer):
    """Prompts of different lengths with 1, 0 and 2 images."""
    texts = ["what colour is the big cube on the left", "describe the scene", "count the red balls please"]
    counts = [1, 0, 2]
    prompts = [_prompt(tokenizer, t, n) for t, n in zip(texts, counts)]
    images = [_images(n, seed) for seed, n in enumerate(counts)]
    return prompts, images


def test_dropping_tokens_equals_masking_them(model, mixed_batch) -> None:
    prompts, images = mixed_batch
    with torch.inference_mode():
        dropped = model.forward_full(prompts, images)
        masked = model.forward_masked(prompts, images)
    assert torch.equal(dropped.keep, masked.keep)
    processed = ~torch.isnan(dropped.logits[..., 0])
    assert int((~dropped.keep & processed).sum()) == 0  # prompts end in text: nothing dropped is processed
    assert int((dropped.keep & ~processed).sum()) == 0
    a, b = dropped.logits[processed], masked.logits[processed]
    assert (a - b).abs().max() / b.abs().max() < 1e-5
    # and dropping does change the logits (the test could fail)
    dense = model.forward_masked(prompts, images, policy=make_policy(model, SparsityOptions(sparse=False)))
    assert (dense.logits[processed] - b).abs().max() > 1e-3


def test_image_budget_is_top_k_per_image(model, tokenizer, mixed_batch) -> None:
    prompts, images = mixed_batch
    results = generate(model, tokenizer, prompts, images, GenerationConfig(max_new_tokens=1, eos_token_id=-1))
    k = math.floor(model.sparse.vision_keep_rate * N_PATCHES)
    assert k == 115
    for result, n_images in zip(results, [1, 0, 2]):
        assert result.image_tokens == n_images * N_PATCHES
        assert result.image_tokens_kept == n_images * k
        assert [sum(m) for m in result.image_keep] == [k] * n_images


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_equals_one_by_one(model, tokenizer, mixed_batch, sparse: bool, use_cache: bool) -> None:
    prompts, images = mixed_batch
    options = SparsityOptions(sparse=sparse)
    config = GenerationConfig(max_new_tokens=12, use_cache=use_cache, eos_token_id=-1)
    batched = generate(model, tokenizer, prompts, images, config, make_policy(model, options))
    for prompt, image, together in zip(prompts, images, batched):
        alone = generate(model, tokenizer, [prompt], [image], config, make_policy(model, options))[0]
        assert together.token_ids == alone.token_ids
        assert together.output_keep == alone.output_keep
        assert together.image_keep == alone.image_keep
        assert together.kv_cache_bytes == alone.kv_cache_bytes
    if sparse:
        decisions = [d for r in batched for d in r.output_keep]
        assert 0 < sum(decisions) < len(decisions), "the output predictor should both keep and drop"


def test_cache_and_no_cache_agree(model, tokenizer, mixed_batch) -> None:
    prompts, images = mixed_batch
    with_cache = generate(model, tokenizer, prompts, images, GenerationConfig(max_new_tokens=16, eos_token_id=-1))
    without = generate(model, tokenizer, prompts, images,
                       GenerationConfig(max_new_tokens=16, use_cache=False, eos_token_id=-1))
    for a, b in zip(with_cache, without):
        assert a.token_ids == b.token_ids
        assert a.output_keep == b.output_keep
        assert a.image_keep == b.image_keep
        assert a.kv_cache_bytes == b.kv_cache_bytes


def test_kv_bytes_proportional_to_kept_tokens(model, tokenizer, mixed_batch) -> None:
    prompts, images = mixed_batch
    results = generate(model, tokenizer, prompts, images, GenerationConfig(max_new_tokens=10, eos_token_id=-1))
    cfg = model.config
    per_entry = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # fp32 K and V
    k, n_layers = make_policy(model).sparse_layer, cfg.num_hidden_layers
    for r in results:
        fed = r.output_tokens - 1
        text = r.prompt_tokens - r.image_tokens
        full = k * (r.prompt_tokens + fed)
        sparse = (n_layers - k) * (text + r.image_tokens_kept + r.output_tokens_kept)
        assert r.kv_cache_bytes == (full + sparse) * per_entry
        assert r.kv_cache_bytes_dense == n_layers * (r.prompt_tokens + fed) * per_entry
        assert r.output_tokens_kept == sum(r.output_keep) and len(r.output_keep) == fed


def test_dense_mode_keeps_everything(model, tokenizer, mixed_batch) -> None:
    prompts, images = mixed_batch
    results = generate(model, tokenizer, prompts, images, GenerationConfig(max_new_tokens=6, eos_token_id=-1),
                       make_policy(model, SparsityOptions(sparse=False)))
    for r in results:
        assert r.image_tokens_kept == r.image_tokens
        assert all(r.output_keep)
        assert r.kv_cache_bytes == r.kv_cache_bytes_dense


def test_left_padded_tensor_input_matches_list(model, tokenizer, mixed_batch) -> None:
    prompts, images = mixed_batch
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    config = GenerationConfig(max_new_tokens=5, eos_token_id=-1)
    padded = generate(model, tokenizer, ids, images, config, attention_mask=mask)
    listed = generate(model, tokenizer, prompts, images, config)
    assert [r.token_ids for r in padded] == [r.token_ids for r in listed]


def test_sampling_is_seeded_and_top_p_small_is_greedy(model, tokenizer, mixed_batch) -> None:
    prompts, images = mixed_batch
    sample = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3, eos_token_id=-1)
    first = generate(model, tokenizer, prompts, images, sample)
    again = generate(model, tokenizer, prompts, images, sample)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    nucleus = GenerationConfig(max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=1, eos_token_id=-1)
    greedy = GenerationConfig(max_new_tokens=8, eos_token_id=-1)
    assert ([r.token_ids for r in generate(model, tokenizer, prompts, images, nucleus)]
            == [r.token_ids for r in generate(model, tokenizer, prompts, images, greedy)])


def test_stop_string_eos_and_streaming(model, tokenizer, mixed_batch) -> None:
    prompts, images = mixed_batch
    free = generate(model, tokenizer, prompts[:1], images[:1], GenerationConfig(max_new_tokens=12, eos_token_id=-1))[0]
    assert free.finish_reason == "length" and free.output_tokens == 12
    stop = free.text.strip()[3:6]
    assert stop
    config = GenerationConfig(max_new_tokens=12, stop_strings=[stop], eos_token_id=-1)
    stream = stream_generate(model, tokenizer, prompts[:1], images[:1], config)
    pieces = [deltas[0] for deltas in stream]
    stopped = stream.results[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert "".join(pieces) == stopped.text
    ids = free.token_ids
    first_new = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    eos = generate(model, tokenizer, prompts[:1], images[:1],
                   GenerationConfig(max_new_tokens=12, eos_token_id=ids[first_new]))[0]
    assert eos.finish_reason == "eos" and eos.token_ids == ids[:first_new]


def test_bad_inputs(model, tokenizer, mixed_batch) -> None:
    prompts, images = mixed_batch
    with pytest.raises(UserError, match="placeholder"):
        generate(model, tokenizer, prompts[:1], [None])
    with pytest.raises(UserError, match="placeholder"):
        generate(model, tokenizer, prompts[1:2], [_images(1, 0)])
    with pytest.raises(UserError, match="vision_keep_rate"):
        SparsityOptions(vision_keep_rate=1.5)
    with pytest.raises(UserError, match="vision_keep_rate"):
        SparsityOptions(vision_keep_rate=0.0)
    with pytest.raises(UserError, match="context length"):
        generate(model, tokenizer, prompts[:1], images[:1], GenerationConfig(max_new_tokens=5000))
    with pytest.raises(UserError, match="max_new_tokens"):
        generate(model, tokenizer, prompts[:1], images[:1], GenerationConfig(max_new_tokens=0))


@pytest.mark.parametrize("use_cache", [True, False])
def test_samples_finishing_early_leave_the_batch_without_changing_the_others(
        model, tokenizer, mixed_batch, use_cache: bool) -> None:
    prompts, images = mixed_batch
    free = generate(model, tokenizer, prompts, images, GenerationConfig(max_new_tokens=12, eos_token_id=-1))
    # an EOS id that the first sample produces early and the others later or never
    eos = free[0].token_ids[1]
    config = GenerationConfig(max_new_tokens=12, eos_token_id=eos, use_cache=use_cache)
    batched = generate(model, tokenizer, prompts, images, config)
    assert batched[0].finish_reason == "eos" and batched[0].output_tokens < 12
    assert len({r.output_tokens for r in batched}) > 1, "samples should finish at different steps"
    for prompt, image, together in zip(prompts, images, batched):
        alone = generate(model, tokenizer, [prompt], [image], config)[0]
        assert (together.token_ids, together.finish_reason) == (alone.token_ids, alone.finish_reason)
        assert together.output_keep == alone.output_keep
        assert together.kv_cache_bytes == alone.kv_cache_bytes


def test_tokens_dropped_before_the_first_layer_leave_no_trace(model, mixed_batch, monkeypatch) -> None:
    """sparse_layer 0: no layer reads a dropped image token, so its content cannot change any output; from
    layer 1 on, layer 0 still reads it (the test could fail)."""
    from dynamic_llava.demo.reference_policies import GivenPatches

    prompts, images = mixed_batch
    kept = torch.zeros(N_PATCHES, dtype=torch.bool)
    kept[::50] = True
    encode = model.encode_images

    def noisy_dropped_tokens(pixel_values: torch.Tensor) -> torch.Tensor:
        features = encode(pixel_values)
        noise = torch.randn(features.shape, generator=torch.Generator().manual_seed(1)) * 10
        return torch.where(kept[None, :, None], features, features + noise)

    for layer, unchanged in ((0, True), (1, False)):
        policy = GivenPatches([kept], sparse_layer=layer)
        with torch.inference_mode():
            clean = model.forward_full(prompts[:1], images[:1], policy).logits
            monkeypatch.setattr(model, "encode_images", noisy_dropped_tokens)
            noisy = model.forward_full(prompts[:1], images[:1], policy).logits
            masked = model.forward_masked(prompts[:1], images[:1], policy).logits
            monkeypatch.setattr(model, "encode_images", encode)
        processed = ~torch.isnan(clean[..., 0])
        assert torch.allclose(noisy[processed], masked[processed], atol=1e-4)  # dropping == masking
        assert torch.allclose(clean[processed], noisy[processed], atol=1e-5) == unchanged, layer


def test_fastv_needs_a_layer_before_the_drop(model) -> None:
    with pytest.raises(UserError, match="sparse_layer >= 1"):
        make_policy(model, SparsityOptions(vision_policy="fastv", sparse_layer=0))
    assert make_policy(model, SparsityOptions(vision_policy="random", sparse_layer=0)).sparse_layer == 0
