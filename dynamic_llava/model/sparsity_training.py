"""Training-time token decisions (SPEC 2.3): hard Gumbel-Softmax with a straight-through gradient, and
the keep-rate regulariser.

At the input of `sparse_layer` every image token, and every token of a sample's last assistant answer
when that answer has at least `output_text_len_for_training` tokens, gets a sampled 0/1 keep decision
whose gradient flows back to the predictor (through the masked-softmax attention of the later layers).
Everything else is kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import IGNORE_INDEX
from ..errors import UserError
from .batch import IMAGE, TokenBatch
from .config import SparseConfig
from .decoder import Attention
from .flex_masked_attention import flex_attention_available, flex_masked_softmax_attention
from .masked_attention import masked_softmax_attention
from .policy import image_token_index, kept_image_tokens
from .predictors import ImageScorePredictor, TokenScorePredictor


@dataclass
class SparsityTraining:
    """Switches the model's training forward to Dynamic-LLaVA's masked view; `tau` is the current Gumbel
    temperature (the trainer lowers it every optimiser step, see `gumbel_tau`)."""

    tau: float = 1.0
    image_decision: str = "gumbel"  # one of constants.IMAGE_DECISIONS (what each does: the comment below)


# How image tokens are chosen in training (`--image_decision`). "gumbel" (the reference's): each token is kept
# where its Gumbel-perturbed keep margin is above 0, and the regulariser pulls the kept share to the rate.
# Once the margins are far from 0 the decisions, and their soft gradient, freeze, and nothing orders two kept
# tokens, though inference keeps the top k by margin. "top_k": each image keeps exactly the k tokens inference
# would (`kept_image_tokens`), those with the largest perturbed margins; the soft gradient is taken around the
# cut between the k-th and the next, so the tokens whose rank decides the choice always get one. The names:
# constants.IMAGE_DECISIONS.


# Implementations of the masked-softmax attention the later layers train with (`--masked_attention`):
# "blocked" (masked_attention.py: PyTorch's CPU flash kernel on CPU, score blocks recomputed in backward
# elsewhere) or "flex" (flex_masked_attention.py: FlexAttention, fused kernels on CUDA; same values and
# gradients).
MASKED_ATTENTION = ("blocked", "flex")


# How dL/dkeep treats a dropped key (`--keep_gradient`): "exact", the masked softmax's derivative (the
# reference's), or "bounded", the change of the output when the key is added back (masked_attention.py).
KEEP_GRADIENTS = ("exact", "bounded")


def masked_attention_function(name: str, keep_gradient: str = "exact") -> Callable[..., torch.Tensor]:
    """The implementation called `name` (one of MASKED_ATTENTION) with the keep gradient `keep_gradient` (one of
    KEEP_GRADIENTS); UserError if this torch lacks it."""
    if keep_gradient not in KEEP_GRADIENTS:
        raise UserError(f"keep gradient must be one of {', '.join(KEEP_GRADIENTS)}, got {keep_gradient!r}")
    if name == "blocked":
        implementation = masked_softmax_attention
    elif name != "flex":
        raise UserError(f"masked attention must be one of {', '.join(MASKED_ATTENTION)}, got {name!r}")
    elif not flex_attention_available():
        raise UserError(f"masked attention 'flex' needs torch.nn.attention.flex_attention with AuxRequest "
                        f"(torch >= 2.9); this is torch {torch.__version__}: use 'blocked'")
    else:
        implementation = flex_masked_softmax_attention
    if keep_gradient == "bounded":
        return functools.partial(implementation, bounded_keep_gradient=True)
    return implementation


def use_masked_attention(model: nn.Module, implementation: Callable[..., torch.Tensor]) -> int:
    """Make every decoder attention of `model` train with `implementation`; returns how many there are."""
    attentions = [module for module in model.modules() if isinstance(module, Attention)]
    for attention in attentions:
        attention.masked_attention = implementation
    return len(attentions)


def gumbel_tau(step: int, total_steps: int, start: float, end: float) -> float:
    """Exponential decay from `start` (step 0) to `end` (step total_steps)."""
    return start * (end / start) ** (min(step, total_steps) / max(total_steps, 1))


def gumbel_keep(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """logits [..., 2] (index 0 = keep) -> keep [...] exactly 0/1 forward, soft Gumbel-Softmax gradient."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    gumbels = -torch.empty_like(log_probs).exponential_().log()
    soft = F.softmax((log_probs + gumbels) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 0]


