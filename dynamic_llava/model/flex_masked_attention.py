"""The masked-softmax attention of sparsification training (SPEC 2.3) on FlexAttention: fused on CUDA.

Same maths as `masked_attention.masked_softmax_attention` (its docstring has the formula), in value and in
gradient w.r.t. q, k, v and keep:

- forward: one flex_attention call; the block mask is "causal and key valid, or the diagonal" and the
  score modification adds log(keep_j) off the diagonal (keep_j = 0 gives -inf: the key is dropped);
  flex's own autograd gives dq, dk, dv (the log-keep buffer carries no gradient);
- dL/dkeep_j = sum_heads sum_{i > j, visible} exp(min(s_ij - lse_i, cap)) (dO_i . v_j - dO_i . O_i) must
  also exist where keep_j = 0 (log-keep has no gradient there), so an identity Function on the output
  computes it in backward with one more flex_attention call, roles transposed (keys as queries, queries
  as keys, values [dO_i, dO_i . O_i]): the [T, T] matrix is never materialised.

On CUDA both calls go through `torch.compile(flex_attention)` (fused Triton kernels). Elsewhere flex has
no fused backward and its public function refuses backward on CPU (torch 2.13), so the calls run flex's
unfused math implementation (the higher-order op flex_attention itself runs eagerly), which materialises
the scores: for tests, not for training.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from .masked_attention import MAX_LOG_RATIO

try:  # AuxRequest (torch >= 2.9) is the lse API this module relies on
    from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention
except ImportError:
    flex_attention = None

_VALUE_ALIGN = 16  # Triton's flex kernels need head dims >= 16; [dO, delta] is padded to a multiple


def flex_attention_available() -> bool:
    return flex_attention is not None


def flex_masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                                  key_valid: torch.Tensor | None = None, bounded_keep_gradient: bool = False,
                                  decided: torch.Tensor | None = None) -> torch.Tensor:
    """`masked_softmax_attention` on FlexAttention: q [B, H, T, D], k/v [B, Hkv, T, D] (H a multiple of Hkv),
    keep [B, T] in [0, 1] (differentiable), key_valid [B, T] bool (None: all valid) -> out [B, H, T, D].
    `bounded_keep_gradient`, `decided`: as in `masked_softmax_attention` (dL/dkeep is computed for every slot,
    then zeroed outside `decided`)."""
    if key_valid is None:
        key_valid = torch.ones(keep.shape, dtype=torch.bool, device=keep.device)
    # Scores are fp32 in flex's kernels (fp64 in its math path for fp64 inputs): log(keep) alike
    log_keep = keep.detach().to(torch.promote_types(q.dtype, torch.float32)).log()

    def gate(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor
             ) -> torch.Tensor:
        return torch.where(i == j, score, score + log_keep[b, j])  # a dropped token still sees itself

    out, lse = _flex(q, k, v, gate, _masks.get("visible", key_valid, k.shape[2]), 1.0 / math.sqrt(q.shape[-1]))
    return _KeepGradient.apply(out, keep, q, k, v, key_valid, decided, lse.detach(), bounded_keep_gradient)


class _KeepGradient(torch.autograd.Function):
    """Identity on the attention output; backward passes its gradient through and adds dL/dkeep."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, keep: torch.Tensor, q: torch.Tensor, k: torch.Tensor,  # type: ignore[override]
                v: torch.Tensor, key_valid: torch.Tensor, decided: torch.Tensor | None, lse: torch.Tensor,
                bounded_keep_gradient: bool) -> torch.Tensor:
        ctx.save_for_backward(q, k, v, keep, key_valid, out, lse)  # flex saves these too: no extra memory
        ctx.decided = decided
        ctx.keep_dtype = keep.dtype
        ctx.bounded_keep_gradient = bounded_keep_gradient
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        dkeep = None
        if ctx.needs_input_grad[1]:
            dkeep = _keep_gradient(*ctx.saved_tensors, grad_out, ctx.bounded_keep_gradient).to(ctx.keep_dtype)
            if ctx.decided is not None:
                dkeep = dkeep.masked_fill(~ctx.decided, 0.0)
        return grad_out, dkeep, None, None, None, None, None, None, None


