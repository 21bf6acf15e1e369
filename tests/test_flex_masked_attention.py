"""The FlexAttention masked softmax (`flex_masked_attention.py`) against the blocked one: output and gradients
w.r.t. q, k, v and keep, on CPU through flex's math path; through the model, the training flag and the bench.
The CUDA variants (marker `gpu`) run the compiled kernels in bf16 and fp32."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import pytest
import torch

from dynamic_llava.bench.train_step import MODES, _attention_of, _modes
from dynamic_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from dynamic_llava.errors import UserError
from dynamic_llava.model import flex_masked_attention
from dynamic_llava.model.decoder import Attention
from dynamic_llava.model.flex_masked_attention import flex_attention_available, flex_masked_softmax_attention
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.model.masked_attention import MAX_LOG_RATIO, masked_softmax_attention
from dynamic_llava.model.sparsity_training import SparsityTraining, masked_attention_function, use_masked_attention
from dynamic_llava.train import train as train_module
from dynamic_llava.train.train import main, parse_args

pytestmark = pytest.mark.skipif(not flex_attention_available(), reason="torch without FlexAttention (AuxRequest)")
_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
IMPLEMENTATIONS = (masked_softmax_attention, flex_masked_softmax_attention)


def _inputs(b: int, h: int, h_kv: int, t: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0,
            device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """q, k, v, keep (zeros, ones and fractions), key_valid (the last sample right-padded), grad_out; the
    floating ones in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h_kv, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    u = torch.rand(b, t, generator=g, dtype=torch.float64)
    keep = torch.where(u < 0.35, 0.0, torch.where(u > 0.7, 1.0, u))
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[-1, t - t // 4:] = False
    grad_out = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    return tuple(x.to(device, dtype if x.is_floating_point() else x.dtype) for x in (q, k, v, keep, valid, grad_out))


def _run(attention, q, k, v, keep, valid, grad_out) -> tuple[torch.Tensor, ...]:
    """(out, dq, dk, dv, dkeep) of one implementation."""
    q, k, v, keep = (x.detach().clone().requires_grad_() for x in (q, k, v, keep))
    out = attention(q, k, v, keep, valid)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v, keep), grad_out))


