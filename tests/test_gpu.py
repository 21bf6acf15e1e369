"""The CPU self-consistency checks again on CUDA in bf16 and fp16 (marker `gpu`; `pytest -m gpu` runs them).

Each test is parametrised by (device, dtype): its fp32 CPU variant runs in CI and proves the test code
itself works, its CUDA variants skip without a GPU. Decisions that bf16 rounding could flip (top-k near-ties,
greedy near-ties) are fixed: image tokens are kept by given patch masks and decoding is teacher-forced, so
every comparison is of logits within the dtype's tolerance. Nothing may silently stay on, or fall back to,
the CPU: parameters, buffers, KV-cache tensors and outputs are checked to be on the device.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaForConditionalGeneration

from dynamic_llava.constants import IMAGE_TOKEN_INDEX
from dynamic_llava.demo.reference_policies import GivenPatches
from dynamic_llava.generation import GenerationConfig, generate
from dynamic_llava.model import decoder
from dynamic_llava.model.cache import SparseKVCache
from dynamic_llava.model.llava import DynamicLlavaForCausalLM
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.model.policy import SparsityOptions, make_policy
from dynamic_llava.tiny.checkpoint import make_tiny_checkpoint

N_PATCHES = 576
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = [pytest.param("cpu", torch.float32, id="cpu-fp32"),
           pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=[pytest.mark.gpu, _NO_CUDA]),
           pytest.param("cuda", torch.float16, id="cuda-fp16", marks=[pytest.mark.gpu, _NO_CUDA])]
# relative error (norm of the difference over the norm) allowed between two computations of the same logits;
# measured on CPU: bf16 0.013, fp16 0.0016, fp32 8e-7 (the largest over these tests)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _load(path: Path, device: str, dtype: torch.dtype, **overrides: object):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_pretrained_model(path, device=device, dtype=dtype, **overrides)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def _assert_on(device: str, *tensors: torch.Tensor) -> None:
    for tensor in tensors:
        assert tensor.device.type == device, (tensor.shape, tensor.device)


def _assert_model_on(model: torch.nn.Module, device: str, dtype: torch.dtype) -> None:
    _assert_on(device, *model.parameters(), *model.buffers())
    assert {p.dtype for p in model.parameters()} == {dtype}


def _assert_cache_on(cache: SparseKVCache, device: str) -> None:
    for layer in cache.layers:
        _assert_on(device, layer.k, layer.v, layer.positions, layer.lengths,
                   *(t for t in (layer.scores, layer.generated, layer.n_generated) if t is not None))


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Grouped K/V heads (4 query heads, 2 K/V heads): SDPA's enable_gqa path and H2O's head grouping."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gpu") / "gqa", num_key_value_heads=2, seed=1)


def _mixed_batch(tokenizer) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """Prompts of different lengths with 1, 0 and 2 images (CPU pixels: the model moves them)."""
    texts = ["what colour is the big cube on the left", "describe the scene", "count the red balls please"]
    prompts, images = [], []
    for seed, (text, n) in enumerate(zip(texts, [1, 0, 2])):
        ids = tokenizer(text).input_ids
        prompts.append(ids[:2] + [IMAGE_TOKEN_INDEX, *ids[2:3]] * n + ids[2:])
        images.append(torch.randn(n, 3, 336, 336, generator=torch.Generator().manual_seed(seed)) if n else None)
    return prompts, images


def _given_patches(images: list[torch.Tensor | None], sparse_layer: int) -> GivenPatches:
    """A fifth of each image's patches, chosen at random once: sparse decisions no rounding can change."""
    n_images = sum(0 if i is None else len(i) for i in images)
    masks = [torch.rand(N_PATCHES, generator=torch.Generator().manual_seed(i)) < 0.2 for i in range(n_images)]
    return GivenPatches(masks, sparse_layer)


