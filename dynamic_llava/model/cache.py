"""The sparse KV cache: per layer, per sample lengths, with each entry's true RoPE position.

Entries of a sample occupy slots [0, length) of its row; their order does not matter because the
attention mask is built from positions (key position <= query position), not from slot indices.
A forward writes its new tokens after the current length and attends to them; `commit` then
advances the length by the number of those tokens that stay (all of them in layers before
`sparse_layer`, only kept tokens from it on). Slots past the length are overwritten later.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 0) -> None:
        # zeros, not empty: masked-out slots still meet a 0 weight in attention, and 0 * NaN = NaN
        self.k = torch.zeros(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        # modest growth so that layers holding few (kept) tokens also hold little memory
        new_capacity = max(needed, self.capacity + max(self.capacity // 4, 64))
        grow = new_capacity - self.capacity
        b, h, _, d = self.k.shape
        self.k = torch.cat([self.k, self.k.new_zeros(b, h, grow, d)], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(b, h, grow, d)], dim=2)
        self.positions = torch.cat([self.positions, self.positions.new_zeros(b, grow)], dim=1)

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, n_new: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write new entries (k, v: [B, Hkv, T, D]; positions [B, T]; n_new [B] real ones, right-padded).

        Returns keys, values, key positions and key validity over the used slots.
        """
        t = k.shape[2]
        if self.capacity == 0:
            # First write (prefill): adopt the tensors. Zero-fill + grow + scatter of a copy cost ~10%
            # of a dense 7B prefill.
            self.k, self.v, self.positions = k, v, positions.clone()
            valid = torch.arange(t, device=k.device)[None, :] < n_new[:, None]
            return k, v, self.positions, valid
        end = int((self.lengths + t).max())
        self._reserve(end)
        slots = self.lengths[:, None] + torch.arange(t, device=k.device)  # [B, T]
        index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        self.positions.scatter_(1, slots, positions)
        valid = torch.arange(end, device=k.device)[None, :] < (self.lengths + n_new)[:, None]
        return self.k[:, :, :end], self.v[:, :, :end], self.positions[:, :end], valid

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these samples (batch rows), e.g. when others finished generating."""
        self.k, self.v = self.k[rows], self.v[rows]
        self.positions, self.lengths = self.positions[rows], self.lengths[rows]

    def commit(self, n_kept: torch.Tensor) -> None:
        """Keep the first n_kept [B] of the entries just written (the rest are scratch)."""
        self.lengths = self.lengths + n_kept


class SparseKVCache:
    """One `LayerKVCache` per decoder layer."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 0) -> None:
        self.layers = [LayerKVCache(batch_size, num_kv_heads, head_dim, dtype, device, capacity)
                       for _ in range(num_layers)]

    def select(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select(rows)

    def __getitem__(self, index: int) -> LayerKVCache:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def lengths(self) -> torch.Tensor:
        """[num_layers, B] entries held per layer and sample."""
        return torch.stack([layer.lengths for layer in self.layers])

    def bytes_per_entry(self) -> int:
        k = self.layers[0].k
        return 2 * k.shape[1] * k.shape[3] * k.element_size()

    def bytes_per_sample(self) -> torch.Tensor:
        """[B] bytes of K/V entries held by each sample across layers."""
        return self.lengths().sum(0) * self.bytes_per_entry()
