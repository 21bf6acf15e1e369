"""`--dtype auto` (every command's default): bfloat16 on CPUs with native bf16, float32 where bf16 is emulated,
CUDA as before; a model that cannot fit the memory is refused with one message naming the dtype that would."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from dynamic_llava import ask, cpu_features
from dynamic_llava.bench import device as bench_device
from dynamic_llava.cli import main
from dynamic_llava.errors import UserError
from dynamic_llava.eval import generation_ability, runner
from dynamic_llava.model import loading
from dynamic_llava.model.checkpoint_files import read_checkpoint_config
from dynamic_llava.model.layouts import expected_shapes
from dynamic_llava.model.loading import load_pretrained_model, memory_shortfall, resolve_dtype
from dynamic_llava.serve import cli as serve_cli
from dynamic_llava.serve import options

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "dynamic_llava" / "assets" / "sample.png"
CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_is_bf16_only_where_it_is_native(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(loading, "native_bf16", lambda: native)
    assert resolve_dtype("auto", CPU, "float32") == (torch.bfloat16 if native else torch.float32)
    # None, the Python default, stays exact float32 on every CPU (the parity tests' reference)
    assert resolve_dtype(None, CPU, "bfloat16") == torch.float32


@pytest.mark.parametrize("dtype", ["auto", None])
def test_auto_on_cuda_and_mps_is_unchanged(monkeypatch, dtype: str | None) -> None:
    monkeypatch.setattr(loading, "native_bf16", lambda: True)  # the host CPU does not matter there
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype(dtype, CUDA, "bfloat16") == torch.bfloat16
    assert resolve_dtype(dtype, CUDA, "float16") == torch.float16
    assert resolve_dtype(dtype, CUDA, None) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype(dtype, CUDA, "bfloat16") == torch.float16
    assert resolve_dtype(dtype, MPS, "bfloat16") == torch.float16


def test_explicit_dtypes_win_and_unknown_names_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(loading, "native_bf16", lambda: True)
    assert resolve_dtype("float32", CPU, "bfloat16") == torch.float32
    assert resolve_dtype("fp16", CUDA, "bfloat16") == torch.float16
    assert resolve_dtype(torch.float64, CPU, None) == torch.float64
    with pytest.raises(UserError, match="unknown dtype 'int8'.*auto, float32, bfloat16, float16"):
        resolve_dtype("int8", CPU, None)


def test_available_memory_reads_memavailable() -> None:
    meminfo = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n"
    assert cpu_features.available_memory(meminfo) == 20000000 * 1024
    assert cpu_features.available_memory("MemTotal: 1 kB\n") is None


def test_memory_message_names_the_dtype_that_fits(monkeypatch) -> None:
    gb = 10**9
    monkeypatch.setattr(loading, "native_bf16", lambda: True)
    assert memory_shortfall(7 * gb, 0, torch.float32, 29 * gb) is None
    # LLaVA-1.5-7B on a 24 GB machine: float32 does not fit, bfloat16 does
    message = memory_shortfall(7 * gb, 0, torch.float32, 23 * gb)
    assert message == ("the model does not fit in memory: 7.00 B parameters need about 28.0 GB in float32, and "
                       "23.0 GB is available; in bfloat16 it needs about 14.0 GB: pass --dtype bfloat16")
    monkeypatch.setattr(loading, "native_bf16", lambda: False)
    assert memory_shortfall(7 * gb, 0, torch.float32, 23 * gb).endswith(
        "pass --dtype bfloat16 (slower than float32 on this CPU, which has no native bf16)")
    # a .bin shard is read whole beside the model; nothing smaller than bfloat16 is offered
    message = memory_shortfall(7 * gb, 10 * gb, torch.bfloat16, 23 * gb)
    assert "need about 24.0 GB in bfloat16 + 10.0 GB to read the largest .bin weight file" in message
    assert message.endswith("free memory or use a machine with more")
    assert memory_shortfall(7 * gb, 0, torch.float32, 13 * gb).endswith("free memory or use a machine with more")


def _tiny_params(path: Path) -> int:
    return sum(s.numel() for s in expected_shapes(read_checkpoint_config(path)[1]).values())


def test_a_load_that_cannot_fit_is_refused_before_allocating(monkeypatch, tiny_llava_dir: Path) -> None:
    n = _tiny_params(tiny_llava_dir)
    monkeypatch.setattr(loading, "native_bf16", lambda: True)
    monkeypatch.setattr(loading, "available_memory", lambda: 3 * n)  # bf16 (2n) fits, fp32 (4n) does not
    _, model, _, _ = load_pretrained_model(tiny_llava_dir, dtype="auto")
    assert model.dtype == torch.bfloat16
    with pytest.raises(UserError, match="does not fit in memory.*in float32.*pass --dtype bfloat16"):
        load_pretrained_model(tiny_llava_dir, dtype="float32")
    monkeypatch.setattr(loading, "available_memory", lambda: None)  # unknown: nothing is refused
    assert load_pretrained_model(tiny_llava_dir)[1].dtype == torch.float32


def test_the_cli_reports_the_shortfall_with_exit_code_2(monkeypatch, capsys, tiny_llava_dir: Path) -> None:
    monkeypatch.setattr(loading, "native_bf16", lambda: False)  # auto -> float32 here
    monkeypatch.setattr(loading, "available_memory", lambda: 3 * _tiny_params(tiny_llava_dir))
    code = main(["ask", "--model-path", str(tiny_llava_dir), "--image-file", str(IMAGE), "--query", "Hi?",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {tiny_llava_dir}: the model does not fit in memory")
    assert "in float32" in err and "pass --dtype bfloat16 (slower than float32 on this CPU" in err


def _parser(add) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser


PARSERS = {
    "ask": lambda: _parser(ask.add_arguments),
    "eval-runner": lambda: _parser(lambda p: runner.add_arguments(p, 16)),
    "generation-ability": lambda: _parser(generation_ability.add_arguments),
    "serve-cli": serve_cli.build_parser,
    "serve-options": lambda: _parser(options.add_model_arguments),
}


@pytest.mark.parametrize("command", PARSERS)
def test_every_model_loading_command_defaults_to_auto(command: str) -> None:
    dtype = next(a for a in PARSERS[command]()._actions if a.dest == "dtype")
    assert dtype.default == "auto"
    assert list(dtype.choices) == ["auto", "float32", "bfloat16", "float16"]
    device = next(a for a in PARSERS[command]()._actions if a.dest == "device")
    assert (device.default, device.help) == (None, "cpu, cuda, cuda:1, ... (default: cuda if available)")


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_bench_auto_records_the_dtype_it_ran(monkeypatch, tmp_path: Path, native: bool, expected: str) -> None:
    monkeypatch.setattr(bench_device, "native_bf16", lambda: native)  # every bench resolves "auto" there
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--shape", "tiny", "--lengths", "12", "--check-length", "12",
                 "--no-cache-lengths", "", "--window", "4", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["dtype"] == expected


def test_only_pre_zip_bin_weights_count_as_read_whole(monkeypatch, tiny_llava_dir: Path, tmp_path: Path) -> None:
    """torch.load memory-maps a zip-format .bin (LLaVA-1.5's shards), so only a pre-zip file is counted beside
    the model; both formats load the same weights."""
    from safetensors.torch import load_file

    from dynamic_llava.model.checkpoint_files import read_state_file

    n = _tiny_params(tiny_llava_dir)
    state = load_file(tiny_llava_dir / "model.safetensors")
    monkeypatch.setattr(loading, "available_memory", lambda: 4 * n + 1000)  # float32 fits, nothing more
    config = read_checkpoint_config(tiny_llava_dir)[1]
    for zipped in (True, False):
        folder = tmp_path / str(zipped)
        folder.mkdir()
        torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
        loaded = read_state_file(folder / "pytorch_model.bin")
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
        if zipped:
            loading.check_fits_memory(config, folder, torch.float32, torch.device("cpu"))
        else:
            with pytest.raises(UserError, match="to read the largest .bin weight file"):
                loading.check_fits_memory(config, folder, torch.float32, torch.device("cpu"))