def _image_masks(policy: GivenPatches, images: list[torch.Tensor | None], sample: int) -> list[torch.Tensor]:
    start = sum(0 if i is None else len(i) for i in images[:sample])
    n = 0 if images[sample] is None else len(images[sample])
    return policy.masks[start:start + n]


def _teacher_forced(model: DynamicLlavaForCausalLM, prompts: list[list[int]], images: list[torch.Tensor | None],
                    policy, forced: torch.Tensor, device: str) -> list[torch.Tensor]:
    """Next-token logits [B, V] after the prompt and after each of forced [B, N] tokens, with the KV cache."""
    with torch.inference_mode():
        batch = model.embed(prompts, images)
        cache = model.new_cache(len(prompts))
        out = model.step(batch, cache, policy)
        logits, positions = [out.logits], batch.lengths.clone()
        for n in range(forced.shape[1]):
            out = model.step(model.embed_generated(forced[:, n].to(device), positions), cache, policy)
            logits.append(out.logits)
            positions = positions + 1
    _assert_cache_on(cache, device)
    _assert_on(device, *logits)
    return logits


def _recomputed(model: DynamicLlavaForCausalLM, prompts: list[list[int]], images: list[torch.Tensor | None],
                policy, forced: torch.Tensor, device: str) -> list[torch.Tensor]:
    """The same logits without a cache: each step a forward over prompt + generated tokens on a fresh cache."""
    logits = []
    with torch.inference_mode():
        for n in range(forced.shape[1] + 1):
            ids = [p + forced[i, :n].tolist() for i, p in enumerate(prompts)]
            batch = model.embed(ids, images, generated_counts=[n] * len(prompts))
            logits.append(model.step(batch, model.new_cache(len(prompts)), policy).logits)
    _assert_on(device, *logits)
    return logits


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_model_and_outputs_stay_on_the_device(tiny_llava_dir: Path, device: str, dtype: torch.dtype) -> None:
    tokenizer, model, _, _ = _load(tiny_llava_dir, device, dtype)
    _assert_model_on(model, device, dtype)
    prompts, images = _mixed_batch(tokenizer)
    with torch.inference_mode():
        out = model.forward_full(prompts, images)
    _assert_on(device, out.logits, out.keep)
    assert out.logits.dtype == dtype


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_dropping_tokens_equals_masking_them(tiny_llava_dir: Path, device: str, dtype: torch.dtype) -> None:
    tokenizer, model, _, _ = _load(tiny_llava_dir, device, dtype)
    prompts, images = _mixed_batch(tokenizer)
    policy = _given_patches(images, make_policy(model).sparse_layer)
    with torch.inference_mode():
        dropped = model.forward_full(prompts, images, policy)
        masked = model.forward_masked(prompts, images, policy)
        dense = model.forward_masked(prompts, images, make_policy(model, SparsityOptions(sparse=False)))
    _assert_on(device, dropped.logits, masked.logits, dense.logits)
    assert torch.equal(dropped.keep, masked.keep)
    processed = ~torch.isnan(dropped.logits[..., 0])
    assert int((dropped.keep != processed).sum()) == 0  # prompts end in text: exactly the kept tokens are processed
    assert _rel_err(dropped.logits[processed], masked.logits[processed]) < TOLERANCE[dtype]
    # dropping changes the logits far beyond the tolerance (the test could fail)
    assert _rel_err(dense.logits[processed], masked.logits[processed]) > 3 * TOLERANCE[dtype]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "given-patches"])
