"""Masked-softmax attention (SPEC 2.3) against direct computations, on both of its paths: the CPU flash kernel
and the blocked one (which runs on other devices; forced here by hiding the kernel)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynamic_llava.model import masked_attention
from dynamic_llava.model.masked_attention import masked_softmax_attention


@pytest.fixture(autouse=True, params=["cpu-flash", "blocked"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "blocked":
        monkeypatch.setattr(masked_attention, "_CPU_FLASH", None)
    return request.param


def test_the_cpu_path_uses_the_flash_kernel(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    kernel = masked_attention._CPU_FLASH
    if kernel is not None:
        monkeypatch.setattr(masked_attention, "_CPU_FLASH", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    q, k, v = _inputs()
    masked_softmax_attention(q, k, v, torch.ones(2, 9))
    assert len(calls) == (1 if path == "cpu-flash" else 0)


def _inputs(b=2, h=4, h_kv=2, t=9, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=dtype)
    k = torch.randn(b, h_kv, t, d, generator=g, dtype=dtype)
    v = torch.randn(b, h_kv, t, d, generator=g, dtype=dtype)
    return q, k, v


def _naive(q, k, v, keep, valid):
    """The SPEC formula written out with autograd: exp(s) G / sum exp(s) G over causal valid keys."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    eye = torch.eye(t, dtype=torch.bool)
    visible = (torch.ones(t, t, dtype=torch.bool).tril() & valid[:, None, None, :]) | eye
    gate = torch.where(eye, torch.ones((), dtype=keep.dtype), keep[:, None, :])[:, None]
    w = torch.exp(s - s.masked_fill(~visible, -1e9).amax(-1, keepdim=True).detach()).masked_fill(~visible, 0) * gate
    return (w / w.sum(-1, keepdim=True)) @ v


def test_all_kept_equals_causal_attention() -> None:
    q, k, v = _inputs()
    keep = torch.ones(2, 9)
    out = masked_softmax_attention(q, k, v, keep)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_dropped_keys_equal_attention_over_the_kept_subset() -> None:
    q, k, v = _inputs(h=2, h_kv=2)
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 0], [1, 1, 0, 1, 0, 1, 0, 0, 1]], dtype=torch.float32)
    out = masked_softmax_attention(q, k, v, keep)
    for b in range(2):
        for i in range(9):
            keys = [j for j in range(i + 1) if keep[b, j] == 1 or j == i]  # a dropped query sees itself
            ref = F.scaled_dot_product_attention(q[b, :, i:i + 1], k[b, :, keys], v[b, :, keys])
            torch.testing.assert_close(out[b, :, i:i + 1], ref, rtol=1e-5, atol=1e-5)
    # and the drops matter (this test could fail)
    dense = masked_softmax_attention(q, k, v, torch.ones_like(keep))
    assert (dense - out).abs().max() > 1e-2


