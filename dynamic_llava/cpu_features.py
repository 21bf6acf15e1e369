"""Which CPU this is and what it does fast: bf16 matmuls are native on Intel AMX / AVX512-BF16 (about 5x fp32
there) and emulated, far slower than fp32, elsewhere (e.g. AMD EPYC with AVX2 only); and how much memory is
free."""

from __future__ import annotations

import argparse
from functools import cache
from pathlib import Path

_NATIVE_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}
DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]  # model.loading.resolve_dtype's names


def _first_field(cpuinfo: str, name: str) -> str | None:
    """The value of the first `name : value` line of a /proc/cpuinfo text (the first CPU's), None without one."""
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith(name)), None)


def lists_native_bf16(cpuinfo: str) -> bool:
    """Whether the first `flags` line of a /proc/cpuinfo text names a native bf16 instruction set."""
    return bool(_NATIVE_BF16_FLAGS & set((_first_field(cpuinfo, "flags") or "").split()))


def _this_cpuinfo() -> str:
    """This machine's /proc/cpuinfo ("" where it cannot be read)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_model_name(cpuinfo: str | None = None) -> str | None:
    """The first `model name` of a /proc/cpuinfo text (this machine's where none is given); None where there
    is none (e.g. on ARM, or where the file cannot be read)."""
    return _first_field(_this_cpuinfo() if cpuinfo is None else cpuinfo, "model name")


@cache
def native_bf16() -> bool:
    """This machine's answer (False where /proc/cpuinfo cannot be read)."""
    return lists_native_bf16(_this_cpuinfo())


def available_memory(meminfo: str | None = None) -> int | None:
    """Bytes the kernel says a new process can use without swapping (MemAvailable of /proc/meminfo, or of
    the `meminfo` text given); None where it cannot be told (then nothing is refused for lack of memory)."""
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the file counts kB (KiB)
    return None


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """The --dtype flag of every command that loads a model (here: parsing it must not import torch)."""
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="auto (default): bfloat16 on CPUs with native bf16 (AMX / AVX512-BF16), else float32; "
                             "float16 on CUDA (bfloat16 for bf16 checkpoints where supported)")
