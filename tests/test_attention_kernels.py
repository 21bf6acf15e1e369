"""Prefill and decode reach SDPA's fused kernels (flash / memory-efficient), never the math fallback, in
every inference mode, batched with mixed lengths; `bench.attention_kernels` tells which kernel ran.

The CPU fp32 variant runs in CI; the CUDA ones (marker `gpu`) run on a GPU, where the fallback would cost
a [T, S] score matrix per layer."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dynamic_llava.bench.attention_kernels import FALLBACK, attention_kernels, describe
from dynamic_llava.constants import IMAGE_TOKEN_INDEX
from dynamic_llava.generation import GenerationConfig, decode_step, finish, prefill
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.model.policy import SparsityOptions, make_policy

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = [pytest.param("cpu", torch.float32, id="cpu-fp32"),
           pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=[pytest.mark.gpu, _NO_CUDA]),
           pytest.param("cuda", torch.float16, id="cuda-fp16", marks=[pytest.mark.gpu, _NO_CUDA])]
MODES = {"dense": SparsityOptions(sparse=False),
         "dynamic-llava I": SparsityOptions(output_sparsity=False),
         "dynamic-llava I|T": SparsityOptions(),
         "fastv": SparsityOptions(vision_policy="fastv", output_sparsity=False)}
NEW_TOKENS = 4


def test_the_recorder_names_the_kernel_sdpa_picked() -> None:
    q = k = v = torch.randn(1, 2, 8, 16)
    run = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        assert attention_kernels(run)[1] == {FALLBACK: 1}
    out, fused = attention_kernels(run)
    assert FALLBACK not in fused and sum(fused.values()) == 1 and out.shape == q.shape
    assert attention_kernels(lambda: None) == (None, {}) and describe({}) == "no SDPA"
    assert describe({"flash": 3, "math": 1}) == "flash x3, math x1"


def _mixed_batch(tokenizer) -> tuple[list[list[int]], list[torch.Tensor | None]]:
    """Three prompts of different lengths with 1, 0 and 2 images: padding in prefill, unequal caches."""
    texts = ["what colour is the big cube on the left", "describe the scene", "count the red balls please"]
    prompts, images = [], []
    for seed, (text, n) in enumerate(zip(texts, [1, 0, 2])):
        ids = tokenizer(text).input_ids
        prompts.append(ids[:2] + [IMAGE_TOKEN_INDEX] * n + ids[2:])
        images.append(torch.randn(n, 3, 336, 336, generator=torch.Generator().manual_seed(seed)) if n else None)
    return prompts, images


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_prefill_and_decode_never_fall_back_to_math(tiny_llava_dir: Path, device: str, dtype: torch.dtype,
                                                    mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer, model, _, _ = load_pretrained_model(tiny_llava_dir, device=device, dtype=dtype)
    prompts, images = _mixed_batch(tokenizer)
    policy = make_policy(model, MODES[mode])
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_id=-1)  # never stops early
    state, prefill_kernels = attention_kernels(lambda: prefill(model, tokenizer, prompts, images, config, policy))

    def run_decode() -> None:
        while not state.done:
            decode_step(state)

    layers = model.config.num_hidden_layers
    kernels = {"prefill": prefill_kernels, "decode": attention_kernels(run_decode)[1]}
    assert len(finish(state)) == len(prompts)
    for phase, used in kernels.items():
        assert FALLBACK not in used, (phase, used)
        if device == "cuda":
            assert set(used) <= {"flash", "memory-efficient", "cudnn"}, (phase, used)
    # Every layer's attention went through SDPA (FastV's ranking layer computes one explicit row besides):
    # once per layer in prefill (plus the CLIP tower's layers), once per layer and fed token in decode.
    assert sum(kernels["prefill"].values()) > layers
    assert sum(kernels["decode"].values()) == layers * (NEW_TOKENS - 1)
