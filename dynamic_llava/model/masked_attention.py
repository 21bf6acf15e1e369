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

Two paths compute it, with the same values and gradients:

- on CPU, the output and dq, dk, dv come from PyTorch's fused flash-attention kernel for CPU (the op behind
  SDPA there, which also returns the per-row log-normaliser) with the gate as an additive log(G) mask;
- elsewhere, score blocks of a few heads at a time (`_BLOCK_BYTES`), recomputed in backward.

Either way only q, k, v, the output and the log-normaliser are saved, and dL/dkeep is computed in backward
from recomputed scores, only for the key slots the caller marks `decided` (the image tokens and the long
answers whose keep decisions were sampled; every other slot's keep is a constant): with about half the
slots decided, that is about half the [T, T] work.
"""

from __future__ import annotations

import math

import torch

_BLOCK_BYTES = 256 * 2**20  # fp32 bytes of one [B, heads, T, T] score block
# exp(s - lse) for a dropped key can exceed 1 (the normaliser only covers kept keys); capped so a
# key scoring far above every kept key gives a large, finite gradient instead of inf.
MAX_LOG_RATIO = 30.0
# (out, lse) = op(q, k, v, dropout, is_causal, attn_mask=, scale=) and its backward: PyTorch's CPU flash kernels
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_CPU_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                             key_valid: torch.Tensor | None = None, bounded_keep_gradient: bool = False,
                             decided: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, T, D] (H a multiple of Hkv), keep [B, T] (0/1, differentiable),
    key_valid [B, T] bool (None: all valid) -> out [B, H, T, D]. Causal over slot order.
    `bounded_keep_gradient`: dropped keys' dL/dkeep from the secant, not the derivative (module docstring).
    `decided` [B, T] bool: the slots whose dL/dkeep is wanted (None: all); the others get 0."""
    if key_valid is None:
        key_valid = torch.ones(keep.shape, dtype=torch.bool, device=keep.device)
    if decided is None:
        decided = torch.ones(keep.shape, dtype=torch.bool, device=keep.device)
    return _MaskedSoftmaxAttention.apply(q, k, v, keep, key_valid, decided, bounded_keep_gradient)


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


def _log_gate(keep: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [B, 1, T, T] of the CPU kernel: log G where visible (-inf for a dropped key), -inf
    elsewhere."""
    t = keep.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=keep.device)
    log_gate = torch.where(eye, 0.0, keep.to(dtype).log()[:, None, :])[:, None]  # the log of [B, T] only
    return log_gate.masked_fill_(~_visible(key_valid), float("-inf"))


def _use_cpu_flash(q: torch.Tensor) -> bool:
    return q.device.type == "cpu" and _CPU_FLASH is not None


def _repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def _head_blocks(q: torch.Tensor, n_kv: int, n_keys: int | None = None) -> list[tuple[int, int]]:
    """Ranges of KV heads processed together so that one fp32 score block [B, heads, T, n_keys] (n_keys
    None: T) stays under _BLOCK_BYTES."""
    b, h, t, _ = q.shape
    group = h // n_kv
    per_kv_head = b * group * t * (t if n_keys is None else n_keys) * 4
    step = max(1, min(n_kv, _BLOCK_BYTES // max(per_kv_head, 1)))
    return [(start, min(start + step, n_kv)) for start in range(0, n_kv, step)]


def _scores(q: torch.Tensor, k: torch.Tensor, group: int, visible: torch.Tensor) -> torch.Tensor:
    """Scaled scores [B, h, T, T] (fp32 at least) with invisible entries at -inf (k's heads repeated per group)."""
    s = torch.matmul(q, _repeat_heads(k, group).transpose(-1, -2)).to(_compute_dtype(q))
    return s.mul_(1.0 / math.sqrt(q.shape[-1])).masked_fill_(~visible, float("-inf"))


class _MaskedSoftmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,  # type: ignore[override]
                key_valid: torch.Tensor, decided: torch.Tensor, bounded_keep_gradient: bool) -> torch.Tensor:
        ctx.bounded_keep_gradient = bounded_keep_gradient
        with torch.autocast(q.device.type, enabled=False):
            forward = _cpu_flash_forward if _use_cpu_flash(q) else _blocked_forward
            out, lse = forward(q, k, v, keep, key_valid)
        ctx.save_for_backward(q, k, v, keep, key_valid, decided, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        q, k, v, keep, key_valid, decided, out, lse = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            backward = _cpu_flash_backward if _use_cpu_flash(q) else _blocked_backward
            dq, dk, dv = backward(q, k, v, keep, key_valid, out, lse, grad_out)
            dkeep = None
            if ctx.needs_input_grad[3]:
                dkeep = _keep_gradient(q, k, v, keep, key_valid, decided, out, lse, grad_out,
                                       ctx.bounded_keep_gradient).to(keep.dtype)
        return dq, dk, dv, dkeep, None, None, None


def _cpu_flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                       key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    group = q.shape[1] // k.shape[1]
    # The kernel wants one dtype (under autocast, RoPE leaves q and k fp32 and v bf16): q's, the output's
    out, lse = _CPU_FLASH(q, _repeat_heads(k.to(q.dtype), group), _repeat_heads(v.to(q.dtype), group),
                          attn_mask=_log_gate(keep, key_valid, _compute_dtype(q)), scale=1.0 / math.sqrt(q.shape[-1]))
    return out, lse.to(_compute_dtype(q))


def _cpu_flash_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, key_valid: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, t, d = q.shape
    n_kv = k.shape[1]
    group = h // n_kv
    dq, dk, dv = _CPU_FLASH_BACKWARD(grad_out.to(q.dtype).contiguous(), q, _repeat_heads(k.to(q.dtype), group),
                                     _repeat_heads(v.to(q.dtype), group), out, lse, 0.0, False,
                                     attn_mask=_log_gate(keep, key_valid, _compute_dtype(q)),
                                     scale=1.0 / math.sqrt(d))
    if group > 1:
        dk, dv = (x.view(b, n_kv, group, t, d).sum(2) for x in (dk, dv))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _blocked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, key_valid: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
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
        out[:, heads] = torch.matmul(p.to(v.dtype), _repeat_heads(v[:, lo:hi], group))
        lse[:, heads] = (row_max + norm.log()).squeeze(-1)
    return out, lse


def _blocked_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, key_valid: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_kv = k.shape[1]
    group = q.shape[1] // n_kv
    scale = 1.0 / math.sqrt(q.shape[-1])
    visible = _visible(key_valid)
    dtype = _compute_dtype(q)
    gate = _gate(keep, dtype)
    grad_out = grad_out.to(dtype)
    delta = (grad_out * out.to(dtype)).sum(-1, keepdim=True)  # [B, H, T, 1]: dO_i . O_i
    dq = torch.zeros_like(q, dtype=dtype)
    dk = torch.zeros_like(k, dtype=dtype)
    dv = torch.zeros_like(v, dtype=dtype)
    b, _, t, d = q.shape
    for lo, hi in _head_blocks(q, n_kv):
        heads = slice(lo * group, hi * group)
        s = _scores(q[:, heads], k[:, lo:hi], group, visible)
        # exp(s - lse) G: 0 where invisible; capped first, or a dropped key far above the kept ones gives inf x 0
        p = s.sub_(lse[:, heads, :, None]).clamp_(max=MAX_LOG_RATIO).exp_().mul_(gate)
        vv = _repeat_heads(v[:, lo:hi].to(dtype), group)
        kk = _repeat_heads(k[:, lo:hi].to(dtype), group)
        dp = torch.matmul(grad_out[:, heads], vv.transpose(-1, -2)).sub_(delta[:, heads])
        ds = dp.mul_(p)  # dL/ds_ij = P_ij (dO_i . v_j - dO_i . O_i)
        dq[:, heads] = torch.matmul(ds, kk).mul_(scale)
        n = hi - lo
        dk[:, lo:hi] = torch.matmul(ds.transpose(-1, -2), q[:, heads].to(dtype)).mul_(scale) \
            .view(b, n, group, t, d).sum(2)
        dv[:, lo:hi] = torch.matmul(p.transpose(-1, -2), grad_out[:, heads]).view(b, n, group, t, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _keep_gradient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, key_valid: torch.Tensor,
                   decided: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                   bounded: bool) -> torch.Tensor:
    """dL/dkeep [B, T] (fp32 at least), 0 outside `decided`:

        dL/dkeep_j = sum_h sum_{i later than j, visible} w_ij (dO_i . v_j - dO_i . O_i)

    with w_ij = r_ij = exp(s_ij - lse_i) (capped), or r_ij / (1 + r_ij) for a dropped key when `bounded`.
    Only the decided keys are gathered (padded to the most any sample has); q carries -lse_i as one more
    column against a column of ones in k, so one matmul gives s_ij - lse_i; sum_i w_ij [dO_i, delta_i] is a
    second matmul."""
    b, h, t, d = q.shape
    n_kv = k.shape[1]
    group = h // n_kv
    dtype = _compute_dtype(q)
    counts = decided.sum(1)
    n = int(counts.max()) if counts.numel() else 0
    dkeep = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    if n == 0:
        return dkeep
    # The decided slots of each sample first, in slot order (a stable sort), then padding slots
    slots = torch.sort((~decided).to(torch.uint8), dim=1, stable=True).indices[:, :n]  # [B, n]
    real = torch.arange(n, device=keep.device)[None, :] < counts[:, None]
    rows = torch.arange(t, device=keep.device)
    later = (rows[None, :, None] > slots[:, None, :]) & (key_valid.gather(1, slots) & real)[:, None, :]  # [B, T, n]
    dropped = (keep.detach().gather(1, slots) <= 0).to(dtype)[:, None, None, :]  # [B, 1, 1, n]

    def gather_keys(x: torch.Tensor) -> torch.Tensor:  # [B, Hkv, T, D] -> [B, Hkv, n, D]
        return x.gather(2, slots[:, None, :, None].expand(b, n_kv, n, d)).to(dtype)

    queries = torch.cat([q.to(dtype) / math.sqrt(d), -lse[..., None]], -1)  # [B, H, T, D + 1]
    keys = gather_keys(k)
    keys = torch.cat([keys, keys.new_ones(b, n_kv, n, 1)], -1)
    values = gather_keys(v)
    grad_out = grad_out.to(dtype)
    moved = torch.cat([grad_out, (grad_out * out.to(dtype)).sum(-1, keepdim=True)], -1)  # [dO_i, delta_i]
    selected = torch.zeros(b, n, dtype=dtype, device=keep.device)
    for lo, hi in _head_blocks(q, n_kv, n):
        heads = slice(lo * group, hi * group)
        log_ratio = torch.matmul(queries[:, heads], _repeat_heads(keys[:, lo:hi], group).transpose(-1, -2))
        w = log_ratio.masked_fill_(~later[:, None], float("-inf")).clamp_(max=MAX_LOG_RATIO).exp_()  # [B, h, T, n]
        if bounded:
            w = w.div_(torch.addcmul(torch.ones((), dtype=dtype, device=w.device), w, dropped))
        summed = torch.matmul(w.transpose(-1, -2), moved[:, heads])  # [B, h, n, D + 1]
        selected += ((summed[..., :d] * _repeat_heads(values[:, lo:hi], group)).sum(-1) - summed[..., d]).sum(1)
    return dkeep.scatter_add_(1, slots, selected.masked_fill_(~real, 0.0))