def _keep_gradient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, key_valid: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor, bounded: bool) -> torch.Tensor:
    """dL/dkeep [B, T] (fp32 at least). Query j of the transposed call is key j, its keys the later queries i:
    score s_ij - lse_i (capped), values [dO_i, delta_i], so sum_i exp(s_ij - lse_i) [dO_i, delta_i] is
    exp(lse'_j) out'_j, and dL/dkeep_j = sum_h exp(lse'_jh) (v_j . out'_jh[:D] - out'_jh[D]). `bounded`: a
    dropped key's score is log(r / (1 + r)) = logsigmoid(s_ij - lse_i) instead of log r."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    delta = (grad_out.to(dtype) * out.to(dtype)).sum(-1, keepdim=True)  # dO_i . O_i
    width = -(-(d + 1) // _VALUE_ALIGN) * _VALUE_ALIGN  # zero columns change no dot product
    values = torch.cat([grad_out.to(q.dtype), delta.to(q.dtype), q.new_zeros(b, h, t, width - d - 1)], -1)
    lse = lse.to(dtype)
    dropped = keep.detach() <= 0

    def ratio(score: torch.Tensor, b: torch.Tensor, h: torch.Tensor, j: torch.Tensor, i: torch.Tensor
              ) -> torch.Tensor:
        # exp(s - lse) for a dropped key can exceed 1 (the normaliser covers kept keys only): capped
        log_ratio = torch.clamp(score - lse[b, h, i], max=MAX_LOG_RATIO)
        if not bounded:
            return log_ratio
        return torch.where(dropped[b, j], torch.nn.functional.logsigmoid(log_ratio), log_ratio)

    keys_as_queries = k.repeat_interleave(group, 1) if group > 1 else k
    moved, moved_lse = _flex(keys_as_queries, q, values, ratio, _masks.get("later", key_valid, t),
                             1.0 / math.sqrt(d))
    v = v.repeat_interleave(group, 1) if group > 1 else v
    per_head = (v.to(dtype) * moved[..., :d].to(dtype)).sum(-1) - moved[..., d].to(dtype)
    # A key without a later visible query (the last slot, padding) has lse' = -inf: no gradient, not NaN
    return torch.where(moved_lse.isneginf(), 0.0, moved_lse.to(dtype).exp() * per_head).sum(1)


def _visible(key_valid: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Query i sees key j: causal and valid, or its own slot (padding rows too, so no row is empty)."""
    def mask(b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return ((j <= i) & key_valid[b, j]) | (i == j)
    return mask


def _later(key_valid: torch.Tensor) -> Callable[..., torch.Tensor]:
    """Transposed, off the diagonal: key j (as a query) meets every later query i (as a key) when j is valid."""
    def mask(b: torch.Tensor, h: torch.Tensor, j: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return (i > j) & key_valid[b, j]
    return mask


class _BlockMasks:
    """The block masks of the last key_valid seen. Every masked layer of a step passes the same tensor
    (forward, and backward for the transposed mask), so each mask is built once per step, not per layer."""

    def __init__(self) -> None:
        self.cached: dict[str, tuple[torch.Tensor, int, BlockMask]] = {}

    def get(self, kind: str, key_valid: torch.Tensor, t: int) -> BlockMask:
        hit = self.cached.get(kind)
        if hit is not None and hit[0] is key_valid and hit[1] == key_valid._version:
            return hit[2]
        mask_mod = _visible(key_valid) if kind == "visible" else _later(key_valid)
        block_mask = create_block_mask(mask_mod, key_valid.shape[0], None, t, t, device=key_valid.device)
        self.cached[kind] = (key_valid, key_valid._version, block_mask)
        return block_mask


_masks = _BlockMasks()


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Callable[..., torch.Tensor],
          block_mask: BlockMask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse in natural log) of one flex_attention call: compiled on CUDA, flex's math path elsewhere."""
    if q.is_cuda:
        out, aux = _compiled_flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1], return_aux=AuxRequest(lse=True))
        return out, aux.lse  # flex_attention returns it in natural log (its kernels' base 2, converted)
    from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_op

    # The eager op traces score_mod's backward with autograd.grad at every call: under non-reentrant
    # activation checkpointing that inner grad would unpack checkpoint's saved tensors, recompute the
    # layer mid-forward and corrupt the gradients. So the op's own saves bypass checkpoint's hooks
    # (kept rather than recomputed: memory does not matter on this unfused path). The compiled path
    # traces once, with saved-tensor hooks disabled (AOTAutograd), and needs none of this.
    with torch.autograd.graph.saved_tensors_hooks(_keep_as_is, _keep_as_is):
        # GQA: the op repeats k / v per query-head group itself; its lse is base 2 (the public
        # function multiplies it by ln 2)
        out, lse = flex_attention_op(q, k, v, score_mod, block_mask.as_tuple(), scale, {})[:2]
    return out, lse * math.log(2.0)


def _keep_as_is(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@functools.cache
def _compiled_flex_attention() -> Callable[..., tuple[torch.Tensor, Any]]:
    """Compiled once, on first use: compiling at import would cost every process, fused or not."""
    return torch.compile(flex_attention)
