"""`bench train` end to end at the tiny shape, and its naive masked attention against the library's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dynamic_llava.bench.train_step import MODES, REFERENCE_EPS, naive_masked_attention
from dynamic_llava.cli import main
from dynamic_llava.model.masked_attention import masked_softmax_attention


def test_bench_train_tiny_writes_every_mode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--shape", "tiny", "--batch-size", "1", "--repeats", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert all(mode in table for mode in MODES)
    result = json.loads(out.read_text())
    assert set(result["modes"]) == set(MODES) == set(result["ratios_to_dense"])
    for mode, m in result["modes"].items():
        assert m["step_seconds"] > 0 and m["peak_increase_mib"] > 0 and m["peak_rss_mib"] > m["baseline_rss_mib"]
        assert m["first_step"]["loss"] > 0
        # the masked modes go through the masked softmax in layers sparse_layer.. (tiny: 2 of 4)
        assert m["masked_attention_calls_per_step"] == (0 if mode == "dense" else 2)
    masked, naive = result["modes"]["masked"]["first_step"], result["modes"]["naive-masked"]["first_step"]
    assert 0 < masked["vision_keep"] < 1 and 0 < masked["output_keep"] < 1  # decisions were made
    assert naive["vision_keep"] == masked["vision_keep"]  # same Gumbel noise
    assert naive["loss"] == pytest.approx(masked["loss"], rel=1e-2)


@pytest.mark.parametrize("eps, tolerance", [(0.0, 1e-9), (REFERENCE_EPS, 1e-4)])
def test_naive_attention_matches_the_library_forward_and_gradients(eps: float, tolerance: float) -> None:
    """The same maths, so the bench compares implementations, not formulas: exact without the reference's
    eps; with it, rows whose kept keys have a small total weight move by eps / total (~1e-5 here)."""
    g = torch.Generator().manual_seed(0)
    b, h, h_kv, t, d = 2, 4, 2, 11, 8
    q = torch.randn(b, h, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, h_kv, t, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    keep = (torch.rand(b, t, generator=g) > 0.5).double().requires_grad_()
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 8:] = False  # right padding
    grad_out = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    inputs = (q, k, v, keep)
    ours = masked_softmax_attention(*inputs, valid)
    naive = naive_masked_attention(*inputs, valid, eps=eps)
    torch.testing.assert_close(naive, ours, rtol=tolerance, atol=tolerance)
    for a, b_ in zip(torch.autograd.grad(naive, inputs, grad_out), torch.autograd.grad(ours, inputs, grad_out)):
        torch.testing.assert_close(a, b_, rtol=tolerance, atol=tolerance)
