"""Where a benchmark runs (`--device cpu | cuda | cuda:N`, `--dtype`), how it is timed there, and what is recorded.

On CPU a measurement is wall time (`time.perf_counter`). On CUDA kernels run asynchronously, so the
device is synchronised before the start and a pair of CUDA events brackets the work, read after a
final synchronisation; the peak of allocated GPU memory is reset before each measurement.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any, Callable, TypeVar

import torch

from ..cpu_features import native_bf16
from ..errors import UserError

T = TypeVar("T")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda or cuda:N: the random-weight model is built directly there")


def resolve_device(text: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N` as a device; a UserError when CUDA (or that GPU) is not available."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {text}: CUDA is not available here (torch {torch.__version__}, "
                            f"built for CUDA {torch.version.cuda or 'none'})")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {text}: only {torch.cuda.device_count()} GPU(s) visible")
        device = torch.device("cuda", index)
    return device


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="auto: bfloat16 where the CPU runs it natively (AMX / AVX512-BF16), else float32")


def resolve_dtype_name(name: str, device: torch.device) -> str:
    """`--dtype` with "auto" resolved (bfloat16 on CUDA and where the CPU runs it natively, else float32): the
    benchmarks resolve it before they start, so that the printed and saved results name the dtype that ran."""
    if name != "auto":
        return name
    return "bfloat16" if device.type == "cuda" or native_bf16() else "float32"


def timed(device: torch.device, fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()`'s result and its seconds on `device` (CUDA events between synchronisations on a GPU)."""
    if device.type != "cuda":
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start
    with torch.cuda.device(device):  # the events go on this GPU's current stream, where `fn` queues its work
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        result = fn()
        end.record()
        torch.cuda.synchronize(device)
    return result, begin.elapsed_time(end) / 1000


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated GPU memory since the last `reset_peak_memory`; None on CPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def device_info(device: torch.device) -> dict[str, Any]:
    """The JSON's record of where it ran: device, and on CUDA the GPU's name, CUDA version and memory."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, cuda=torch.version.cuda, device_memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}")
    return info