def _max_errors(ours: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> dict[str, float]:
    names = ("out", "dq", "dk", "dv", "dkeep")
    return {n: (a.double() - b.double()).abs().max().item() for n, a, b in zip(names, ours, ref)}


SHAPES = [pytest.param(2, 4, 2, 37, 16, id="gqa-T37"),  # T not a multiple of flex's 128-slot blocks
          pytest.param(1, 2, 2, 150, 32, id="mha-T150"),  # two blocks, the second partial
          pytest.param(3, 2, 1, 5, 8, id="mqa-T5")]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("b, h, h_kv, t, d", SHAPES)
def test_values_and_gradients_equal_the_blocked_implementation(b: int, h: int, h_kv: int, t: int, d: int,
                                                               dtype: torch.dtype, tolerance: float) -> None:
    inputs = _inputs(b, h, h_kv, t, d, dtype)
    ref = _run(masked_softmax_attention, *inputs)
    ours = _run(flex_masked_softmax_attention, *inputs)
    errors = _max_errors(ours, ref)
    for name, a, b_ in zip(errors, ours, ref):
        assert a.dtype == b_.dtype, name
        scale = b_.abs().max().item()
        assert errors[name] <= tolerance * max(scale, 1.0), (name, errors, scale)
    assert ref[4].abs().max() > 1e-3  # the keep gradient is not trivially zero


def test_a_key_far_above_the_kept_ones_is_capped_alike() -> None:
    """A dropped key scoring e^40 above everything its later queries keep: exp(s - lse) is capped at
    exp(MAX_LOG_RATIO) in both, so dkeep is large, finite and equal."""
    q, k, v, keep, valid, grad_out = _inputs(1, 2, 2, 12, 8)
    keep[:] = 1.0
    keep[0, 3] = 0.0
    k[0, :, 3] = q[0, :, 4:].mean(1) * 200.0  # aligned with the later queries: a score far above theirs
    ref = _run(masked_softmax_attention, q, k, v, keep, valid, grad_out)
    ours = _run(flex_masked_softmax_attention, q, k, v, keep, valid, grad_out)
    s = q[0] @ k[0].transpose(-1, -2) / math.sqrt(q.shape[-1])
    lse = s.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), -math.inf).masked_fill(
        (keep[0] == 0) & ~torch.eye(12, dtype=torch.bool), -math.inf).logsumexp(-1)
    assert (s[:, 4:, 3] - lse[:, 4:]).max() > MAX_LOG_RATIO  # the cap is active
    assert torch.isfinite(ours[4]).all() and ours[4][0, 3].abs() > 1e6
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _gate_as_multiplier(q, k, v, keep, valid) -> torch.Tensor:
    """The SPEC formula on plain autograd with the gate multiplying exp(s): dout/dkeep_j exists at keep_j = 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t = q.shape[2]
    eye = torch.eye(t, dtype=torch.bool)
    visible = (torch.ones(t, t, dtype=torch.bool).tril() & valid[:, None, None, :]) | eye
    s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~visible, -math.inf)
    gate = torch.where(eye, torch.ones((), dtype=q.dtype), keep.to(q.dtype)[:, None, :])[:, None]
    w = (s - s.amax(-1, keepdim=True).detach()).exp() * gate
    return w / w.sum(-1, keepdim=True) @ v


def test_the_keep_gradient_at_dropped_tokens_is_the_derivative() -> None:
    """At keep_j = 0 log(keep) has no gradient: flex's dkeep there comes from the extra transposed call alone.
    It must be the derivative of the gate-as-multiplier formula, and a one-sided finite difference."""
    q, k, v, keep, valid, grad_out = _inputs(2, 4, 2, 21, 8)
    ours = _run(flex_masked_softmax_attention, q, k, v, keep, valid, grad_out)[4]
    keep64 = keep.double().requires_grad_()
    ref = torch.autograd.grad(_gate_as_multiplier(q, k, v, keep64, valid), keep64, grad_out)[0]
    dropped = (keep == 0) & valid
    dropped[:, -1] = False  # the last slot has no later query: its gradient is 0 in every implementation
    assert dropped.sum() >= 5 and (ref[dropped].abs() > 1e-3).all()
    torch.testing.assert_close(ours[dropped].double(), ref[dropped], rtol=1e-6, atol=1e-6)

    def loss(gate: torch.Tensor) -> torch.Tensor:
        return (masked_softmax_attention(q, k, v, gate, valid) * grad_out).sum()

    eps = 1e-6
    for b, j in dropped.nonzero()[:4].tolist():
        nudged = keep.double().clone()
        nudged[b, j] = eps
        finite_difference = (loss(nudged) - loss(keep.double())) / eps
        assert ours[b, j].item() == pytest.approx(finite_difference.item(), rel=1e-4, abs=1e-6)


def test_samples_and_keys_with_nothing_visible_give_no_nan() -> None:
    """A sample whose keys are all padding and a keep of all zeros: only diagonals are seen forward, and
    the transposed call has empty rows (lse -inf)."""
    q, k, v, keep, valid, grad_out = _inputs(2, 2, 2, 9, 8)
    valid[1] = False
    keep[0] = 0.0
    ref = _run(masked_softmax_attention, q, k, v, keep, valid, grad_out)
    ours = _run(flex_masked_softmax_attention, q, k, v, keep, valid, grad_out)
    for a, b in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_flex_attention_returns_lse_in_natural_log() -> None:
    """What the CUDA path takes from the public function (CPU, no grad: its eager math path)."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    q, k, v = _inputs(1, 2, 2, 20, 16)[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile()": expected here
        _, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True))
    s = q @ k.transpose(-1, -2) / math.sqrt(16)
    torch.testing.assert_close(aux.lse, s.logsumexp(-1), rtol=1e-10, atol=1e-10)


