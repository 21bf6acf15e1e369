"""Dynamic-LLaVA's image predictor learns which image token the answer needs (SPEC 2.3).

Setting: every sample has 16 image tokens; each carries a tag (a permutation of 16 look-alike tags, so
every token is unique in its image) and a class. The answer token names the class of the one token
tagged 0, at a random slot. A tiny LLM is trained dense to read it, then frozen, and only the image
predictor is trained through the model's real sparse training forward (hard Gumbel-Softmax decisions,
masked softmax in the layers >= sparse_layer, keep-rate regulariser) at a budget of 2 of 16 tokens.
At inference, the predictor's top-2 must keep the marked token; with the keep decisions' gradient to
the attention cut (the regulariser still trains the predictor), it must not find it. The same holds with
`--image_decision top_k` (training keeps each sample's top 2 perturbed margins, as inference does).

Why the layers below sparse_layer are frozen at their random init with their attention output zeroed:
otherwise (1) the question token could read the marked token before sparse_layer, so the later layers
would not need it, and (2) the dense training would make the marked token stand out in the hidden
states the predictor reads; the uniform push-down of the regulariser alone then ranks such an outlier
first, and the control would "find" the token without any signal from the LM loss.

Why small batches and a short dense training: when the predictor drops a token the frozen LLM attends
to sharply, the masked softmax's (exact) gradient on that keep decision is of order exp(score gap),
orders of magnitude above the lambda = 100 regulariser's. A batch that holds one such sample steers the
clipped AdamW step, so with batches of 16-32 the sampled keep rate often stays at 60-80 % instead of
2/16. Batches of 8 and a less peaked LLM (50 dense steps) let the regulariser reach the budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

import dynamic_llava.model.llava as llava_module
from dynamic_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from dynamic_llava.model.batch import TokenBatch
from dynamic_llava.model.config import DynamicLlavaConfig
from dynamic_llava.model.llava import DynamicLlavaForCausalLM
from dynamic_llava.model.policy import AttentionProbe, SparsityOptions, TokenPolicy, make_policy
from dynamic_llava.model.sparsity_training import (
    KEEP_GRADIENTS, SparsityTraining, TrainingDecisions, gumbel_tau, masked_attention_function, use_masked_attention)

N_TOKENS = 16  # image tokens per sample: a 4 x 4 grid of patches
N_CLASSES = 8
FEATURES = 32  # patch features: 16 one-hot tag dimensions, then 16 class-code dimensions
TAG_NORM, CODE_NORM, NOISE = 5.0, 6.0, 0.3
KEEP_RATE = 2 / N_TOKENS
SPARSE_LAYER = 1
BOS, QUESTION, FIRST_CLASS = 1, 3, 10  # token ids; class c is answered by token FIRST_CLASS + c
IMAGE_START = 1  # slot of the first image token: the prompt is [BOS, <image>, QUESTION]
SEED = 0


class PatchGridTower(nn.Module):
    """Stands in for the CLIP tower: an image is a [FEATURES, 4, 4] grid whose every pixel is one patch's
    feature vector, so image token j carries patch j and nothing else."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.flatten(2).transpose(1, 2)  # [n, N_TOKENS, FEATURES]


@dataclass
class Samples:
    input_ids: torch.Tensor  # [n, 4]: BOS, <image>, QUESTION, answer
    labels: torch.Tensor  # [n, 4]: only the answer is supervised
    pixels: torch.Tensor  # [n, FEATURES, 4, 4]
    marked: torch.Tensor  # [n] grid slot of the token tagged 0
    answer: torch.Tensor  # [n] its class

    @property
    def prompts(self) -> list[torch.Tensor]:
        return list(self.input_ids[:, :-1])

    @property
    def images(self) -> list[torch.Tensor]:
        return list(self.pixels[:, None])


def _class_codes() -> torch.Tensor:
    """[N_CLASSES, FEATURES]: random directions of norm CODE_NORM in the class-code dimensions."""
    codes = torch.randn(N_CLASSES, FEATURES - N_TOKENS, generator=torch.Generator().manual_seed(SEED))
    codes = CODE_NORM * codes / codes.norm(dim=1, keepdim=True)
    return torch.cat([torch.zeros(N_CLASSES, N_TOKENS), codes], dim=1)


