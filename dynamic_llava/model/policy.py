"""Token policies: at the input of `sparse_layer`, which new tokens stay for the later layers.

A policy returns a boolean keep mask over the forward's new tokens. Kept tokens enter the KV cache
of layers >= sparse_layer; the last token of each sample is always processed (it produces the
next-token logits) even when it is not kept.

Policies are built by `make_policy` alone, from the checkpoint's `SparseConfig` (predictor sizes, trained
keep rates and sparse_layer) and the run-time `SparsityOptions` (what this run changes); nothing rewrites
the model's config to change a policy.

H2O is the one rule that also evicts entries already cached (`H2OEviction`, the policy's `eviction`):
it needs the attention every cached entry receives, so only its layers leave the fused SDPA path.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..errors import UserError
from .batch import IMAGE, OUTPUT, TokenBatch
from .cache import LayerKVCache
from .predictors import ImageScorePredictor, TokenScorePredictor

if TYPE_CHECKING:
    from .llava import DynamicLlavaForCausalLM


VISION_RULES = ("predictor", "fastv", "random")  # how image tokens are ranked
OUTPUT_RULES = ("predictor", "random", "structure", "h2o")  # how generated tokens are kept


@dataclass(frozen=True)
class SparsityOptions:
    """Run-time choices of a token policy, never saved with the checkpoint (None: the checkpoint's value).

    `sparse=False` is dense LLaVA-1.5; `output_sparsity=False` keeps every generated token. The rules
    replace the learned predictors by the paper's baselines (FastV / random / structure / H2O).
    """

    sparse: bool = True
    vision_keep_rate: float | None = None
    output_text_keep_rate: float | None = None
    vision_policy: str = "predictor"  # one of VISION_RULES
    output_policy: str = "predictor"  # one of OUTPUT_RULES
    output_sparsity: bool = True
    sparse_layer: int | None = None
    policy_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vision_keep_rate", "output_text_keep_rate"):
            rate = getattr(self, name)
            if rate is not None and not 0.0 < float(rate) <= 1.0:
                raise UserError(f"{name} must be in (0, 1], got {rate}")
        if self.sparse_layer is not None and self.sparse_layer < 0:
            raise UserError(f"sparse_layer must be >= 0, got {self.sparse_layer}")
        if self.vision_policy not in VISION_RULES:
            raise UserError(f"vision_policy must be one of {', '.join(VISION_RULES)}, got {self.vision_policy!r}")
        if self.output_policy not in OUTPUT_RULES:
            raise UserError(f"output_policy must be one of {', '.join(OUTPUT_RULES)}, got {self.output_policy!r}")

    @classmethod
    def from_overrides(cls, sparse: bool | None = None, **overrides: Any) -> "SparsityOptions":
        """Keyword overrides as `load_pretrained_model` takes them (None = unchanged); unknown keys are refused."""
        updates = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(updates) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"unknown sparsity options: {sorted(unknown)}")
        return cls(**updates) if sparse is None else cls(sparse=sparse, **updates)


AttentionProbe = Callable[[], torch.Tensor]
"""Lazily gives [B, T]: the attention each sample's last new token pays to every new token in layer
sparse_layer - 1, averaged over heads (FastV's ranking signal; computed only when asked for)."""


class TokenPolicy(Protocol):
    sparse_layer: int  # the first decoder layer on the reduced token set (0..num_layers)
    eviction: H2OEviction | None  # evicts cached entries after each commit of layers >= sparse_layer (H2O)

    def select(self, hidden: torch.Tensor, batch: TokenBatch, probe: AttentionProbe | None = None) -> torch.Tensor:
        """hidden [B, T, C] entering sparse_layer -> keep [B, T] (False on padding)."""
        ...


class DensePolicy:
    """Keeps everything: plain LLaVA-1.5. `sparse_layer` only splits the layers, which changes nothing."""

    vision_keep_rate = 1.0  # as DynamicLlavaPolicy's, for reports
    eviction = None

    def __init__(self, sparse_layer: int) -> None:
        self.sparse_layer = sparse_layer

    def select(self, hidden: torch.Tensor, batch: TokenBatch, probe: AttentionProbe | None = None) -> torch.Tensor:
        return batch.valid


def kept_image_tokens(keep_rate: float, n: int) -> int:
    """How many of an image's `n` tokens a keep rate keeps: floor(keep_rate x n), at least 1."""
    return max(1, math.floor(keep_rate * n + 1e-6))


def images_top_k(scores: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """scores [n_images, N] -> keep [n_images, N] with exactly `kept_image_tokens` per image."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(1, scores.topk(kept_image_tokens(keep_rate, scores.shape[1]), dim=1).indices, True)


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
    """Image tokens: top-k per image (k = floor(vision_keep_rate x N)) ranked by `vision_rule`: the learned
    predictor (Dynamic-LLaVA), FastV's last-token attention, or random. Generated tokens (`output_rule`):
    the predictor's keep-logit > drop-logit (Dynamic-LLaVA), a random `output_keep_rate` fraction, every
    other one ("structure"), or "h2o": every new token enters the cache, then `eviction` (H2OEviction at
    budget ratio `output_keep_rate`) evicts cached generated tokens; decoding with the KV cache only.
    A rule None keeps every token of its kind. Prompt text is always kept. Built by `make_policy`."""

    def __init__(self, sparse_layer: int, vision_rule: str | None, vision_keep_rate: float, output_rule: str | None,
                 output_keep_rate: float, seed: int, image_predictor: ImageScorePredictor | None,
                 output_text_predictor: TokenScorePredictor | None) -> None:
        self.sparse_layer = sparse_layer
        self.vision_rule = vision_rule
        self.vision_keep_rate = vision_keep_rate if vision_rule is not None else 1.0  # 1.0: images not sparsified
        self.output_rule = output_rule
        self.output_keep_rate = output_keep_rate
        self.image_predictor = image_predictor
        self.output_text_predictor = output_text_predictor
        # the cache layers >= sparse_layer then track attention and evict
        self.eviction = H2OEviction(output_keep_rate) if output_rule == "h2o" else None
        # one stream of random decisions per policy object, reproducible from the seed
        self.generator = torch.Generator().manual_seed(seed)

    def select(self, hidden: torch.Tensor, batch: TokenBatch, probe: AttentionProbe | None = None) -> torch.Tensor:
        keep = batch.valid.clone()
        if self.vision_rule is not None and bool((batch.kinds == IMAGE).any()):
            samples, slots = image_token_index(batch)
            scores = self.image_scores(hidden, batch, samples, slots, probe)
            keep[samples, slots] = images_top_k(scores, self.vision_keep_rate)
        is_output = (batch.kinds == OUTPUT) & batch.valid
        if self.output_rule is not None and bool(is_output.any()):
            keep[is_output] = self._output_keep(hidden, batch, is_output)
        return keep

    def image_scores(self, hidden: torch.Tensor, batch: TokenBatch, samples: torch.Tensor, slots: torch.Tensor,
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
        return draws < self.output_keep_rate


def make_policy(model: DynamicLlavaForCausalLM, options: SparsityOptions | None = None
                ) -> DensePolicy | DynamicLlavaPolicy:
    """The token policy of `options` (default: the options the model was loaded with) over the checkpoint's
    `sparse_config`: a kind of token is sparsified only where the checkpoint enables its predictor."""
    options = model.sparsity_options if options is None else options
    checkpoint = model.sparse
    requested = checkpoint.sparse_layer if options.sparse_layer is None else options.sparse_layer
    sparse_layer = min(requested, model.config.num_hidden_layers)
    vision = options.sparse and checkpoint.sparsify_vision
    output = options.sparse and options.output_sparsity and checkpoint.sparsify_output_text
    if not (vision or output):
        return DensePolicy(sparse_layer)
    if vision and options.vision_policy == "fastv" and requested == 0:
        raise UserError("vision_policy 'fastv' ranks image tokens by the attention in layer sparse_layer - 1: "
                        "it needs sparse_layer >= 1")
    inner = model.model
    return DynamicLlavaPolicy(
        sparse_layer,
        options.vision_policy if vision else None,
        checkpoint.vision_keep_rate if options.vision_keep_rate is None else options.vision_keep_rate,
        options.output_policy if output else None,
        checkpoint.output_text_keep_rate if options.output_text_keep_rate is None else options.output_text_keep_rate,
        options.policy_seed, inner.image_score_predictor, inner.output_text_score_predictor)


def describe_sparsity(model: DynamicLlavaForCausalLM, options: SparsityOptions | None = None) -> dict[str, Any]:
    """The checkpoint's `sparse_config` with `options` applied (default: the model's load options), in its
    key names: what run reports (eval summaries, worker status) show as `sparse_config`."""
    options = model.sparsity_options if options is None else options
    out = model.sparse.to_dict()
    if not options.sparse:
        out.update(use_vision_predictor=False, use_text_predictor=False, use_output_text_predictor=False,
                   use_instruct_predictor=False)
    elif not options.output_sparsity:
        out["use_output_text_predictor"] = False
    for name in ("vision_keep_rate", "output_text_keep_rate", "sparse_layer"):
        if getattr(options, name) is not None:
            out[name] = getattr(options, name)
    out.update(vision_policy=options.vision_policy, output_policy=options.output_policy,
               policy_seed=options.policy_seed)
    return out
