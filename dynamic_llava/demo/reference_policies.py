"""Two image-token rules that only the demo comparison uses, as bounds around the learned selection.

- `GivenPatches` (the oracle): keeps exactly the patches it is given for each image (the scene's target
  patches, which the generator knows), so a model that reads the targets well loses nothing with it;
  `targets_plus_background` gives it the oracle at a token budget: the targets, the rest of the budget
  background patches, never a look-alike;
- `CentrePrior`: keeps the budget's patches nearest the image centre whatever the image shows, the
  "where things usually are" prior that needs no model at all.

Both follow `model.policy.TokenPolicy` (dropping at `sparse_layer`, evicting nothing): text is always kept,
generated tokens too.
"""

from __future__ import annotations

import math
import random

import torch

from ..model.batch import IMAGE, TokenBatch
from ..model.policy import AttentionProbe, image_token_index, images_top_k


class GivenPatches:
    """Keeps, of the i-th image of the batch (batch order), the patches where `masks[i]` is True."""

    eviction = None

    def __init__(self, masks: list[torch.Tensor], sparse_layer: int) -> None:
        self.masks = masks
        self.sparse_layer = sparse_layer

    def select(self, hidden: torch.Tensor, batch: TokenBatch, probe: AttentionProbe | None = None) -> torch.Tensor:
        keep = batch.valid.clone()
        if bool((batch.kinds == IMAGE).any()):  # decoding steps hold no image tokens
            samples, slots = image_token_index(batch)
            keep[samples, slots] = torch.stack(self.masks).to(keep.device)
        return keep


class CentrePrior:
    """Keeps floor(keep_rate x N) patches of each image, nearest the centre of its square patch grid first
    (ties broken by reading order)."""

    eviction = None

    def __init__(self, keep_rate: float, sparse_layer: int) -> None:
        self.keep_rate = keep_rate
        self.sparse_layer = sparse_layer

    def select(self, hidden: torch.Tensor, batch: TokenBatch, probe: AttentionProbe | None = None) -> torch.Tensor:
        keep = batch.valid.clone()
        if bool((batch.kinds == IMAGE).any()):
            samples, slots = image_token_index(batch)
            scores = centre_scores(slots.shape[1]).to(hidden.device)
            keep[samples, slots] = images_top_k(scores.expand(slots.shape), self.keep_rate)
        return keep


def centre_scores(n_patches: int) -> torch.Tensor:
    """[N] ranking scores of a square grid of N patches: minus the distance to the centre, ties by index."""
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"the centre prior needs a square patch grid, got {n_patches} patches")
    index = torch.arange(n_patches)
    row, col = (index // side).double(), (index % side).double()
    centre = (side - 1) / 2
    distance = ((row - centre) ** 2 + (col - centre) ** 2).sqrt()
    return -distance - index.double() * 1e-6


def targets_plus_background(targets: list[bool], distractors: list[bool], budget: int, seed: str) -> list[bool]:
    """Keep mask of the target patches plus background patches (neither a target nor a look-alike), drawn at
    random with `seed` (e.g. the image's name, so every question on an image keeps the same patches), up to
    `budget` patches in all."""
    background = [i for i, (target, distractor) in enumerate(zip(targets, distractors)) if not (target or distractor)]
    fill = set(random.Random(seed).sample(background, max(0, min(len(background), budget - sum(targets)))))
    return [target or i in fill for i, target in enumerate(targets)]