def test_gradients_match_the_formula_including_dropped_keys() -> None:
    q, k, v = (x.double().requires_grad_() for x in _inputs())
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 0], [1, 1, 0, 1, 0, 1, 0, 0, 1]], dtype=torch.float64,
                        requires_grad=True)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 7:] = False  # right padding
    grad_out = torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad(masked_softmax_attention(q, k, v, keep, valid), (q, k, v, keep), grad_out)
    ref = torch.autograd.grad(_naive(q, k, v, keep, valid), (q, k, v, keep), grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    dkeep = ours[3]
    assert torch.isfinite(dkeep).all()
    dropped = keep.detach() == 0
    assert (dkeep[dropped].abs() > 1e-6).any()  # the mask's gradient reaches dropped tokens too


def test_gradcheck_with_soft_mask() -> None:
    q, k, v = (x.double().requires_grad_() for x in _inputs(b=1, t=6, d=4))
    keep = (torch.rand(1, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.8 + 0.2)
    keep.requires_grad_()
    assert torch.autograd.gradcheck(lambda *x: masked_softmax_attention(*x), (q, k, v, keep))


def test_head_blocks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = (x.requires_grad_() for x in _inputs(h=8, h_kv=4))
    keep = (torch.rand(2, 9, generator=torch.Generator().manual_seed(3)) > 0.5).float().requires_grad_()
    whole = masked_softmax_attention(q, k, v, keep)
    grads = torch.autograd.grad(whole.square().sum(), (q, k, v, keep))
    monkeypatch.setattr(masked_attention, "_BLOCK_BYTES", 1)  # one KV head per block
    blocked = masked_softmax_attention(q, k, v, keep)
    grads_blocked = torch.autograd.grad(blocked.square().sum(), (q, k, v, keep))
    torch.testing.assert_close(blocked, whole)
    for a, b in zip(grads_blocked, grads):
        torch.testing.assert_close(a, b)


def test_bf16_is_finite_and_close() -> None:
    q, k, v = _inputs(t=33, d=16)
    keep = (torch.rand(2, 33, generator=torch.Generator().manual_seed(4)) > 0.7).float()
    ref = masked_softmax_attention(q, k, v, keep)
    qb, kb, vb = (x.bfloat16().requires_grad_() for x in (q, k, v))
    keep_b = keep.clone().requires_grad_()
    out = masked_softmax_attention(qb, kb, vb, keep_b)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and qb.grad.dtype == torch.bfloat16
    assert torch.isfinite(keep_b.grad).all() and torch.isfinite(qb.grad.float()).all()
    assert (out.float() - ref).abs().max() < 0.05


def _linear_loss(q, k, v, keep, grad_out) -> float:
    return (masked_softmax_attention(q, k, v, keep) * grad_out).sum().item()


def test_the_bounded_keep_gradient_of_a_dropped_key_is_the_change_from_adding_it_back() -> None:
    """For a loss linear in the output, flipping a dropped key to kept changes the loss by exactly the bounded
    gradient; a kept key keeps the derivative, the same as the exact gradient's."""
    q, k, v = (x.double() for x in _inputs(t=10))
    k[0, :, 2] = q[0].mean((0, 1)) * 30.0  # a dropped key far above what the later queries keep
    keep = torch.tensor([[1, 0, 0, 1, 1, 0, 1, 1, 0, 1], [1, 1, 0, 1, 0, 1, 0, 1, 1, 0]], dtype=torch.float64)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def dkeep(bounded: bool) -> torch.Tensor:
        soft = keep.clone().requires_grad_()
        out = masked_softmax_attention(q, k, v, soft, bounded_keep_gradient=bounded)
        return torch.autograd.grad(out, soft, grad_out)[0]

    exact, bounded = dkeep(False), dkeep(True)
    base = _linear_loss(q, k, v, keep, grad_out)
    for b, j in (keep[:, :-1] == 0).nonzero().tolist():  # the last slot has no later query
        flipped = keep.clone()
        flipped[b, j] = 1.0
        assert bounded[b, j].item() == pytest.approx(_linear_loss(q, k, v, flipped, grad_out) - base, abs=1e-9)
    kept = keep == 1
    torch.testing.assert_close(bounded[kept], exact[kept])
    # the key far above the kept ones: the derivative is far larger than the change it stands for
    assert exact[0, 2].abs() > 100 * bounded[0, 2].abs()


def test_the_keep_gradient_outside_decided_slots_is_zero_and_unchanged_inside() -> None:
    q, k, v = (x.double() for x in _inputs(t=12))
    keep = (torch.rand(2, 12, generator=torch.Generator().manual_seed(5)) > 0.5).double()
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 10:] = False
    decided = torch.zeros(2, 12, dtype=torch.bool)
    decided[0, 2:7] = True  # different counts per sample: the gathered keys are padded
    decided[1, [1, 4, 8, 11]] = True  # 11 is padding: no later valid query, gradient 0
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    def grads(restrict: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        soft = keep.clone().requires_grad_()
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = masked_softmax_attention(qq, kk, vv, soft, valid, bounded_keep_gradient=True, decided=restrict)
        return torch.autograd.grad(out, (qq, kk, vv, soft), grad_out)

    full, restricted = grads(None), grads(decided)
    for a, b in zip(full[:3], restricted[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(restricted[3], torch.where(decided, full[3], 0.0), rtol=1e-12, atol=1e-12)
    assert (full[3][~decided].abs() > 1e-6).any()  # the zeros are a restriction, not the true gradient
    nothing = grads(torch.zeros_like(decided))[3]
    assert not nothing.any()


def test_a_dropped_key_far_above_the_kept_ones_gives_finite_gradients() -> None:
    """exp(s - lse) of such a key overflows fp32; it is capped before the gate multiplies it by 0."""
    q, k, v = (x.requires_grad_() for x in _inputs(t=10, d=8))
    with torch.no_grad():
        k[0, :, 2] = q[0].mean((0, 1)) * 200.0
    keep = torch.ones(2, 10)
    keep[0, 2] = 0.0
    keep.requires_grad_()
    out = masked_softmax_attention(q, k, v, keep)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, keep))
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[3][0, 2].abs() > 1e3  # the key does weigh: its (capped) keep gradient is large
