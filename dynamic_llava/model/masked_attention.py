"""Masked-softmax attention for sparsification training (SPEC 2.3), with a gradient w.r.t. the keep mask.

    out_i = sum_j exp(s_ij) G_ij v_j / sum_j exp(s_ij) G_ij,   s_ij = q_i . k_j / sqrt(d)

over the causally visible keys j of query i, where G_ij = keep_j for j != i and G_ii = 1 (a dropped
token still sees itself). The mask multiplies the exponentials, so dL/dkeep_j is defined even where
keep_j = 0 (an additive -inf mask would have no gradient there): it tells the predictor how the loss
would change if the token were kept.

That derivative is r_ij (dO_i . v_j - dO_i . O_i) with r_ij = exp(s_ij) / sum_j' exp(s_ij') G_ij'. For a
dropped key r_ij has no upper bound: a key scoring far above every kept key gets a gradient that swamps
the keep-rate regulariser (on a dense model that attends sharply, stage 3 then learns to keep every
token). `bounded_keep_gradient` replaces r_ij by r_ij / (1 + r_ij) for dropped keys: the exact change of
O_i when key j is added back (the secant from keep_j = 0 to 1, at most |v_j - O_i|), equal to the
derivative where r_ij is small. Kept keys (r_ij <= 1) keep the derivative.

Memory stays like FlashAttention's: only q, k, v, the output and the per-row log-normaliser are
saved; the [T, T] score blocks are recomputed in backward, a few heads at a time, so the fp32 score
tensor never exceeds `_BLOCK_BYTES` (instead of B x H x T x T fp32 copies per layer kept by autograd).
"""

from __future__ import annotations

import math

import torch

_BLOCK_BYTES = 256 * 2**20  # fp32 bytes of one [B, heads, T, T] score block
# exp(s - lse) for a dropped key can exceed 1 (the normaliser only covers kept keys); capped so a
# key scoring far above every kept key gives a large, finite gradient instead of inf.
MAX_LOG_RATIO = 30.0


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                             key_valid: torch.Tensor | None = None, bounded_keep_gradient: bool = False
                             ) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, T, D] (H a multiple of Hkv), keep [B, T] (0/1, differentiable),
    key_valid [B, T] bool (None: all valid) -> out [B, H, T, D]. Causal over slot order.
    `bounded_keep_gradient`: dropped keys' dL/dkeep from the secant, not the derivative (module docstring)."""
    if key_valid is None:
        key_valid = torch.ones(keep.shape, dtype=torch.bool, device=keep.device)
    return _MaskedSoftmaxAttention.apply(q, k, v, keep, key_valid, bounded_keep_gradient)