@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_cache_equals_recompute_and_batch_equals_one_by_one(tiny_llava_dir: Path, device: str, dtype: torch.dtype,
                                                            sparse: bool) -> None:
    tokenizer, model, _, _ = _load(tiny_llava_dir, device, dtype)
    prompts, images = _mixed_batch(tokenizer)
    policy = (_given_patches(images, make_policy(model).sparse_layer) if sparse
              else make_policy(model, SparsityOptions(sparse=False)))
    forced = torch.randint(3, 1000, (len(prompts), 5), generator=torch.Generator().manual_seed(0))
    cached = _teacher_forced(model, prompts, images, policy, forced, device)
    recomputed = _recomputed(model, prompts, images, policy, forced, device)
    for step, (a, b) in enumerate(zip(cached, recomputed)):
        assert _rel_err(a, b) < TOLERANCE[dtype], step
    for i in range(len(prompts)):
        alone_policy = GivenPatches(_image_masks(policy, images, i), policy.sparse_layer) if sparse else policy
        alone = _teacher_forced(model, [prompts[i]], [images[i]], alone_policy, forced[i:i + 1], device)
        for step, (together, one) in enumerate(zip(cached, alone)):
            assert _rel_err(together[i:i + 1], one) < TOLERANCE[dtype], (i, step)
    # different forced tokens give different logits (the comparisons could fail)
    assert _rel_err(cached[-1][0], cached[-1][1]) > 3 * TOLERANCE[dtype]


@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_dense_logits_match_transformers_llava(tiny_llava_dir: Path, tiny_hf_dir: Path, device: str,
                                               dtype: torch.dtype) -> None:
    tokenizer, model, processor, _ = _load(tiny_llava_dir, device, dtype, sparse=False)
    reference = LlavaForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=dtype).to(device).eval()
    _assert_model_on(reference, device, dtype)
    prompt = "A chat between a curious user and an artificial intelligence assistant. USER: "
    ids = (tokenizer(prompt).input_ids + [IMAGE_TOKEN_INDEX]
           + tokenizer("\nWhat color is the cat? ASSISTANT:", add_special_tokens=False).input_ids)
    array = (np.random.RandomState(0).rand(240, 320, 3) * 255).astype("uint8")
    pixels = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    expanded = []
    for token in ids:
        expanded += [reference.config.image_token_index] * N_PATCHES if token == IMAGE_TOKEN_INDEX else [token]
    with torch.inference_mode():
        ours = model.forward_full([ids], images=[pixels.to(dtype)]).logits[0]
        ref = reference(input_ids=torch.tensor([expanded], device=device),
                        pixel_values=pixels.to(device, dtype)).logits[0, :, :1000]
    _assert_on(device, ours, ref)
    assert ours.shape == ref.shape == (len(ids) - 1 + N_PATCHES, 1000)
    assert _rel_err(ours, ref) < TOLERANCE[dtype]
    assert ours.float().std() > 0.3  # random logits are spread out, not near-ties


POLICIES = {
    "dynamic-llava-I": dict(output_sparsity=False),
    "dynamic-llava-I|T": dict(),
    "fastv": dict(vision_policy="fastv", output_sparsity=False),
    "random": dict(vision_policy="random", output_policy="random"),
    "h2o": dict(output_policy="h2o", output_text_keep_rate=0.4),
}


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_token_policies_run(gqa_dir: Path, device: str, dtype: torch.dtype, name: str) -> None:
    tokenizer, model, _, _ = _load(gqa_dir, device, dtype, **POLICIES[name])
    _assert_model_on(model, device, dtype)
    prompts, images = _mixed_batch(tokenizer)
    policy = make_policy(model)
    results = generate(model, tokenizer, prompts, images, GenerationConfig(max_new_tokens=6, eos_token_id=-1), policy)
    kept = math.floor(policy.vision_keep_rate * N_PATCHES)
    for result, n_images in zip(results, [1, 0, 2]):
        assert result.output_tokens == 6
        assert result.image_tokens == n_images * N_PATCHES and result.image_tokens_kept == n_images * kept
        assert result.kv_cache_bytes < result.kv_cache_bytes_dense or n_images == 0
    forced = torch.randint(3, 1000, (len(prompts), 4), generator=torch.Generator().manual_seed(1))
    logits = _teacher_forced(model, prompts, images, policy, forced, device)  # cache tensors on the device too
    assert all(bool(torch.isfinite(step).all()) for step in logits)


