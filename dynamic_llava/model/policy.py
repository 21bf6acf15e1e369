"""Token policies: at the input of `sparse_layer`, which new tokens stay for the later layers.

A policy returns a boolean keep mask over the forward's new tokens. Kept tokens enter the KV cache
of layers >= sparse_layer; the last token of each sample is always processed (it produces the
next-token logits) even when it is not kept.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from .batch import IMAGE, OUTPUT, TokenBatch
from .config import SparseConfig
from .predictors import ImageScorePredictor, TokenScorePredictor


class TokenPolicy(Protocol):
    def select(self, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """hidden [B, T, C] entering sparse_layer -> keep [B, T] (False on padding)."""
        ...


class DensePolicy:
    """Keeps everything: plain LLaVA-1.5."""

    def select(self, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        return batch.valid


def images_top_k(scores: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """scores [n_images, N] -> keep [n_images, N] with exactly floor(keep_rate x N) (>= 1) per image."""
    n = scores.shape[1]
    k = max(1, math.floor(keep_rate * n + 1e-6))
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(1, scores.topk(k, dim=1).indices, True)


def image_token_index(batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, slot) indices [n_images, N] of each image's tokens, images in batch order."""
    is_image = (batch.kinds == IMAGE) & batch.valid
    order = torch.argsort(batch.image_ids[is_image], stable=True)
    samples, slots = is_image.nonzero(as_tuple=True)
    n_images = int(batch.image_ids[is_image].unique().numel())
    return samples[order].view(n_images, -1), slots[order].view(n_images, -1)


class DynamicLlavaPolicy:
    """Learned decisions: top-k image tokens per image; generated tokens kept where keep-logit > drop-logit."""

    def __init__(self, sparse: SparseConfig, image_predictor: ImageScorePredictor | None,
                 output_text_predictor: TokenScorePredictor | None) -> None:
        self.sparse = sparse
        self.image_predictor = image_predictor if sparse.sparsify_vision else None
        self.output_text_predictor = output_text_predictor if sparse.sparsify_output_text else None

    def select(self, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        keep = batch.valid.clone()
        if self.image_predictor is not None and bool((batch.kinds == IMAGE).any()):
            samples, slots = image_token_index(batch)
            logits = self.image_predictor(hidden[samples, slots])
            keep[samples, slots] = images_top_k((logits[..., 0] - logits[..., 1]).float(), self.sparse.vision_keep_rate)
        is_output = (batch.kinds == OUTPUT) & batch.valid
        if self.output_text_predictor is not None and bool(is_output.any()):
            logits = self.output_text_predictor(hidden[is_output])
            keep[is_output] = logits[..., 0] > logits[..., 1]
        return keep
