"""Which scaled-dot-product-attention kernel a piece of work reaches: flash, memory-efficient, cuDNN or math.

`F.scaled_dot_product_attention` picks its kernel at run time from the device, dtype, head size and mask.
On a GPU, flash and memory-efficient attention never hold a [T, S] score matrix; the math fallback does,
and is several times slower. A causal-only or padding mask should never land there (issue 21), and a
benchmark should say which kernel each phase used rather than assume it. A torch-function mode sees
every call and asks `torch._fused_sdp_choice` (the function SDPA itself consults; private but what
torch's own decompositions use) which kernel those inputs get. The mode adds Python overhead to every
op: record in an untimed run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

KERNEL_NAMES = {SDPBackend.FLASH_ATTENTION: "flash", SDPBackend.EFFICIENT_ATTENTION: "memory-efficient",
                SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.OVERRIDEABLE: "fused (device backend)",
                SDPBackend.MATH: "math"}
FALLBACK = "math"

T = TypeVar("T")


def sdpa_kernel_for(*args: Any, **kwargs: Any) -> str:
    """The kernel `F.scaled_dot_product_attention(*args, **kwargs)` runs ("flash (cpu)": CPU's flash)."""
    choice = KERNEL_NAMES.get(SDPBackend(torch._fused_sdp_choice(*args, **kwargs)), "unknown")
    return f"{choice} (cpu)" if choice == "flash" and args[0].device.type == "cpu" else choice


class _KernelRecorder(TorchFunctionMode):
    """Counts, per kernel, the `F.scaled_dot_product_attention` calls made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is F.scaled_dot_product_attention:
            self.calls[sdpa_kernel_for(*args, **(kwargs or {}))] += 1
        return func(*args, **(kwargs or {}))


def attention_kernels(work: Callable[[], T]) -> tuple[T, dict[str, int]]:
    """Run `work()` once; return its result and how many SDPA calls reached each kernel ({} when none did:
    the explicit matmul-softmax paths, e.g. H2O's, are not SDPA)."""
    recorder = _KernelRecorder()
    with recorder:
        result = work()
    return result, dict(sorted(recorder.calls.items()))


def describe(kernels: dict[str, int]) -> str:
    """'flash x32, memory-efficient x4' (or 'no SDPA'), for tables."""
    return ", ".join(f"{name} x{count}" for name, count in kernels.items()) or "no SDPA"