def _visible(key_valid: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T]: causal and valid; every slot sees itself, so no row is empty (padding rows too)."""
    t = key_valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=key_valid.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=key_valid.device)
    return (causal[None, None] & key_valid[:, None, None, :]) | eye


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Softmax statistics in fp32 at least (fp64 inputs stay fp64, for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _gate(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """G [B, 1, T, T]: keep_j off the diagonal, 1 on it."""
    t = keep.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=keep.device)
    return torch.where(eye, 1.0, keep.to(dtype)[:, None, :])[:, None]


def _head_blocks(q: torch.Tensor, n_kv: int) -> list[tuple[int, int]]:
    """Ranges of KV heads processed together so that one fp32 score block stays under _BLOCK_BYTES."""
    b, h, t, _ = q.shape
    group = h // n_kv
    per_kv_head = b * group * t * t * 4
    step = max(1, min(n_kv, _BLOCK_BYTES // max(per_kv_head, 1)))
    return [(start, min(start + step, n_kv)) for start in range(0, n_kv, step)]


def _scores(q: torch.Tensor, k: torch.Tensor, group: int, visible: torch.Tensor) -> torch.Tensor:
    """Scaled scores [B, h, T, T] (fp32 at least) with invisible entries at -inf (k's heads repeated per group)."""
    k = k.repeat_interleave(group, dim=1) if group > 1 else k
    s = torch.matmul(q, k.transpose(-1, -2)).to(_compute_dtype(q)).mul_(1.0 / math.sqrt(q.shape[-1]))
    return s.masked_fill_(~visible, float("-inf"))


class _MaskedSoftmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,  # type: ignore[override]
                key_valid: torch.Tensor, bounded_keep_gradient: bool) -> torch.Tensor:
        ctx.bounded_keep_gradient = bounded_keep_gradient
        with torch.autocast(q.device.type, enabled=False):
            n_kv = k.shape[1]
            group = q.shape[1] // n_kv
            visible = _visible(key_valid)
            gate = _gate(keep, _compute_dtype(q))
            # Rows take their maximum over keys with G > 0 so the kept normaliser cannot underflow.
            positive = visible & (gate > 0)
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:3], dtype=_compute_dtype(q), device=q.device)
            for lo, hi in _head_blocks(q, n_kv):
                heads = slice(lo * group, hi * group)
                s = _scores(q[:, heads], k[:, lo:hi], group, visible)
                row_max = s.masked_fill(~positive, float("-inf")).amax(-1, keepdim=True)
                w = s.sub_(row_max).exp_().masked_fill_(~positive, 0.0).mul_(gate)
                norm = w.sum(-1, keepdim=True)
                p = w.div_(norm)
                vv = v[:, lo:hi].repeat_interleave(group, dim=1) if group > 1 else v[:, lo:hi]
                out[:, heads] = torch.matmul(p.to(v.dtype), vv)
                lse[:, heads] = (row_max + norm.log()).squeeze(-1)
        ctx.save_for_backward(q, k, v, keep, key_valid, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, keep, key_valid, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            n_kv = k.shape[1]
            group = q.shape[1] // n_kv
            scale = 1.0 / math.sqrt(q.shape[-1])
            visible = _visible(key_valid)
            dtype = _compute_dtype(q)
            gate = _gate(keep, dtype)
            off_diagonal = ~torch.eye(keep.shape[1], dtype=torch.bool, device=keep.device)
            grad_out = grad_out.to(dtype)
            delta = (grad_out * out.to(dtype)).sum(-1, keepdim=True)  # [B, H, T, 1]: dO_i . O_i
            dq = torch.zeros_like(q, dtype=dtype)
            dk = torch.zeros_like(k, dtype=dtype)
            dv = torch.zeros_like(v, dtype=dtype)
            dkeep = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
            b, _, t, d = q.shape
            for lo, hi in _head_blocks(q, n_kv):
                heads = slice(lo * group, hi * group)
                s = _scores(q[:, heads], k[:, lo:hi], group, visible)
                # exp(s - lse): softmax weight as if G_ij were 1; 0 where invisible.
                ratio = s.sub_(lse[:, heads, :, None]).clamp_(max=MAX_LOG_RATIO).exp_()
                vv = v[:, lo:hi].to(dtype).repeat_interleave(group, dim=1)
                kk = k[:, lo:hi].to(dtype).repeat_interleave(group, dim=1)
                dp = torch.matmul(grad_out[:, heads], vv.transpose(-1, -2)).sub_(delta[:, heads])
                if ctx.needs_input_grad[3]:
                    weight = torch.where(gate > 0, ratio, ratio / (1.0 + ratio)) if ctx.bounded_keep_gradient \
                        else ratio
                    dkeep += (weight * dp).masked_fill_(~off_diagonal, 0.0).sum(dim=(1, 2))
                p = ratio.mul_(gate)
                ds = dp.mul_(p)  # dL/ds_ij = P_ij (dO_i . v_j - dO_i . O_i)
                dq[:, heads] = torch.matmul(ds, kk).mul_(scale)
                n = hi - lo
                dk[:, lo:hi] = torch.matmul(ds.transpose(-1, -2), q[:, heads].to(dtype)).mul_(scale) \
                    .view(b, n, group, t, d).sum(2)
                dv[:, lo:hi] = torch.matmul(p.transpose(-1, -2), grad_out[:, heads]).view(b, n, group, t, d).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dkeep.to(keep.dtype), None, None
