"""What the CPU can do fast: bf16 matmuls are native on Intel AMX / AVX512-BF16 (about 5x fp32 there) and
emulated, far slower than fp32, elsewhere (e.g. AMD EPYC with AVX2 only)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

_NATIVE_BF16_FLAGS = {"amx_bf16", "avx512_bf16"}


def lists_native_bf16(cpuinfo: str) -> bool:
    """Whether the first `flags` line of a /proc/cpuinfo text names a native bf16 instruction set."""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool(_NATIVE_BF16_FLAGS & set(flags))


@cache
def native_bf16() -> bool:
    """This machine's answer (False where /proc/cpuinfo cannot be read)."""
    try:
        return lists_native_bf16(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return False
