"""The benchmarks' `--device`: CPU results as before, a clear refusal of CUDA where there is none, the
timing helper's CPU path, and the random-weight model materialised straight on the requested device."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dynamic_llava.bench import device as bench_device
from dynamic_llava.bench.random_llava import build_model
from dynamic_llava.bench.shapes import SHAPES
from dynamic_llava.cli import main
from dynamic_llava.errors import UserError

PREFILL = ["bench", "prefill", "--shape", "tiny", "--dtype", "float32", "--repeats", "1", "--decode-tokens", "2"]


def _keys(value: object) -> object:
    """The nested key structure of a JSON value (lists: their first element's)."""
    if isinstance(value, dict):
        return {key: _keys(item) for key, item in value.items()}
    if isinstance(value, list) and value:
        return [_keys(value[0])]
    return None


def test_device_cpu_gives_the_default_results_structure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    default, explicit = tmp_path / "default.json", tmp_path / "cpu.json"
    assert main([*PREFILL, "--json", str(default)]) == 0
    assert main([*PREFILL, "--device", "cpu", "--json", str(explicit)]) == 0
    a, b = json.loads(default.read_text()), json.loads(explicit.read_text())
    assert _keys(a) == _keys(b)
    assert b["device"] == "cpu" and "device_name" not in b and "cuda" not in b
    assert set(b["prefill_runs"]["dense"]) == {"seconds", "kernel_seconds", "page_faults"}  # no GPU peak on CPU
    assert "on cpu" in capsys.readouterr().out


@pytest.mark.parametrize("command", [
    ["bench", "prefill", "--shape", "tiny"],
    ["bench", "decode", "--shape", "tiny"],
    ["bench", "train", "--shape", "tiny"],
])
def test_device_cuda_without_cuda_exits_2_with_one_message(command: list[str], monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*command, "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "CUDA is not available" in lines[0]
    assert "bench" not in captured.out  # refused before any work


def test_resolve_device_rejects_a_malformed_name() -> None:
    with pytest.raises(UserError, match="cpu, cuda or cuda:N"):
        bench_device.resolve_device("gpu0")
    assert bench_device.resolve_device("cpu") == torch.device("cpu")


def test_timed_on_cpu_is_wall_time_without_touching_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(*args: object, **kwargs: object) -> None:
        raise AssertionError("CUDA touched on the CPU path")

    monkeypatch.setattr(torch.cuda, "synchronize", no_cuda)
    monkeypatch.setattr(torch.cuda, "Event", no_cuda)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", no_cuda)
    cpu = torch.device("cpu")
    result, seconds = bench_device.timed(cpu, lambda: (time.sleep(0.05), "done")[1])
    assert result == "done" and 0.05 <= seconds < 5
    bench_device.reset_peak_memory(cpu)
    assert bench_device.peak_memory_bytes(cpu) is None
    assert bench_device.device_info(cpu) == {"device": "cpu", "torch": torch.__version__}


class _Materialised(Exception):
    pass


def test_build_model_materialises_on_the_requested_device_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for cuda:0, the model goes from meta straight to to_empty(device=cuda:0): no parameter was ever
    on the CPU (stopped there, as this machine may have no GPU)."""
    seen: list[tuple[torch.device, set[torch.device]]] = []

    def to_empty(self: nn.Module, *, device: torch.device, recurse: bool = True) -> nn.Module:
        seen.append((torch.device(device), {p.device for p in self.parameters()}))
        raise _Materialised

    monkeypatch.setattr(nn.Module, "to_empty", to_empty)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    with pytest.raises(_Materialised):
        build_model(SHAPES["tiny"], torch.float32, device="cuda:0")
    assert seen == [(torch.device("cuda:0"), {torch.device("meta")})]


def test_build_model_on_cpu_fills_the_same_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.device] = []
    original = nn.Module.to_empty

    def to_empty(self: nn.Module, *, device: torch.device, recurse: bool = True) -> nn.Module:
        calls.append(torch.device(device))
        return original(self, device=device, recurse=recurse)

    monkeypatch.setattr(nn.Module, "to_empty", to_empty)
    model = build_model(SHAPES["tiny"], torch.float32, seed=3, device=torch.device("cpu"))
    again = build_model(SHAPES["tiny"], torch.float32, seed=3)
    assert calls == [torch.device("cpu")] * 2
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


def test_timed_on_cuda_brackets_the_work_with_events_between_synchronisations(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    """The CUDA path's order of calls, with torch.cuda faked (no GPU here): synchronize, record, work,
    record, synchronize, then the events' elapsed milliseconds as seconds."""
    calls: list[str] = []

    class Event:
        def __init__(self, enable_timing: bool) -> None:
            assert enable_timing

        def record(self) -> None:
            calls.append("record")

        def elapsed_time(self, other: Event) -> float:
            calls.append("elapsed")
            return 250.0

    class DeviceContext:
        def __init__(self, device: torch.device) -> None:
            calls.append(f"on {device}")

        def __enter__(self) -> None:
            pass

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "device", DeviceContext)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(f"sync {device}"))
    result, seconds = bench_device.timed(torch.device("cuda", 1), lambda: calls.append("work") or 7)
    assert (result, seconds) == (7, 0.25)
    assert calls == ["on cuda:1", "sync cuda:1", "record", "work", "record", "sync cuda:1", "elapsed"]
