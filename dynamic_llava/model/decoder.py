"""LLaMA-family decoder layer (LLaMA / Vicuna / Mistral-style GQA) with explicit positions and cache.

Weight names are the standard ones (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`input_layernorm`, `post_attention_layernorm`). Attention masks come from positions and validity,
so physically dropped tokens keep their original RoPE positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cache import LayerKVCache
from .config import DynamicLlavaConfig
from .masked_attention import masked_softmax_attention


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, D] (computed in fp32 like transformers)."""
        freqs = positions[..., None].float() * self.inv_freq.float().to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, Tq, S]: key j is visible to query i iff valid and pos_j <= pos_i."""
    return (key_valid[:, None, :] & (key_positions[:, None, :] <= query_positions[:, :, None]))[:, None]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
          ) -> torch.Tensor:
    """Attention with grouped K/V heads shared by several query heads; `mask=None` means every key visible,
    or causal with `causal=True`."""
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    if _SDPA_HAS_GQA:  # avoids copying the whole cache once per layer and step
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    repeat = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                                          attn_mask=mask, is_causal=causal)


_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Matmul-softmax attention that also returns the probabilities (fp32, [B, H, Tq, S]); grouped K/V
    heads are matched by reshaping the queries, so the cache is not copied."""
    b, h, t, d = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    grouped = q.reshape(b, h_kv, h // h_kv * t, d)
    scores = torch.matmul(grouped, k.transpose(-1, -2)).float().view(b, h_kv, h // h_kv, t, s) / d ** 0.5
    probs = scores.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)
    out = torch.matmul(probs.view(b, h_kv, -1, s).to(v.dtype), v)
    return out.view(b, h, t, d), probs.view(b, h, t, s)


class Attention(nn.Module):
    def __init__(self, config: DynamicLlavaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        # forward_train's masked softmax: this one ("blocked") unless use_masked_attention picks another
        self.masked_attention: Callable[..., torch.Tensor] = masked_softmax_attention

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> q [B, H, T, D], k and v [B, Hkv, T, D], RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                n_new: torch.Tensor, cache: LayerKVCache) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        keys, values, key_positions, key_valid, unpadded = cache.write(k, v, positions, n_new)
        if cache.tracks_attention:  # H2O: the attention each entry receives, from this forward's real queries
            out, probs = _explicit_attention(q, keys, values, attention_mask(positions, key_positions, key_valid))
            real = torch.arange(t, device=x.device)[None, :] < n_new[:, None]
            cache.accumulate((probs.sum(1) * real[..., None]).sum(1))
        elif t > 1 and unpadded and bool((cache.lengths == 0).all()):
            # Keys exactly these tokens, unpadded, in increasing position order: the mask is triangular.
            out = _sdpa(q, keys, values, None, causal=True)
        elif t == 1 and unpadded:
            # One query per row that sees every key (decoding with equal cache lengths; cached positions all
            # precede it): no mask, which is the same attention and lets SDPA use flash attention on GPU
            out = _sdpa(q, keys, values, None, causal=False)
        else:
            out = _sdpa(q, keys, values, attention_mask(positions, key_positions, key_valid), causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def last_token_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                             n_new: torch.Tensor) -> torch.Tensor:
        """[B, T]: softmax attention of each sample's last real token over the tokens of x (right-padded,
        n_new [B] real ones; normed layer input), averaged over heads. Only that one query row is computed."""
        b, t, _ = x.shape
        rows = torch.arange(b, device=x.device)
        last = n_new - 1
        q = self.q_proj(x[rows, last]).view(b, self.num_heads, 1, self.head_dim)
        cos_q, sin_q = cos[rows, :, last][:, :, None], sin[rows, :, last][:, :, None]
        q = q * cos_q + _rotate_half(q) * sin_q
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        k = (k * cos + _rotate_half(k) * sin).repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() / self.head_dim ** 0.5  # [B, H, 1, T]
        valid = torch.arange(t, device=x.device)[None, :] < n_new[:, None]
        visible = valid & (positions <= positions[rows, last][:, None])
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        return scores.softmax(-1).mean(1)[:, 0]

    def forward_train(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keep: torch.Tensor | None,
                      key_valid: torch.Tensor, decided: torch.Tensor | None = None) -> torch.Tensor:
        """Whole right-padded sequences, no cache. keep None: causal attention (right padding needs no
        other mask for real tokens); else masked-softmax attention with the differentiable keep [B, T], whose
        gradient is wanted only where `decided` [B, T] (None: everywhere)."""
        b, t, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        out = (_sdpa(q, k, v, None, causal=True) if keep is None
               else self.masked_attention(q, k, v, keep, key_valid, decided=decided))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, config: DynamicLlavaConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DynamicLlavaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                n_new: torch.Tensor, cache: LayerKVCache) -> torch.Tensor:
        """x [B, T, C] right-padded (n_new [B] real tokens), positions [B, T] true RoPE positions."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, n_new, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def last_token_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                             n_new: torch.Tensor) -> torch.Tensor:
        """x: this layer's input; see Attention.last_token_attention."""
        return self.self_attn.last_token_attention(self.input_layernorm(x), cos, sin, positions, n_new)

    def forward_train(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keep: torch.Tensor | None,
                      key_valid: torch.Tensor, decided: torch.Tensor | None = None) -> torch.Tensor:
        """Training / masked view: see Attention.forward_train."""
        x = x + self.self_attn.forward_train(self.input_layernorm(x), cos, sin, keep, key_valid, decided)
        return x + self.mlp(self.post_attention_layernorm(x))