def gumbel_top_k_keep(logits: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """logits [n, N, 2] (index 0 = keep) -> keep [n, N]: exactly the k tokens per row with the largest
    Gumbel-perturbed keep margins, forward; gradient of sigmoid((margin - cut) / tau), the cut midway between
    the k-th and the (k+1)-th perturbed margin.

    The cut moves with the margins (it is not detached): the choice depends only on their differences, and so
    does the gradient, which sums to 0 over each row. With a fixed cut every token that helps, kept or not,
    is pushed up and nothing holds the common level: in the demo's stage 3 the margins drifted to 1.7e7."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    perturbed = log_probs - torch.empty_like(log_probs).exponential_().log()
    margin = perturbed[..., 0] - perturbed[..., 1]  # the Gumbel decision keeps where this is > 0
    if k >= margin.shape[-1]:
        return torch.ones_like(margin)
    top = margin.topk(k + 1, dim=-1)
    cut = (top.values[..., k - 1:k] + top.values[..., k:]) / 2
    soft = torch.sigmoid((margin - cut) / tau)
    hard = torch.zeros_like(margin).scatter_(-1, top.indices[..., :k], 1.0)
    return hard - soft.detach() + soft


def last_answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> bool [B, T]: the last contiguous run of supervised tokens of each sample."""
    supervised = labels != IGNORE_INDEX
    t = labels.shape[1]
    slots = torch.arange(t, device=labels.device).expand_as(labels)
    last = torch.where(supervised, slots, -1).amax(1, keepdim=True)  # last supervised slot (-1: none)
    # start of that run: one past the last unsupervised slot before it
    gap = torch.where(~supervised & (slots < last), slots, -1).amax(1, keepdim=True)
    return supervised & (slots > gap) & (slots <= last)


@dataclass
class TrainingDecisions:
    keep: torch.Tensor | None  # [B, T] 0/1 with straight-through gradient; None: nothing is decided
    # [B, T] bool: the slots with a sampled decision (the rest of keep is constant: no gradient is wanted there)
    decided: torch.Tensor | None
    # Unweighted regulariser summed over the batch's samples: per sample, (vision_keep_rate - its kept
    # image fraction)^2 + (output_text_keep_rate - its kept answer fraction)^2, a term being 0 for a sample
    # without images / without an answer of output_text_len_for_training tokens. The caller divides by the
    # number of samples the step averages over (the batch's, or the whole accumulated step's): SPEC 2.3.
    mask_loss_sum: torch.Tensor
    stats: dict[str, torch.Tensor]  # detached scalars for logging (regulariser terms as means over the batch)


def decide(hidden: torch.Tensor, batch: TokenBatch, labels: torch.Tensor, sparse: SparseConfig,
           image_predictor: ImageScorePredictor, output_text_predictor: TokenScorePredictor,
           tau: float, image_decision: str = "gumbel") -> TrainingDecisions:
    """Sample the keep decisions for the hidden states [B, T, C] entering sparse_layer (image tokens by
    `image_decision`, one of constants.IMAGE_DECISIONS)."""
    keep = batch.valid.to(torch.float32)
    decided = torch.zeros_like(batch.valid)
    n_samples = batch.lengths.shape[0]
    zero = hidden.new_zeros((), dtype=torch.float32)
    mask_loss_sum, stats = zero, {}
    is_image = batch.kinds == IMAGE
    if sparse.sparsify_vision and bool((is_image & batch.valid).any()):
        samples, slots = image_token_index(batch)
        logits = image_predictor(hidden[samples, slots])
        if image_decision == "top_k":
            image_keep = gumbel_top_k_keep(logits, kept_image_tokens(sparse.vision_keep_rate, slots.shape[1]), tau)
            # The kept share is fixed, so the regulariser's term is a constant: through the straight-through
            # estimator it would only push every token near the cut up (or down) alike, drowning the LM signal.
            counted = image_keep.detach()
        else:
            image_keep = counted = gumbel_keep(logits, tau)  # [n_images, N]
        keep = keep.index_put((samples, slots), image_keep)
        decided[samples, slots] = True
        owner = samples[:, 0]
        kept = zero.new_zeros(n_samples).index_add(0, owner, counted.sum(1))
        total = zero.new_zeros(n_samples).index_add(0, owner, image_keep.new_full(owner.shape, slots.shape[1]))
        has_image = total > 0
        fraction = kept[has_image] / total[has_image]
        vision_sum = ((sparse.vision_keep_rate - fraction) ** 2).sum()
        mask_loss_sum = mask_loss_sum + vision_sum
        stats.update(vision_mask_loss=vision_sum.detach() / n_samples, vision_keep=fraction.mean().detach())
    if sparse.sparsify_output_text:
        answer = last_answer_mask(labels) & batch.valid
        eligible = answer.sum(1) >= max(sparse.output_text_len_for_training, 1)
        answer &= eligible[:, None]
        if bool(answer.any()):
            answer_keep = gumbel_keep(output_text_predictor(hidden[answer]), tau)
            keep = keep.masked_scatter(answer, answer_keep)
            decided |= answer
            owner = answer.nonzero()[:, 0]
            kept = zero.new_zeros(n_samples).index_add(0, owner, answer_keep)
            fraction = kept[eligible] / answer.sum(1)[eligible]
            # A short answer adds 0 but still counts in the average (the reference divides by B)
            output_sum = ((sparse.output_text_keep_rate - fraction) ** 2).sum()
            mask_loss_sum = mask_loss_sum + output_sum
            stats.update(output_mask_loss=output_sum.detach() / n_samples, output_keep=fraction.mean().detach())
    if not bool(decided.any()):
        return TrainingDecisions(None, None, mask_loss_sum, stats)
    return TrainingDecisions(keep, decided, mask_loss_sum, stats)
