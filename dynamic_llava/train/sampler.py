"""Sample orders: LLaVA's `group_by_modality_length` (batches of one modality, similar lengths together),
and random optimiser steps whose accumulated batches are sorted by length (`StepSortedSampler`).

Samples with an image and text-only samples are shuffled separately and cut into megabatches of
`batch_size * world_size` (one optimiser step over all ranks), so a step never mixes modalities
(except in the leftover tail, see `modality_grouped_indices`). Inside a megabatch the samples are
sorted by length and dealt to the ranks so that every rank gets a similar token total.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


def modality_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                             generator: torch.Generator) -> list[int]:
    """One epoch's order: every index exactly once, deterministic for the generator's state.

    `lengths` are modality lengths: positive for samples with an image, negative for text-only.
    Full megabatches hold one modality and come in random order; the two leftovers (fewer than a
    megabatch each: image samples, then text-only ones) come last, so only the batches straddling
    the boundary between them can mix modalities.
    """
    if any(n == 0 for n in lengths):
        raise ValueError("modality lengths must be non-zero (the sign tells the modality)")
    megabatch = batch_size * world_size
    full: list[list[int]] = []
    tail: list[int] = []
    for group in ([i for i, n in enumerate(lengths) if n > 0], [i for i, n in enumerate(lengths) if n < 0]):
        order = [group[j] for j in torch.randperm(len(group), generator=generator).tolist()]
        cut = len(order) - len(order) % megabatch
        full += [_deal(order[k:k + megabatch], lengths, batch_size, world_size) for k in range(0, cut, megabatch)]
        tail += sorted(order[cut:], key=lambda i: -abs(lengths[i]))
    shuffled = [full[j] for j in torch.randperm(len(full), generator=generator).tolist()]
    return [i for megabatch_indices in shuffled for i in megabatch_indices] + tail


def _deal(indices: list[int], lengths: Sequence[int], batch_size: int, world_size: int) -> list[int]:
    """A full megabatch as `world_size` consecutive per-rank batches with balanced token totals.

    Longest first, each sample goes to the rank with the smallest total that still has room.
    """
    batches: list[list[int]] = [[] for _ in range(world_size)]
    totals = [0] * world_size
    for i in sorted(indices, key=lambda i: -abs(lengths[i])):
        rank = min((r for r in range(world_size) if len(batches[r]) < batch_size), key=totals.__getitem__)
        batches[rank].append(i)
        totals[rank] += abs(lengths[i])
    return [i for batch in batches for i in batch]


class ModalityLengthGroupedSampler(Sampler[int]):
    """The global sample order of `modality_grouped_indices`, a new shuffle every epoch.

    The same `generator` seed gives the same sequence of epochs. Without a generator, a seed is
    drawn from torch's global RNG each epoch (as torch's RandomSampler does). In distributed
    training every rank must iterate the same order: rank r's batch of a step is the r-th run of
    `batch_size` indices in each megabatch.
    """

    def __init__(self, batch_size: int, world_size: int, lengths: Sequence[int],
                 generator: torch.Generator | None = None) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
        self.batch_size = batch_size
        self.world_size = world_size
        self.lengths = list(lengths)
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = self.generator
        if generator is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator().manual_seed(seed)
        yield from modality_grouped_indices(self.lengths, self.batch_size, self.world_size, generator)


class StepSortedSampler(Sampler[int]):
    """Random optimiser steps of `step_size` samples (micro-batch x accumulation steps x ranks), each
    sorted longest first: which samples share a step is as random as plain shuffling, so the step's
    gradient is too, but each accumulated micro-batch pads only to its own longest sample.

    transformers' length-grouped order with one step per megabatch (which also moves the longest sample
    of the epoch to the first step, so running out of memory shows at once). A new order every epoch;
    the same generator seed gives the same sequence of epochs.
    """

    def __init__(self, lengths: Sequence[int], step_size: int, generator: torch.Generator) -> None:
        if step_size < 1:
            raise ValueError(f"step_size must be positive, got {step_size}")
        self.lengths = list(lengths)
        self.step_size = step_size
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        yield from get_length_grouped_indices(self.lengths, self.step_size, mega_batch_mult=1,
                                              generator=self.generator)
