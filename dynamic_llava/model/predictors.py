"""Dynamic-LLaVA's keep/drop predictors (SPEC 2.1).

Module and parameter names match the reference checkpoints. Each predictor maps hidden states
entering `sparse_layer` to 2 logits per token; index 0 means keep.
"""

from __future__ import annotations

import torch
from torch import nn


class _PredictorAttention(nn.Module):
    """Unmasked multi-head self-attention with a fused qkv projection (ViT style)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, N, dim]
        n, length, dim = x.shape
        qkv = self.qkv(x).view(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class _PredictorMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _PredictorBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, dim_feedforward: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _PredictorAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _PredictorMlp(dim, dim_feedforward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _score_head(d_model: int) -> list[nn.Module]:
    return [nn.Linear(d_model, d_model // 2), nn.GELU(), nn.Linear(d_model // 2, d_model // 4), nn.GELU(),
            nn.Linear(d_model // 4, 2)]


class ImageScorePredictor(nn.Module):
    """Scores one image's tokens jointly: per-token ("local") plus image-mean ("global") channels."""

    def __init__(self, hidden_size: int, d_model: int, nhead: int, dim_feedforward: int, num_layers: int) -> None:
        super().__init__()
        self.down_mlp = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d_model), nn.GELU())
        self.transformer = nn.Sequential(*[_PredictorBlock(d_model, nhead, dim_feedforward) for _ in range(num_layers)])
        self.output_mlp = nn.Sequential(*_score_head(d_model))

    def forward(self, image_hidden: torch.Tensor) -> torch.Tensor:
        """image_hidden: [n_images, N, C] -> logits [n_images, N, 2]."""
        x = self.transformer(self.down_mlp(image_hidden))
        local, global_ = x.chunk(2, dim=-1)
        global_ = global_.mean(dim=1, keepdim=True).expand_as(global_)
        return self.output_mlp(torch.cat([local, global_], dim=-1))


class TokenScorePredictor(nn.Module):
    """Per-token MLP (no cross-token interaction), so decisions can be made online while decoding.

    Used for generated text (`output_text_score_predictor`) and, optionally, instructions.
    """

    def __init__(self, hidden_size: int, d_model: int) -> None:
        super().__init__()
        self.output_mlp = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, d_model), nn.GELU(),
                                        *_score_head(d_model))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., C] -> logits [..., 2]."""
        return self.output_mlp(hidden)


def init_predictor_weights(module: nn.Module, std: float = 0.02) -> None:
    """HF-style init: linear weights N(0, std), zero biases, LayerNorm to identity."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
