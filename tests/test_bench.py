"""`dynamic-llava bench prefill` end to end at the tiny shape: the table, and the JSON contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_bench_refuses_unknown_shape(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "prefill", "--shape", "llava-99b"])
    assert exit_info.value.code == 2
