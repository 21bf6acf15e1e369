"""Token policies: at the input of `sparse_layer`, which new tokens stay for the later layers.

A policy returns a boolean keep mask over the forward's new tokens. Kept tokens enter the KV cache
of layers >= sparse_layer; the last token of each sample is always processed (it produces the
next-token logits) even when it is not kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from .batch import IMAGE, OUTPUT, TokenBatch
from .config import SparseConfig
from .predictors import ImageScorePredictor, TokenScorePredictor


AttentionProbe = Callable[[], torch.Tensor]
"""Lazily gives [B, T]: the attention each sample's last new token pays to every new token in layer
sparse_layer - 1, averaged over heads (FastV's ranking signal; computed only when asked for)."""


class TokenPolicy(Protocol):
    def select(self, hidden: torch.Tensor, batch: TokenBatch, probe: AttentionProbe | None = None) -> torch.Tensor:
        """hidden [B, T, C] entering sparse_layer -> keep [B, T] (False on padding)."""
        ...


class DensePolicy:
    """Keeps everything: plain LLaVA-1.5."""

    def select(self, hidden: torch.Tensor, batch: TokenBatch, probe: AttentionProbe | None = None) -> torch.Tensor:
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
    """Image tokens: top-k per image (k = floor(vision_keep_rate x N)) ranked by `sparse.vision_policy`:
    the learned predictor (Dynamic-LLaVA), FastV's last-token attention, or random. Generated tokens
    (`sparse.output_policy`): the predictor's keep-logit > drop-logit (Dynamic-LLaVA), a random
    `output_text_keep_rate` fraction, or every other one ("structure"). Prompt text is always kept."""

    def __init__(self, sparse: SparseConfig, image_predictor: ImageScorePredictor | None,
                 output_text_predictor: TokenScorePredictor | None) -> None:
        self.sparse = sparse
        self.vision_rule = sparse.vision_policy if sparse.sparsify_vision else None
        self.output_rule = sparse.output_policy if sparse.sparsify_output_text else None
        self.image_predictor = image_predictor
        self.output_text_predictor = output_text_predictor
        # one stream of random decisions per policy object, reproducible from sparse.policy_seed
        self.generator = torch.Generator().manual_seed(sparse.policy_seed)

    def select(self, hidden: torch.Tensor, batch: TokenBatch, probe: AttentionProbe | None = None) -> torch.Tensor:
        keep = batch.valid.clone()
        if self.vision_rule is not None and bool((batch.kinds == IMAGE).any()):
            samples, slots = image_token_index(batch)
            scores = self._image_scores(hidden, batch, samples, slots, probe)
            keep[samples, slots] = images_top_k(scores, self.sparse.vision_keep_rate)
        is_output = (batch.kinds == OUTPUT) & batch.valid
        if self.output_rule is not None and bool(is_output.any()):
            keep[is_output] = self._output_keep(hidden, batch, is_output)
        return keep

    def _image_scores(self, hidden: torch.Tensor, batch: TokenBatch, samples: torch.Tensor, slots: torch.Tensor,
                      probe: AttentionProbe | None) -> torch.Tensor:
        """[n_images, N] ranking scores (higher = keep)."""
        if self.vision_rule == "predictor":
            if self.image_predictor is None:
                raise ValueError("vision_policy 'predictor' needs the image predictor")
            logits = self.image_predictor(hidden[samples, slots])
            return (logits[..., 0] - logits[..., 1]).float()
        if self.vision_rule == "fastv":
            if probe is None:
                raise ValueError("vision_policy 'fastv' needs the attention probe of the forward")
            return probe()[samples, slots].float()
        return torch.rand(slots.shape, generator=self.generator).to(hidden.device)

    def _output_keep(self, hidden: torch.Tensor, batch: TokenBatch, is_output: torch.Tensor) -> torch.Tensor:
        if self.output_rule == "predictor":
            if self.output_text_predictor is None:
                raise ValueError("output_policy 'predictor' needs the output-text predictor")
            logits = self.output_text_predictor(hidden[is_output])
            return logits[..., 0] > logits[..., 1]
        if self.output_rule == "structure":
            return batch.positions[is_output] % 2 == 0
        draws = torch.rand(int(is_output.sum()), generator=self.generator).to(hidden.device)
        return draws < self.sparse.output_text_keep_rate
