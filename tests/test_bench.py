"""`dynamic-llava bench prefill` end to end at the tiny shape: the table, and the JSON contract."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from dynamic_llava.bench.decode import _lengths
from dynamic_llava.cli import main


def test_bench_prefill_tiny_writes_the_json_contract(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "prefill", "--shape", "tiny", "--dtype", "float32", "--repeats", "1",
                 "--decode-tokens", "4", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "ours dense" in table and "ours sparse" in table and "transformers dense" in table
    result = json.loads(out.read_text())
    assert set(result["prefill_seconds"]) >= {"dense", "sparse", "transformers"}
    assert set(result["decode_seconds_per_token"]) >= {"dense", "sparse"}
    assert set(result["kv_cache_bytes"]) >= {"dense", "sparse"}
    assert all(v > 0 for v in result["prefill_seconds"].values())
    # sparse keeps 115 of 576 image tokens, so its cache must be smaller than dense
    assert 0 < result["kv_cache_bytes"]["sparse"] < result["kv_cache_bytes"]["dense"]
    assert "output_keep_rule" in result
    # which SDPA kernel each model's prefill and decode step reached (CPU: flash, never the math fallback)
    kernels = result["attention_kernels"]
    assert set(kernels["prefill"]) == {"dense", "sparse", "transformers"} and set(kernels["decode"]) == {"dense", "sparse"}
    assert all(k and "math" not in k for phase in kernels.values() for k in phase.values()), kernels
    assert "SDPA kernels, prefill:" in table


def test_bench_refuses_unknown_shape(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "prefill", "--shape", "llava-99b"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("shape, dense, sparse, fastv", [("llava-1.5-7b", 10.1, 2.5, 3.2),
                                                          ("llava-1.5-13b", 19.6, 4.7, 6.0)])
def test_flops_paper_formula_reproduces_table_10(shape: str, dense: float, sparse: float, fastv: float,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "flops.json"
    assert main(["bench", "flops", "--shape", shape, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    paper = result["paper_formula_tflops"]
    assert (round(paper["dense"], 1), round(paper["sparse"], 1), round(paper["fastv"], 1)) == (dense, sparse, fastv)
    assert result["kept_image_tokens"] == {"dense": 576, "sparse": 115, "fastv": 144}
    exact = result["exact_tflops"]
    assert exact["sparse"] < exact["fastv"] < exact["dense"]
    assert "paper" in capsys.readouterr().out


def test_exact_flops_match_an_operator_level_count_of_the_real_forward() -> None:
    """Independent check: torch's FlopCounterMode on the tiny model's actual prefill, dense and sparse
    (attention through the math backend, which the counter sees as full-square matmuls)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dynamic_llava.bench.flops import exact_prefill_flops, schedules
    from dynamic_llava.bench.random_llava import DENSE, SPARSE, build_model
    from dynamic_llava.bench.shapes import SHAPES
    from dynamic_llava.constants import IMAGE_TOKEN_INDEX
    from dynamic_llava.model.policy import make_policy

    shape = SHAPES["tiny"]
    model = build_model(shape, torch.float32)
    text = 20
    prompt = [1] * 5 + [IMAGE_TOKEN_INDEX] + [7] * (text - 5)
    pixels = torch.randn(1, 3, 336, 336)
    plans = {p.name: p for p in schedules(shape, 576, 0.2, 3, 0.75)}
    for name, policy in (("dense", make_policy(model, DENSE)), ("sparse", make_policy(model, SPARSE))):
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            batch = model.embed([prompt], [pixels])
            model.step(batch, model.new_cache(1), policy)
        expected = exact_prefill_flops(shape, plans[name], text, 576, causal=False)
        assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9), name


