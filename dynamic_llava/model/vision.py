"""CLIP vision tower wrapper: hidden states of `mm_vision_select_layer`, CLS dropped for `patch`."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionModel

from ..errors import UserError


class CLIPVisionTower(nn.Module):
    """Holds the CLIP model as `.vision_tower` (LLaVA's attribute path); frozen unless a training run
    unfreezes it, and then saved as a CLIP folder inside the checkpoint."""

    def __init__(self, clip: CLIPVisionModel, select_layer: int = -2, select_feature: str = "patch") -> None:
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise UserError(f"unknown mm_vision_select_feature {select_feature!r} (patch, cls_patch)")
        self.vision_tower = clip
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.vision_tower.requires_grad_(False)

    @property
    def hidden_size(self) -> int:
        return self.vision_tower.config.hidden_size

    @property
    def num_patches(self) -> int:
        cfg = self.vision_tower.config
        return (cfg.image_size // cfg.patch_size) ** 2

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n, 3, H, W] -> features [n, N(+1), mm_hidden_size] in the tower's dtype.

        No graph is kept unless the tower itself is being trained (--unfreeze_mm_vision_tower)."""
        first = next(self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and first.requires_grad):
            out = self.vision_tower(pixel_values.to(device=first.device, dtype=first.dtype), output_hidden_states=True)
        features = out.hidden_states[self.select_layer]
        return features[:, 1:] if self.select_feature == "patch" else features
