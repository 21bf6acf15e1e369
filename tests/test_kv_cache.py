"""`LayerKVCache.write`: each sample's new entries land right after its own length, in every head, and no
other slot changes (checked against a per-sample, per-slot loop)."""

from __future__ import annotations

import torch

from dynamic_llava.model.cache import LayerKVCache


def _entries(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # the layout the decoder produces: [B, T, H, D] projections viewed as [B, H, T, D]
    k = torch.randn(b, t, 2, 4, generator=generator).transpose(1, 2)
    v = torch.randn(b, t, 2, 4, generator=generator).transpose(1, 2)
    return k, v


def test_write_puts_each_sample_after_its_own_length() -> None:
    cache = LayerKVCache(batch_size=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    k0, v0 = _entries(2, 5, seed=0)
    cache.write(k0, v0, torch.arange(5).repeat(2, 1), torch.tensor([5, 3]))  # row 1 right-padded
    cache.commit(torch.tensor([5, 3]))
    before_k, before_v, before_positions = cache.k.clone(), cache.v.clone(), cache.positions.clone()

    k1, v1 = _entries(2, 2, seed=1)
    positions = torch.tensor([[5, 6], [3, 4]])
    keys, values, key_positions, valid, _ = cache.write(k1, v1, positions, torch.tensor([2, 2]))

    expected_k, expected_v, expected_positions = before_k, before_v, before_positions
    grow = cache.capacity - expected_k.shape[2]
    expected_k = torch.cat([expected_k, expected_k.new_zeros(2, 2, grow, 4)], dim=2)
    expected_v = torch.cat([expected_v, expected_v.new_zeros(2, 2, grow, 4)], dim=2)
    expected_positions = torch.cat([expected_positions, expected_positions.new_zeros(2, grow)], dim=1)
    for row, length in enumerate((5, 3)):
        for j in range(2):
            expected_k[row, :, length + j] = k1[row, :, j]
            expected_v[row, :, length + j] = v1[row, :, j]
            expected_positions[row, length + j] = positions[row, j]
    assert torch.equal(cache.k, expected_k)
    assert torch.equal(cache.v, expected_v)
    assert torch.equal(cache.positions, expected_positions)
    assert torch.equal(keys, expected_k[:, :, :7]) and torch.equal(values, expected_v[:, :, :7])
    assert torch.equal(key_positions, expected_positions[:, :7])
    assert valid.tolist() == [[True] * 7, [True] * 5 + [False] * 2]