def test_bench_decode_tiny_kv_grows_with_kept_tokens_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, plot = tmp_path / "decode.json", tmp_path / "decode.png"
    assert main(["bench", "decode", "--shape", "tiny", "--dtype", "float32", "--lengths", "12,24",
                 "--check-length", "12", "--no-cache-lengths", "3,6", "--no-cache-points", "3",
                 "--no-cache-check", "4", "--window", "4", "--json", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())
    dense, sparse = result["with_cache"]["dense"], result["with_cache"]["sparse"]
    assert [p["output_tokens"] for p in dense] == [12, 24] and all(p["fits"] for p in dense + sparse)
    # every layer holds exactly prompt + generated (dense) / text + kept image + kept output (sparse)
    assert all(p["entries_check"] for p in dense + sparse)
    # dense: every generated token adds one entry per layer; sparse: fewer (image and output tokens dropped)
    per_token_dense = (dense[1]["kv_cache_bytes"] - dense[0]["kv_cache_bytes"]) / 12
    per_token_sparse = (sparse[1]["kv_cache_bytes"] - sparse[0]["kv_cache_bytes"]) / 12
    assert per_token_sparse < per_token_dense
    assert all(s["kv_cache_bytes"] < d["kv_cache_bytes"] for d, s in zip(dense, sparse))
    # the filled cache holds what a real decode of the same length holds (dense: exactly; sparse: the same
    # prompt entries and the measured kept fraction)
    check = result["check"]
    assert check["dense"]["filled"]["kv_cache_bytes"] == check["dense"]["real"]["kv_cache_bytes"]
    assert check["sparse"]["filled"]["kv_cache_bytes"] < check["dense"]["filled"]["kv_cache_bytes"]
    assert dense[0]["kv_cache_bytes"] == dense[0]["kv_cache_bytes_needed"]
    uncached = result["without_cache"]["sparse"]
    assert set(uncached["total_seconds"]) == {"3", "6"} and set(uncached["step_seconds"]) == {"embed", "0", "2", "5"}
    assert uncached["total_seconds"]["6"] > uncached["total_seconds"]["3"] > 0
    assert uncached["check"]["real_seconds"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(p["attention_kernels"] and "math" not in p["attention_kernels"] for p in dense + sparse)
    table = capsys.readouterr().out
    assert "output_keep_rule" in result and "with KV cache" in table and "SDPA kernels of one dense step" in table


def test_total_from_steps_interpolates_between_measured_points() -> None:
    from dynamic_llava.bench.decode import total_from_steps

    steps = {"embed": 1.0, 0: 2.0, 4: 6.0}  # step(t) = 2 + t
    assert total_from_steps(steps, 5) == pytest.approx(1.0 + sum(2 + t for t in range(5)))
    with pytest.raises(ValueError):
        total_from_steps(steps, 6)


def test_decoder_fill_matches_real_decoding_entry_counts() -> None:
    from dynamic_llava.bench.random_llava import DENSE, Decoder, build_model, make_inputs
    from dynamic_llava.bench.shapes import SHAPES
    from dynamic_llava.model.policy import make_policy

    shape = SHAPES["tiny"]
    model = build_model(shape, torch.float32, 0)
    inputs = make_inputs(1, 8, shape.vision, 0)
    policy = make_policy(model, DENSE)
    real, filled = Decoder(model, inputs, policy), Decoder(model, inputs, policy)
    real.replicate(3)
    filled.replicate(3)
    for _ in range(6):
        real.step()
    filled.step()
    filled.fill(5, 5, policy.sparse_layer)
    assert torch.equal(real.cache.lengths(), filled.cache.lengths())
    assert torch.equal(real.positions, filled.positions) and filled.fed == real.fed == 6
    # entries carry the true positions of the tokens they stand for
    for a, b in zip(real.cache.layers, filled.cache.layers):
        n = int(a.lengths[0])
        assert torch.equal(a.positions[:, :n].sort(1).values, b.positions[:, :n].sort(1).values)
    assert filled.kv_report(policy.sparse_layer)["entries_check"]


@pytest.mark.parametrize(("text", "lengths"), [("", []), (",", []), ("4096,1024,1024", [1024, 4096])])
def test_decode_length_lists_parse(text: str, lengths: list[int]) -> None:
    assert _lengths(text) == lengths


@pytest.mark.parametrize("text", ["0,8", "a,b", "-3"])
def test_decode_length_lists_refuse_bad_counts(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _lengths(text)