def _sample(n: int, generator: torch.Generator) -> Samples:
    classes = torch.randint(N_CLASSES, (n, N_TOKENS), generator=generator)
    tags = torch.rand(n, N_TOKENS, generator=generator).argsort(1)  # a permutation of the tags per image
    features = (_class_codes()[classes] + TAG_NORM * torch.eye(N_TOKENS, FEATURES)[tags]
                + NOISE * torch.randn(n, N_TOKENS, FEATURES, generator=generator))
    marked = tags.argmin(1)
    answer = classes[torch.arange(n), marked]
    input_ids = torch.tensor([BOS, IMAGE_TOKEN_INDEX, QUESTION, 0]).repeat(n, 1)
    input_ids[:, -1] = FIRST_CLASS + answer
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -1] = input_ids[:, -1]
    pixels = features.transpose(1, 2).reshape(n, FEATURES, 4, 4)
    return Samples(input_ids, labels, pixels, marked, answer)


def _new_model() -> DynamicLlavaForCausalLM:
    """Tiny LLaVA whose layers below sparse_layer cannot move information between tokens."""
    config = DynamicLlavaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        mm_hidden_size=FEATURES, mm_projector_type="mlp2x_gelu",
        sparse_config=dict(sparse_layer=SPARSE_LAYER, vision_keep_rate=KEEP_RATE, d_model=64, nhead=4,
                           dim_feedforward=128, num_layers=2))
    torch.manual_seed(SEED)
    model = DynamicLlavaForCausalLM(config)
    model.model.vision_tower = PatchGridTower()
    for layer in model.model.layers[:SPARSE_LAYER]:
        nn.init.zeros_(layer.self_attn.o_proj.weight)
    return model


def _train_dense(model: DynamicLlavaForCausalLM, steps: int = 50, batch: int = 64) -> None:
    """Dense LLaVA training of the layers >= sparse_layer, norm and head (the projector and the layers below
    stay at their random init, so nothing makes the marked token stand out in the predictor's input)."""
    frozen = [model.model.mm_projector, *model.model.layers[:SPARSE_LAYER], model.model.image_score_predictor,
              model.model.output_text_score_predictor]
    for module in frozen:
        module.requires_grad_(False)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    data = torch.Generator().manual_seed(SEED + 1)
    model.train()
    for _ in range(steps):
        s = _sample(batch, data)
        loss = model(s.input_ids, s.labels, images=s.pixels).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.requires_grad_(False)
    model.eval()