def test_no_warning_on_cpu() -> None:
    """The CPU path calls flex's math op directly: no "without torch.compile" warning for every user call."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(flex_masked_softmax_attention, *_inputs(1, 2, 2, 7, 8, torch.float32))


# ----------------------------------------------------------------------------- through the model
def _batch() -> tuple[torch.Tensor, ...]:
    """Sample 0: image + 6-token answer; sample 1: text only, 5-token answer, two padding slots."""
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9, 10, 11, 12, 13, 2],
                        [1, 5, 6, 7, 8, 9, 10, 11, 2, 0, 0]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 5:] = ids[0, 5:]
    labels[1, 4:9] = ids[1, 4:9]
    images = [torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)), None]
    return ids, labels, ids != 0, images


@pytest.mark.parametrize("autocast, checkpointing", [(False, False), (True, False), (False, True)],
                         ids=["fp32", "bf16-autocast", "flex-checkpointed"])
def test_a_sparsification_step_through_the_model_is_the_same(tiny_llava_dir: Path, autocast: bool,
                                                             checkpointing: bool) -> None:
    """Blocked vs flex: the same loss and gradients, predictors' included; also with flex's layers
    recomputed in backward (activation checkpointing, which flex's eager op used to corrupt)."""
    _, model, _, _ = load_pretrained_model(tiny_llava_dir)
    model.config.sparse_config = model.sparse.replace(output_text_len_for_training=4).to_dict()
    model.train()
    model.sparsity_training = SparsityTraining(tau=1.0)
    results = []
    for name in ("blocked", "flex"):
        assert use_masked_attention(model, masked_attention_function(name)) == len(model.model.layers)
        model.model.gradient_checkpointing = checkpointing and name == "flex"
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same Gumbel decisions
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(*_batch())
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.vision_keep, grads))
    (loss_b, keep_b, grads_b), (loss_f, keep_f, grads_f) = results
    assert 0 < float(keep_b) < 1 and keep_f == keep_b
    tolerance = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(loss_f, loss_b, rtol=tolerance, atol=tolerance)
    assert grads_b.keys() == grads_f.keys()
    predictors = [name for name in grads_b if "score_predictor" in name]
    assert len(predictors) >= 4 and all(grads_b[name].abs().sum() > 0 for name in predictors)
    for name, grad in grads_b.items():
        error = ((grads_f[name] - grad).norm() / grad.norm().clamp(min=1e-12)).item()
        assert error < (5e-2 if autocast else 1e-4), (name, error)


