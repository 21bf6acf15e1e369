"""`TokenBatch`: the new tokens of one forward, right-padded, with what the token policy needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT, IMAGE, OUTPUT = 0, 1, 2  # token kinds: prompt text (always kept), image patch, generated text

# Position given to padding slots: they then see every valid key (no empty softmax rows) and
# are never seen by a real token. Their outputs are discarded.
PAD_POSITION = 1 << 40


@dataclass
class TokenBatch:
    embeds: torch.Tensor  # [B, T, C]
    positions: torch.Tensor  # [B, T] true RoPE positions; PAD_POSITION on padding
    lengths: torch.Tensor  # [B] number of real tokens (they come first)
    kinds: torch.Tensor  # [B, T] TEXT / IMAGE / OUTPUT
    image_ids: torch.Tensor  # [B, T] index of the image a token belongs to in this batch, -1 otherwise

    @property
    def valid(self) -> torch.Tensor:
        return torch.arange(self.embeds.shape[1], device=self.lengths.device)[None, :] < self.lengths[:, None]

    @property
    def is_last(self) -> torch.Tensor:
        return torch.arange(self.embeds.shape[1], device=self.lengths.device)[None, :] == (self.lengths - 1)[:, None]

    def select(self, rows: torch.Tensor) -> "TokenBatch":
        """Only these samples (batch rows)."""
        return TokenBatch(self.embeds[rows], self.positions[rows], self.lengths[rows], self.kinds[rows],
                          self.image_ids[rows])

    def gather(self, index: torch.Tensor, lengths: torch.Tensor, embeds: torch.Tensor) -> "TokenBatch":
        """The tokens at `index` [B, T'] (first `lengths` real), with `embeds` already gathered."""
        valid = torch.arange(index.shape[1], device=index.device)[None, :] < lengths[:, None]
        positions = torch.where(valid, self.positions.gather(1, index), PAD_POSITION)
        return TokenBatch(embeds, positions, lengths, self.kinds.gather(1, index), self.image_ids.gather(1, index))

    def truncate(self, length: int) -> "TokenBatch":
        """The first `length` slots of every sample."""
        return TokenBatch(self.embeds[:, :length], self.positions[:, :length], self.lengths.clamp(max=length),
                          self.kinds[:, :length], self.image_ids[:, :length])