def _train_predictor(model: DynamicLlavaForCausalLM, steps: int = 600, batch: int = 8, lr: float = 5e-4,
                     image_decision: str = "gumbel") -> list[float]:
    """Train only the image predictor with the sparse training forward, as the trainer does: AdamW, 3 %
    warmup then cosine, gradient norm clipped at 1, tau decayed from 1.0 to 0.1. Returns the kept image
    fraction of every step's sampled decisions."""
    model.requires_grad_(False)
    predictor = model.model.image_score_predictor
    predictor.requires_grad_(True)
    optimiser = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimiser, math.ceil(0.03 * steps), steps)
    data = torch.Generator().manual_seed(SEED + 2)
    torch.manual_seed(SEED + 3)  # the Gumbel noise
    kept = []
    model.train()
    for step in range(steps):
        model.sparsity_training = SparsityTraining(gumbel_tau(step, steps, 1.0, 0.1), image_decision)
        s = _sample(batch, data)
        out = model(s.input_ids, s.labels, images=s.pixels)
        optimiser.zero_grad()
        out.loss.backward()
        nn.utils.clip_grad_norm_(predictor.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        kept.append(float(out.vision_keep))
    model.sparsity_training = None
    model.eval()
    return kept


class HideTokens:
    """Keeps every token except one slot per sample (a TokenPolicy), from the trained sparse_layer on."""

    sparse_layer = SPARSE_LAYER
    eviction = None

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots

    def select(self, hidden: torch.Tensor, batch: TokenBatch, probe: AttentionProbe | None = None
               ) -> torch.Tensor:
        keep = batch.valid.clone()
        keep[torch.arange(len(self.slots)), self.slots] = False
        return keep


def _evaluate(model: DynamicLlavaForCausalLM, policy: Callable[[Samples], TokenPolicy], n: int = 512
              ) -> tuple[float, float]:
    """Inference on held-out samples (prefill that physically removes the dropped image tokens after
    sparse_layer - 1) -> (answer accuracy, fraction of samples whose marked token was kept)."""
    s = _sample(n, torch.Generator().manual_seed(SEED + 4))
    with torch.no_grad():
        out = model.forward_full(s.prompts, s.images, policy(s))
    accuracy = (out.logits[:, -1].argmax(-1) == FIRST_CLASS + s.answer).float().mean()
    kept = out.keep[torch.arange(n), IMAGE_START + s.marked].float().mean()
    return float(accuracy), float(kept)


def _assert_meets_the_budget(training_kept: list[float], keep_gradient: str | None = None,
                             last_steps: int = 50) -> None:
    """The sampled decisions of the last steps keep about vision_keep_rate of the image tokens. With the exact
    keep derivative only far fewer than all: its exp(score gap) spikes can hold the rate above the budget,
    and whether they do follows the trajectory, which the CPU's kernels change (on an AMD EPYC, fp32: 37 %
    where an Intel Xeon met 12.5 %; docs/RESULTS.md has the same effect in the demo chain)."""
    mean = sum(training_kept[-last_steps:]) / last_steps
    message = f"training kept {mean:.1%} of the image tokens (target {KEEP_RATE:.1%})"
    if keep_gradient == "exact":
        assert mean < 0.5, message
    else:
        assert abs(mean - KEEP_RATE) < 0.05, message


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Thousands of tiny ops: one thread is fastest, and several slow down badly on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def dense_state() -> dict[str, torch.Tensor]:
    model = _new_model()
    _train_dense(model)
    return model.state_dict()


def _frozen_llm(state: dict[str, torch.Tensor]) -> DynamicLlavaForCausalLM:
    model = _new_model()
    model.load_state_dict(state)
    model.eval()
    return model


def test_the_answer_needs_the_marked_token(dense_state: dict[str, torch.Tensor]) -> None:
    model = _frozen_llm(dense_state)
    dense_accuracy, _ = _evaluate(model, lambda s: make_policy(model, SparsityOptions(sparse=False)))
    hidden_accuracy, kept = _evaluate(model, lambda s: HideTokens(IMAGE_START + s.marked))
    assert kept == 0.0
    assert dense_accuracy >= 0.95
    assert hidden_accuracy < 0.25, f"chance is {1 / N_CLASSES}"


@pytest.mark.parametrize(("keep_gradient", "image_decision"),
                         [*((gradient, "gumbel") for gradient in KEEP_GRADIENTS), ("bounded", "top_k")])
def test_the_image_predictor_learns_to_keep_the_token_the_answer_needs(dense_state: dict[str, torch.Tensor],
                                                                        keep_gradient: str, image_decision: str) -> None:
    model = _frozen_llm(dense_state)
    use_masked_attention(model, masked_attention_function("blocked", keep_gradient))
    learned = lambda s: make_policy(model)  # noqa: E731  the predictor's top-k, k = 2 of 16
    _, untrained_kept = _evaluate(model, learned)
    training_kept = _train_predictor(model, image_decision=image_decision)
    accuracy, kept = _evaluate(model, learned)
    assert kept >= 0.9, f"marked token kept in {kept:.1%} of samples (untrained predictor: {untrained_kept:.1%})"
    assert accuracy >= 0.9, f"accuracy with 2 of 16 image tokens: {accuracy:.1%}"
    _assert_meets_the_budget(training_kept, keep_gradient)


def test_without_the_attention_gradient_the_predictor_does_not_find_it(
        dense_state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: the keep decisions reach the masked attention detached; the regulariser still
    trains the predictor (it meets the budget) but nothing tells it which token matters."""
    real_decide = llava_module.decide

    def detached_decide(*args: Any, **kwargs: Any) -> TrainingDecisions:
        decisions = real_decide(*args, **kwargs)
        return dataclasses.replace(decisions, keep=decisions.keep.detach())

    monkeypatch.setattr(llava_module, "decide", detached_decide)
    model = _frozen_llm(dense_state)
    training_kept = _train_predictor(model)
    accuracy, kept = _evaluate(model, lambda s: make_policy(model))
    _assert_meets_the_budget(training_kept)
    assert kept < 0.5, f"marked token kept in {kept:.1%} of samples (budget {KEEP_RATE:.1%})"
    assert accuracy < 0.5
