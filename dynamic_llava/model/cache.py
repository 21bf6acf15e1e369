"""The sparse KV cache: per layer, per sample lengths, with each entry's true RoPE position.

Entries of a sample occupy slots [0, length) of its row; their order does not matter because the
attention mask is built from positions (key position <= query position), not from slot indices.
A forward writes its new tokens after the current length and attends to them; `commit` then
advances the length by the number of those tokens that stay (all of them in layers before
`sparse_layer`, only kept tokens from it on). Slots past the length are overwritten later.

Only for H2O, a layer can also track attention: each entry then carries the attention it has received
(summed over heads and queries) and a generated-token marker, and `evict` removes entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LayerKVCache:
    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, capacity: int = 0) -> None:
        # zeros, not empty: masked-out slots still meet a 0 weight in attention, and 0 * NaN = NaN
        self.k = torch.zeros(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Attention tracking (H2O), allocated by `track_attention`; None means the fused attention path.
        self.scores: torch.Tensor | None = None  # [B, capacity] float32 attention received per entry
        self.generated: torch.Tensor | None = None  # [B, capacity] entry is a generated token
        self.n_generated: torch.Tensor | None = None  # [B] generated tokens committed so far (held or evicted)

    @property
    def tracks_attention(self) -> bool:
        """Whether this layer runs H2O's explicit attention (the policy's eviction switched it on)."""
        return self.scores is not None

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
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(b, grow)], dim=1)
            self.generated = torch.cat([self.generated, self.generated.new_zeros(b, grow)], dim=1)

    def track_attention(self) -> None:
        """Start accumulating the attention each entry receives (H2O); entries already held are not
        generated tokens. Called after prefill, so the first write (which adopts its tensors) is done."""
        if self.scores is None:
            b, capacity = self.positions.shape
            self.scores = torch.zeros(b, capacity, dtype=torch.float32, device=self.positions.device)
            self.generated = torch.zeros(b, capacity, dtype=torch.bool, device=self.positions.device)
            self.n_generated = torch.zeros_like(self.lengths)

    def _next_slots(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and slot indices [B, T] of the t slots after each sample's length.

        Indexed assignment costs what the new entries cost; `scatter_` along the slot axis costs what
        the whole cache costs (29 ms per layer at a 4.7K-entry 7B cache, 2 threads).
        """
        slots = self.lengths[:, None] + torch.arange(t, device=self.lengths.device)
        return torch.arange(len(slots), device=slots.device)[:, None].expand_as(slots), slots

    def write(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, n_new: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Write new entries (k, v: [B, Hkv, T, D]; positions [B, T]; n_new [B] real ones, right-padded).

        Returns keys, values, key positions and key validity over the used slots, and whether every slot
        is valid (no row is padded), read in the one host sync of the write.
        """
        t = k.shape[2]
        if self.capacity == 0:
            # First write (prefill): adopt the tensors. Zero-fill + grow + scatter of a copy cost ~10%
            # of a dense 7B prefill.
            self.k, self.v, self.positions = k, v, positions.clone()
            valid = torch.arange(t, device=k.device)[None, :] < n_new[:, None]
            return k, v, self.positions, valid, bool((n_new == t).all())
        # One host sync per layer and step: the slots in use, and whether every row fills them
        lengths, new = torch.stack((self.lengths, n_new.to(self.lengths.device))).tolist()
        end = max(lengths) + t
        self._reserve(end)
        rows, slots = self._next_slots(t)
        self.k[rows, :, slots] = k.transpose(1, 2)
        self.v[rows, :, slots] = v.transpose(1, 2)
        self.positions[rows, slots] = positions
        if self.scores is not None:
            self.scores[rows, slots] = 0.0  # the slots may hold an evicted or scratch entry's sum
        valid = torch.arange(end, device=k.device)[None, :] < (self.lengths + n_new)[:, None]
        unpadded = all(length + n == end for length, n in zip(lengths, new))
        return self.k[:, :, :end], self.v[:, :, :end], self.positions[:, :end], valid, unpadded

    def accumulate(self, attention: torch.Tensor) -> None:
        """Add attention [B, S] received by the first S slots (this forward's queries, summed over heads)."""
        self.scores[:, :attention.shape[1]] += attention

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these samples (batch rows), e.g. when others finished generating."""
        rows = rows.to(self.lengths.device)  # a layer placed on another device than the batch
        self.k, self.v = self.k[rows], self.v[rows]
        self.positions, self.lengths = self.positions[rows], self.lengths[rows]
        if self.scores is not None:
            self.scores, self.generated, self.n_generated = (
                self.scores[rows], self.generated[rows], self.n_generated[rows])

    def commit(self, n_kept: torch.Tensor, generated: torch.Tensor | None = None) -> None:
        """Keep the first n_kept [B] of the entries just written (the rest are scratch).

        generated [B, T] marks which written entries are generated tokens; needed when tracking attention.
        """
        if self.generated is not None:
            t = generated.shape[1]
            rows, slots = self._next_slots(t)
            self.generated[rows, slots] = generated
            kept = torch.arange(t, device=generated.device)[None, :] < n_kept[:, None]
            self.n_generated = self.n_generated + (generated & kept).sum(1)
        self.lengths = self.lengths + n_kept

    def evict(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Remove entry slots[i] of sample rows[i] (rows distinct): the sample's last entry moves into the
        slot and its length shrinks by one (slot order is irrelevant to the position-based masks)."""
        last = self.lengths[rows] - 1
        self.k[rows, :, slots] = self.k[rows, :, last]
        self.v[rows, :, slots] = self.v[rows, :, last]
        for per_entry in (self.positions, self.scores, self.generated):
            per_entry[rows, slots] = per_entry[rows, last]
        self.lengths = self.lengths.index_add(0, rows, torch.full_like(rows, -1))


class SparseKVCache:
    """One `LayerKVCache` per decoder layer; `device` is one device for all, or one per layer (a model
    split over several GPUs keeps each layer's cache beside the layer)."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | Sequence[torch.device], capacity: int = 0) -> None:
        devices = [device] * num_layers if isinstance(device, (torch.device, str)) else list(device)
        if len(devices) != num_layers:
            raise ValueError(f"{len(devices)} devices for {num_layers} cache layers")
        self.layers = [LayerKVCache(batch_size, num_kv_heads, head_dim, dtype, torch.device(d), capacity)
                       for d in devices]

    def select(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select(rows)

    def __getitem__(self, index: int) -> LayerKVCache:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def lengths(self) -> torch.Tensor:
        """[num_layers, B] entries held per layer and sample (on the first layer's device)."""
        device = self.layers[0].lengths.device
        return torch.stack([layer.lengths.to(device) for layer in self.layers])

    def generated_entries(self, sample: int) -> int | None:
        """Generated-token entries `sample` holds in the first layer that tracks attention (H2O keeps the
        same number in every such layer), or None when no layer tracks (nothing was evicted)."""
        for layer in self.layers:
            if layer.generated is not None:
                return int(layer.generated[sample, :int(layer.lengths[sample])].sum())
        return None

    def bytes_per_entry(self) -> int:
        k = self.layers[0].k
        return 2 * k.shape[1] * k.shape[3] * k.element_size()

    def bytes_per_sample(self) -> torch.Tensor:
        """[B] bytes of K/V entries held by each sample across layers."""
        return self.lengths().sum(0) * self.bytes_per_entry()
