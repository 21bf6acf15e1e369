"""Token policies: at the input of `sparse_layer`, which new tokens stay for the later layers.

A policy returns a boolean keep mask over the forward's new tokens. Kept tokens enter the KV cache
of layers >= sparse_layer; the last token of each sample is always processed (it produces the
next-token logits) even when it is not kept.

H2O is the one rule that also evicts entries already cached (`H2OEviction`, the policy's `eviction`):
it needs the attention every cached entry receives, so only its layers leave the fused SDPA path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from .batch import IMAGE, OUTPUT, TokenBatch
from .cache import LayerKVCache
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


class H2OEviction:
    """H2O (Heavy-Hitter Oracle) on the KV cache of one layer >= sparse_layer, while decoding with it.

    After each step's commit, a sample holds at most budget = ceil(keep_rate x n) generated-token entries,
    n = generated tokens written so far: the recent window (the last ceil(budget / 2) generated tokens,
    which always includes the newest) plus the heavy hitters, the entries with the largest attention
    accumulated since they entered the cache. Over budget, the entry with the smallest accumulated
    attention outside the window is evicted. Prompt entries are never evicted; layers evict independently.
    """

    def __init__(self, keep_rate: float) -> None:
        self.keep_rate = keep_rate

    def budget(self, n_generated: torch.Tensor) -> torch.Tensor:
        return torch.ceil(n_generated.double() * self.keep_rate - 1e-6).long()  # tolerance as in images_top_k

    def evict(self, cache: LayerKVCache) -> None:
        budget = self.budget(cache.n_generated)
        recent = (budget + 1) // 2
        while True:  # one eviction per sample and step when one token comes per step
            end = int(cache.lengths.max())
            used = torch.arange(end, device=budget.device)[None, :] < cache.lengths[:, None]
            held = cache.generated[:, :end] & used
            over = held.sum(1) > budget
            if not bool(over.any()):
                return
            # generated tokens have consecutive positions, and the window's are always held
            positions = cache.positions[:, :end]
            newest = positions.masked_fill(~held, -1).amax(1)
            candidates = held & (positions <= (newest - recent)[:, None])
            victims = cache.scores[:, :end].masked_fill(~candidates, float("inf")).argmin(1)
            rows = over.nonzero()[:, 0]
            cache.evict(rows, victims[rows])


class DynamicLlavaPolicy:
    """Image tokens: top-k per image (k = floor(vision_keep_rate x N)) ranked by `sparse.vision_policy`:
    the learned predictor (Dynamic-LLaVA), FastV's last-token attention, or random. Generated tokens
    (`sparse.output_policy`): the predictor's keep-logit > drop-logit (Dynamic-LLaVA), a random
    `output_text_keep_rate` fraction, every other one ("structure"), or "h2o": every new token enters
    the cache, then `eviction` (H2OEviction at budget ratio `output_text_keep_rate`) evicts cached
    generated tokens; decoding with the KV cache only. Prompt text is always kept."""

    def __init__(self, sparse: SparseConfig, image_predictor: ImageScorePredictor | None,
                 output_text_predictor: TokenScorePredictor | None) -> None:
        self.sparse = sparse
        self.vision_rule = sparse.vision_policy if sparse.sparsify_vision else None
        self.output_rule = sparse.output_policy if sparse.sparsify_output_text else None
        self.image_predictor = image_predictor
        self.output_text_predictor = output_text_predictor
        # read by the model's step: the cache layers >= sparse_layer then track attention and evict
        self.eviction = H2OEviction(sparse.output_text_keep_rate) if self.output_rule == "h2o" else None
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
        if self.output_rule == "h2o":
            return torch.ones_like(batch.positions[is_output], dtype=torch.bool)
        draws = torch.rand(int(is_output.sum()), generator=self.generator).to(hidden.device)
        return draws < self.sparse.output_text_keep_rate