# ----------------------------------------------------------------------------- attention kernels
def _record_masks(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor | None]:
    """Every attn_mask passed to SDPA (the decoder's and the CLIP tower's) from now on."""
    masks: list[torch.Tensor | None] = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        masks.append(kwargs.get("attn_mask", args[3] if len(args) > 3 else None))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return masks


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "dynamic-llava"])
def test_one_unpadded_sample_passes_sdpa_no_mask(tiny_llava_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                 sparse: bool) -> None:
    """The common case (one sample: prefill without padding, then decoding one token at a time) builds no
    [B, 1, T, S] mask, so SDPA may use flash attention; a padded batch still passes its masks."""
    tokenizer, model, _, _ = _load(tiny_llava_dir, "cpu", torch.float32, sparse=sparse)
    prompts, images = _mixed_batch(tokenizer)
    masks = _record_masks(monkeypatch)
    generate(model, tokenizer, prompts[:1], images[:1], GenerationConfig(max_new_tokens=4, eos_token_id=-1))
    assert len(masks) > 2 * model.config.num_hidden_layers and all(m is None for m in masks)
    masks.clear()
    generate(model, tokenizer, prompts, images, GenerationConfig(max_new_tokens=4, eos_token_id=-1))
    assert any(m is not None and m.shape[-2] > 1 for m in masks)  # the recorder sees masks (could fail)


def test_decoding_without_a_mask_equals_the_all_true_mask(tiny_llava_dir: Path, monkeypatch) -> None:
    """Decoding passes SDPA no mask where every key is visible; the same run with the all-true mask it
    stands for gives the same logits."""
    tokenizer, model, _, _ = _load(tiny_llava_dir, "cpu", torch.float32)
    prompts, images = _mixed_batch(tokenizer)
    policy = make_policy(model)
    forced = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(2))
    without = _teacher_forced(model, prompts[:1], images[:1], policy, forced, "cpu")
    sdpa = decoder._sdpa
    replaced = []

    def all_true_mask(q, k, v, mask, causal):
        if mask is None and not causal:
            replaced.append(k.shape[2])
            mask = torch.ones(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.bool)
        return sdpa(q, k, v, mask, causal)

    monkeypatch.setattr(decoder, "_sdpa", all_true_mask)
    with_mask = _teacher_forced(model, prompts[:1], images[:1], policy, forced, "cpu")
    assert len(replaced) == forced.shape[1] * model.config.num_hidden_layers
    for a, b in zip(without, with_mask):
        assert torch.equal(a, b)


@pytest.mark.gpu
@_NO_CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(("checkpoint", "batch"), [
    ("tiny_llava_dir", "one"), ("tiny_llava_dir", "mixed"), ("gqa_dir", "one"),
    # a padded batch passes masks: flash refuses any mask, memory-efficient refuses grouped K/V heads
    pytest.param("gqa_dir", "mixed", marks=pytest.mark.xfail(raises=RuntimeError, strict=True,
                                                             reason="GQA with a mask needs the math fallback"))])
def test_prefill_and_decode_need_no_math_fallback(request: pytest.FixtureRequest, checkpoint: str,
                                                   dtype: torch.dtype, batch: str) -> None:
    """Only flash and memory-efficient attention allowed: SDPA raises if a call needs the math fallback.
    One sample: causal prefill and unmasked decoding, flash; a padded MHA batch: masks, memory-efficient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokenizer, model, _, _ = _load(request.getfixturevalue(checkpoint), "cuda", dtype)
    prompts, images = _mixed_batch(tokenizer)
    if batch == "one":
        prompts, images = prompts[:1], images[:1]
    config = GenerationConfig(max_new_tokens=6, eos_token_id=-1)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        results = generate(model, tokenizer, prompts, images, config)
    assert [r.output_tokens for r in results] == [6] * len(prompts)
