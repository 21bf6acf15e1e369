"""The training forward (what Trainer calls): dense LLaVA loss and Dynamic-LLaVA's masked view."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from dynamic_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from dynamic_llava.errors import UserError
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.model.policy import SparsityOptions, make_policy
from dynamic_llava.model.sparsity_training import (SparsityTraining, TrainingDecisions, decide, gumbel_keep, gumbel_tau,
                                                   gumbel_top_k_keep, last_answer_mask)
from transformers_reference import transformers_llama


@pytest.fixture()
def model(tiny_llava_dir):
    _, model, _, _ = load_pretrained_model(tiny_llava_dir)
    _train_with(model, output_text_len_for_training=4)
    return model.train()


@pytest.fixture()
def decided(monkeypatch) -> list[TrainingDecisions]:
    """The decisions of every training forward the test runs, recorded as `decide` returns them."""
    from dynamic_llava.model import llava

    recorded: list[TrainingDecisions] = []

    def recording_decide(*args, **kwargs):
        recorded.append(decide(*args, **kwargs))
        return recorded[-1]

    monkeypatch.setattr(llava, "decide", recording_decide)
    return recorded


def _train_with(model, **fields) -> None:
    """Sparsification training's settings, written into the checkpoint's sparse_config as build_model does."""
    model.config.sparse_config = model.sparse.replace(**fields).to_dict()


def _batch():
    """Sample 0: image + 6-token answer; sample 1: text only, 3-token answer, one padding slot."""
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9, 10, 11, 12, 13, 2],
                        [1, 5, 6, 7, 8, 9, 10, 11, 2, 0, 0]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 5:] = ids[0, 5:]
    labels[1, 6:9] = ids[1, 6:9]
    mask = ids != 0
    images = [torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)), None]
    return ids, labels, mask, images


def test_dense_loss_is_the_shifted_cross_entropy_of_forward_full(model) -> None:
    ids, labels, mask, images = _batch()
    out = model(ids, labels, mask, images)
    model.eval()
    with torch.no_grad():
        full = model.forward_full([ids[0], ids[1][mask[1]]], images,
                                  policy=make_policy(model, SparsityOptions(sparse=False))).logits
    # sample 0 expands to 10 text + 576 image tokens; its labels sit on the text tokens after the image
    n_img = 576
    logits0 = full[0, : 10 + n_img]
    target0 = torch.full((10 + n_img,), IGNORE_INDEX)
    target0[4 + n_img:] = ids[0, 5:]
    logits1, target1 = full[1, :9], labels[1, :9]
    ce = F.cross_entropy(torch.cat([logits0[:-1], logits1[:-1]]), torch.cat([target0[1:], target1[1:]]),
                         ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ce, rtol=1e-4, atol=1e-4)
    assert out.vision_keep is None  # dense: nothing decided


def test_image_token_subsets_train_on_the_kept_tokens_at_their_positions(model) -> None:
    """The dense loss with an image token subset equals transformers' LLaMA run on the text and only the kept
    image features, each at its original position."""
    ids, labels, mask, images = _batch()
    subset = [0, 5, 17, 300, 575]
    out = model(ids, labels, mask, images, image_token_subsets=[[subset], None])
    llama = transformers_llama(model)
    with torch.no_grad():
        features = model.encode_images(images[0])[0]  # [576, C]
        embed = model.model.embed_tokens
        before, after = ids[0, :2], ids[0, 3:]  # around the placeholder
        embeds0 = torch.cat([embed(before), features[subset], embed(after)])
        positions0 = torch.cat([torch.arange(2), 2 + torch.tensor(subset), 2 + 576 + torch.arange(len(after))])
        logits0 = llama(inputs_embeds=embeds0[None], position_ids=positions0[None]).logits[0]
        logits1 = llama(ids[1][mask[1]][None]).logits[0]
    target0 = torch.full((len(embeds0),), IGNORE_INDEX)
    target0[2 + len(subset) + 2:] = ids[0, 5:]  # labels on the text after the image, from the answer on
    target1 = labels[1][mask[1]]
    ce = F.cross_entropy(torch.cat([logits0[:-1], logits1[:-1]]), torch.cat([target0[1:], target1[1:]]),
                         ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ce, rtol=1e-4, atol=1e-4)
    whole = model(ids, labels, mask, images, image_token_subsets=[None, None])
    torch.testing.assert_close(whole.loss, model(ids, labels, mask, images).loss)  # None: every token
    assert abs(float(whole.loss.detach()) - float(out.loss.detach())) > 1e-3  # the subset changed what the LLM saw


@pytest.mark.parametrize("subsets, message", [
    ([[[0, 576]], None], "outside 0..575"), ([[[0], [1]], None], "1 image(s) but 2"), ([None], "for 1 samples")])
def test_bad_image_token_subsets_are_refused(model, subsets, message) -> None:
    ids, labels, mask, images = _batch()
    with pytest.raises(UserError, match=re.escape(message)):
        model(ids, labels, mask, images, image_token_subsets=subsets)


def test_image_token_subsets_are_refused_under_sparsification_training(model) -> None:
    ids, labels, mask, images = _batch()
    model.sparsity_training = SparsityTraining(tau=1.0)
    with pytest.raises(UserError, match="chooses the image tokens itself"):
        model(ids, labels, mask, images, image_token_subsets=[[[0, 1]], None])


def test_sparse_forward_trains_predictors_not_the_tower(model) -> None:
    ids, labels, mask, images = _batch()
    model.sparsity_training = SparsityTraining(tau=1.0)
    torch.manual_seed(0)
    out = model(ids, labels, mask, images)
    assert out.vision_mask_loss is not None and out.output_mask_loss is not None
    assert 0.0 < float(out.vision_keep) < 1.0
    expected = out.lm_loss + 100.0 * (out.vision_mask_loss + out.output_mask_loss)
    torch.testing.assert_close(out.loss.detach(), expected)
    out.loss.backward()
    for predictor in (model.model.image_score_predictor, model.model.output_text_score_predictor):
        grads = [p.grad for p in predictor.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_the_attention_is_asked_for_the_keep_gradient_of_every_decided_slot(model, monkeypatch) -> None:
    """The decided slots the layers receive are exactly the sampled ones: the predictors' gradients are the
    same as when the attention computes dL/dkeep at every slot."""
    ids, labels, mask, images = _batch()
    model.sparsity_training = SparsityTraining(tau=1.0)
    seen = []

    def predictor_grads() -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(3)
        model(ids, labels, mask, images).loss.backward()
        return [p.grad.clone() for p in model.model.image_score_predictor.parameters()] + \
            [p.grad.clone() for p in model.model.output_text_score_predictor.parameters()]

    restricted = predictor_grads()
    attention = model.model.layers[-1].self_attn.masked_attention

    def everywhere(*args, decided=None, **kwargs):
        seen.append(decided)
        return attention(*args, **kwargs)

    for layer in model.model.layers:
        layer.self_attn.masked_attention = everywhere
    full = predictor_grads()
    decided = seen[0]
    assert decided is not None and 0 < int(decided.sum()) < decided.numel()
    for a, b in zip(restricted, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert sum(float(g.abs().sum()) for g in full) > 0


def test_short_answers_get_no_output_decisions(model) -> None:
    ids, labels, mask, images = _batch()
    _train_with(model, output_text_len_for_training=50)
    model.sparsity_training = SparsityTraining(tau=1.0)
    out = model(ids, labels, mask, images)
    assert out.output_mask_loss is None and out.vision_mask_loss is not None


def test_truncated_away_answer_gives_a_finite_zero_lm_loss(model) -> None:
    ids, labels, mask, images = _batch()
    model.config.tokenizer_model_max_length = 100  # cuts sample 0 inside its image; sample 1 kept whole
    labels[1] = IGNORE_INDEX
    model.sparsity_training = SparsityTraining(tau=0.5)
    out = model(ids, labels, mask, images)
    assert out.logits.shape[1] == 100
    assert float(out.lm_loss) == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_gives_the_same_gradients(model) -> None:
    ids, labels, mask, images = _batch()
    model.sparsity_training = SparsityTraining(tau=1.0)
    torch.manual_seed(1)
    model(ids, labels, mask, images).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    torch.manual_seed(1)
    model(ids, labels, mask, images).loss.backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_gumbel_keep_is_hard_with_a_soft_gradient() -> None:
    logits = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0)).requires_grad_()
    torch.manual_seed(0)
    keep = gumbel_keep(logits, tau=1.0)
    assert set(keep.detach().unique().tolist()) <= {0.0, 1.0}
    keep.sum().backward()
    assert logits.grad.abs().sum() > 0
    # with logits strongly for "keep" (index 0) almost everything is kept
    assert gumbel_keep(torch.tensor([[5.0, -5.0]]).expand(1000, 2), 1.0).mean() > 0.95


def test_gumbel_top_k_keeps_exactly_k_per_image_with_a_gradient_at_the_cut() -> None:
    torch.manual_seed(0)
    # keep margins 30, 60, ... 360 (logits [m / 2, -m / 2]): far apart against the logistic noise
    margins = 30.0 * torch.arange(1.0, 13.0)
    logits = torch.stack([margins / 2, -margins / 2], -1).repeat(4, 1, 1).requires_grad_()
    keep = gumbel_top_k_keep(logits, k=3, tau=1.0)
    assert set(keep.detach().unique().tolist()) == {0.0, 1.0}
    assert keep.detach().sum(1).tolist() == [3.0] * 4
    assert keep.detach()[:, -3:].eq(1).all()  # the 3 largest margins
    keep[:, 8].sum().backward()  # the largest margin below the cut
    # its sigmoid around the cut (between 9 and 8) has a gradient, and the cut's other token the opposite one;
    # a token 7 places below has none
    assert logits.grad[:, 8, 0].gt(0).all() and logits.grad[:, 8, 1].lt(0).all()
    assert logits.grad[:, 9, 0].lt(0).all()
    assert logits.grad[:, 1].abs().max() < 1e-12
    # only the margins' differences count: the gradient of any loss sums to 0 over an image's margins
    logits.grad = None
    weights = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    (gumbel_top_k_keep(logits, k=3, tau=30.0) * weights).sum().backward()
    margin_grad = logits.grad[..., 0]  # d(logit0 - logit1) / d logit0 = 1 and / d logit1 = -1
    assert margin_grad.abs().sum() > 0
    torch.testing.assert_close(margin_grad.sum(1), torch.zeros(4), atol=1e-6, rtol=0)
    # a Gumbel decision keeps all 12 (every margin is far above 0), and none has a gradient: the saturation
    # the top-k decision avoids
    saturated = logits.detach().requires_grad_()
    gumbel = gumbel_keep(saturated, 1.0)
    assert gumbel.detach().sum(1).tolist() == [12.0] * 4
    gumbel.sum().backward()
    assert saturated.grad.abs().max() < 1e-6
    # k >= N keeps everything
    assert gumbel_top_k_keep(logits.detach(), k=12, tau=1.0).eq(1).all()


def test_top_k_image_decision_keeps_what_inference_keeps(model, decided) -> None:
    """With --image_decision top_k each image keeps floor(vision_keep_rate x N) tokens in training, as the
    inference's top-k does (115 of 576 at 0.2), and the predictor still gets a gradient."""
    ids, labels, mask, images = _batch()
    model.sparsity_training = SparsityTraining(tau=1.0, image_decision="top_k")
    torch.manual_seed(0)
    out = model(ids, labels, mask, images)
    assert decided[0].keep.detach()[0, 2:2 + 576].sum() == 115
    torch.testing.assert_close(out.vision_keep.float(), torch.tensor(115 / 576))
    out.loss.backward()
    grads = [p.grad for p in model.model.image_score_predictor.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize(("image_decision", "trains"), [("gumbel", True), ("top_k", False)])
def test_the_image_regulariser_trains_the_predictor_only_under_the_gumbel_decision(
        model, decided, image_decision: str, trains: bool) -> None:
    """Under top_k the kept share is fixed, so the regulariser's image term is a constant: through the
    straight-through estimator it would push every token at the cut alike and drown the LM's signal (in the
    demo's stage 3 the LM loss stayed at its start)."""
    _train_with(model, output_text_len_for_training=100)  # no answer is long enough: the image term alone
    model.sparsity_training = SparsityTraining(tau=1.0, image_decision=image_decision)
    ids, labels, mask, images = _batch()
    torch.manual_seed(0)
    model(ids, labels, mask, images)
    assert float(decided[0].mask_loss_sum.detach()) > 0
    assert decided[0].mask_loss_sum.requires_grad is trains


def test_tau_schedule_is_exponential() -> None:
    assert gumbel_tau(0, 100, 1.0, 0.1) == pytest.approx(1.0)
    assert gumbel_tau(50, 100, 1.0, 0.1) == pytest.approx(0.1 ** 0.5)
    assert gumbel_tau(100, 100, 1.0, 0.1) == pytest.approx(0.1)


def test_last_answer_mask_picks_the_last_supervised_run() -> None:
    x = IGNORE_INDEX
    labels = torch.tensor([[x, 4, 5, x, x, 6, 7, 8, x], [x, x, x, x, x, x, x, x, x], [3, 3, x, x, x, x, x, x, 9]])
    mask = last_answer_mask(labels)
    assert mask[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert not mask[1].any()
    assert mask[2].tolist() == [0] * 8 + [1]


def test_keep_rate_regulariser_is_the_reference_formula(model, decided) -> None:
    """Batch of 2: sample 0 has an image and a 6-token answer, sample 1 no image and a 3-token answer
    (below output_text_len_for_training 4). Each term is summed over the samples that have it and divided
    by B = 2, as the reference does: the short answer and the missing image count as 0, not as absent."""
    ids, labels, mask, images = _batch()
    model.sparsity_training = SparsityTraining(tau=1.0)
    torch.manual_seed(0)
    out = model(ids, labels, mask, images)
    keep = decided[0].keep.detach()
    n_img = 576
    image_fraction = keep[0, 2:2 + n_img].mean()  # sample 0: BOS, "5", then its image
    answer_fraction = keep[0, 4 + n_img:10 + n_img].mean()  # its 6 answer tokens (labels 5: of the ids)
    vision_term = (0.2 - image_fraction) ** 2 / 2
    output_term = (0.5 - answer_fraction) ** 2 / 2
    torch.testing.assert_close(out.vision_mask_loss, vision_term)
    torch.testing.assert_close(out.output_mask_loss, output_term)
    torch.testing.assert_close(out.loss.detach(), out.lm_loss + 100.0 * (vision_term + output_term))


def test_sparse_forward_before_the_first_layer_trains_the_predictor(model) -> None:
    """sparse_layer 0: the image predictor scores the projected image features themselves."""
    _train_with(model, sparse_layer=0)
    model.sparsity_training = SparsityTraining(tau=1.0)
    ids, labels, mask, images = _batch()
    torch.manual_seed(0)
    out = model(ids, labels, mask, images)
    assert 0.0 < float(out.vision_keep) < 1.0
    out.loss.backward()
    grads = [p.grad for p in model.model.image_score_predictor.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