# ----------------------------------------------------------------------------- the choice
def test_the_training_flag_reaches_every_layer(tiny_llava_dir: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data.json").write_text("[]")
    argv = ["--model_name_or_path", str(tiny_llava_dir), "--data_path", str(tmp_path / "data.json"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    assert parse_args(argv)[3].masked_attention == "blocked"

    class Built(Exception):
        pass

    def stop(model, *args):
        raise Built(model)

    monkeypatch.setattr(train_module, "set_trainable", stop)  # right after the choice is applied
    with pytest.raises(Built) as built, pytest.warns(UserWarning, match="fused kernels only on CUDA"):
        train_module.train([*argv, "--masked_attention", "flex"], sparse=True)
    attentions = [m for m in built.value.args[0].modules() if isinstance(m, Attention)]
    assert attentions and all(a.masked_attention is flex_masked_softmax_attention for a in attentions)

    assert parse_args(argv)[3].keep_gradient == "exact"
    with pytest.raises(Built) as built:
        train_module.train([*argv, "--keep_gradient", "bounded"], sparse=True)
    for attention in (m for m in built.value.args[0].modules() if isinstance(m, Attention)):
        assert attention.masked_attention.func is masked_softmax_attention
        assert attention.masked_attention.keywords == {"bounded_keep_gradient": True}


def test_flex_without_flex_attention_is_a_user_error(tiny_llava_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(flex_masked_attention, "flex_attention", None)
    with pytest.raises(UserError, match="flex_attention"):
        masked_attention_function("flex")
    (tmp_path / "data.json").write_text("[]")
    argv = ["--model_name_or_path", str(tiny_llava_dir), "--data_path", str(tmp_path / "data.json"),
            "--output_dir", str(tmp_path / "out"), "--masked_attention", "flex"]
    assert main(argv, sparse=True) == 2
    err = capsys.readouterr().err
    assert "torch.nn.attention.flex_attention" in err and "Traceback" not in err
    # the bench leaves the mode out by default, and refuses it by name
    assert "flex-masked" not in _modes(None)
    with pytest.raises(UserError, match="flex_attention"):
        _modes("masked,flex-masked")


def test_the_bench_modes() -> None:
    assert _modes(None) == MODES and "flex-masked" in MODES
    assert _modes("flex-masked, masked") == ("dense", "masked", "flex-masked")  # dense always, MODES' order
    assert _attention_of("flex-masked") is flex_masked_softmax_attention
    assert _attention_of("masked") is masked_softmax_attention
    with pytest.raises(UserError, match="unknown"):
        _modes("dense,fast")


# ----------------------------------------------------------------------------- CUDA: the compiled kernels
# Each test's CPU variant (flex's math op) runs in CI and proves the test code; the CUDA ones run the compiled
# kernels (marker gpu, skipped without CUDA).
_ON_CUDA = [pytest.mark.gpu, _NO_CUDA]


@pytest.mark.parametrize("device, dtype", [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=_ON_CUDA),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=_ON_CUDA)])
def test_flex_in_low_precision_matches_the_blocked_one_in_fp32(device: str, dtype: torch.dtype) -> None:
    """GQA, padding, zero / one / fractional keep, T = 200 (a partial second block), head dim 64: relative
    error of output and every gradient against the blocked implementation in fp32 on the same device."""
    inputs = _inputs(2, 4, 2, 200, 64, torch.float32, seed=5, device=device)  # keep stays fp32, as in training
    ref = _run(masked_softmax_attention, *inputs)
    cast = tuple(x.to(dtype) if x.is_floating_point() and i != 3 else x for i, x in enumerate(inputs))
    ours = _run(flex_masked_softmax_attention, *cast)
    if device == "cuda":
        assert flex_masked_attention._compiled_flex_attention.cache_info().currsize == 1  # the compiled path ran
    tolerance = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for name, a, b in zip(("out", "dq", "dk", "dv", "dkeep"), ours, ref):
        assert a.device.type == device and torch.isfinite(a).all(), name
        error = ((a.float() - b).norm() / b.norm()).item()
        assert error < tolerance, (name, dtype, error)
    assert ours[4].dtype == torch.float32  # keep's dtype


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_ON_CUDA)])
def test_flex_trains_the_tiny_model_like_the_blocked_one_in_bf16(tiny_llava_dir: Path, device: str) -> None:
    """bf16 autocast, flex's layers under activation checkpointing (the 7B script's setting): the same loss
    and gradients as the blocked implementation without it, within bf16 rounding."""
    _, model, _, _ = load_pretrained_model(tiny_llava_dir, device=device, dtype=torch.float32)
    model.config.sparse_config = model.sparse.replace(output_text_len_for_training=4).to_dict()
    model.train()
    model.sparsity_training = SparsityTraining(tau=1.0)
    ids, labels, mask, images = _batch()
    batch = (ids.to(device), labels.to(device), mask.to(device), [x if x is None else x.to(device) for x in images])
    results = []
    for name in ("blocked", "flex"):
        use_masked_attention(model, masked_attention_function(name))
        model.model.gradient_checkpointing = name == "flex"
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same Gumbel decisions
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(*batch)
        out.loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach().float(), out.vision_keep, grads))
    (loss_b, keep_b, grads_b), (loss_f, keep_f, grads_f) = results
    assert keep_f == keep_b
    torch.testing.assert_close(loss_f, loss_b, rtol=2e-2, atol=2e-2)
    assert grads_b.keys() == grads_f.keys()
    for subset in (list(grads_b), [n for n in grads_b if "score_predictor" in n]):
        ref = torch.cat([grads_b[n].flatten() for n in subset])
        ours = torch.cat([grads_f[n].flatten() for n in subset])
        assert ours.device.type == device and torch.isfinite(ours).all() and ref.norm() > 0
        assert ((ours - ref).norm() / ref.norm()).item() < 5e-2, len(subset)


@pytest.mark.parametrize("b, h, h_kv, t, d", SHAPES)
def test_the_bounded_keep_gradient_equals_the_blocked_one(b: int, h: int, h_kv: int, t: int, d: int) -> None:
    inputs = _inputs(b, h, h_kv, t, d)
    ref = _run(functools.partial(masked_softmax_attention, bounded_keep_gradient=True), *inputs)
    ours = _run(functools.partial(flex_masked_softmax_attention, bounded_keep_gradient=True), *inputs)
    for a, b_ in zip(ours, ref):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)
    exact = _run(masked_softmax_attention, *inputs)[4]
    assert (exact - ref[4]).abs().max() > 1e-3  # bounded differs from the derivative at dropped keys
