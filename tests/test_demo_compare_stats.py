"""The comparison's statistics and reference rules: scene-paired bootstrap, sanity checks and claims, the
oracle and centre-prior policies."""

from __future__ import annotations

import pytest
import torch

from dynamic_llava.demo.compare import (NO_LOOK_ALIKES, ORACLE_AT_BUDGET, RANDOM_SEEDS, claims, negative_controls,
                                          of_type, only, order_claim, paired_bootstrap, sanity_checks)
from dynamic_llava.demo.reference_policies import CentrePrior, GivenPatches, centre_scores, targets_plus_background
from dynamic_llava.model.batch import IMAGE, TEXT, TokenBatch


def test_bootstrap_interval_brackets_the_difference_and_resamples_scenes() -> None:
    scenes = [f"s{i // 3}" for i in range(300)]  # 100 scenes of 3 questions
    a = [1.0] * 300
    assert paired_bootstrap(a, a, scenes) == {"difference": 0.0, "low": 0.0, "high": 0.0}
    b = [float(i % 2) for i in range(300)]
    result = paired_bootstrap(a, b, scenes)
    assert result["low"] < result["difference"] < result["high"]
    assert result["difference"] == pytest.approx(50.0)
    # Whole scenes either all right or all wrong: resampling scenes, not questions, widens the interval
    clustered = [float((i // 3) % 2) for i in range(300)]
    by_scene = paired_bootstrap(a, clustered, scenes)
    by_question = paired_bootstrap(a, clustered, [str(i) for i in range(300)])
    assert by_scene["high"] - by_scene["low"] > 1.3 * (by_question["high"] - by_question["low"])


def _short(dense: float, one_token: float, random: float, oracle: float, ours: float = 0.0, fastv: float = 0.0,
           no_look_alikes: float | None = None, oracle_at_budget: float | None = None) -> dict[str, dict[str, float]]:
    rows = {"dense (stage 2)": dense, "random 1 token": one_token, "oracle (target patches)": oracle,
            NO_LOOK_ALIKES: oracle if no_look_alikes is None else no_look_alikes,
            ORACLE_AT_BUDGET: oracle if oracle_at_budget is None else oracle_at_budget,
            "dynamic-llava I 0.2": ours, "fastv 0.2": fastv}
    rows |= {f"random 0.2 seed {s}": random for s in RANDOM_SEEDS}
    return {name: {"overall": value} for name, value in rows.items()}


def test_sanity_checks_fail_when_the_benchmark_leaks() -> None:
    good = sanity_checks(_short(0.8, 0.4, 0.6, 0.79), majority=0.3)
    assert all(c["passed"] for c in good)
    leaky = sanity_checks(_short(0.8, 0.7, 0.78, 0.8), majority=0.3)
    assert [c["passed"] for c in leaky] == [True, False, False, True, True, True]
    assert not sanity_checks(_short(0.8, 0.4, 0.6, 0.75), majority=0.3)[3]["passed"]  # oracle 5 points down
    # the target-only oracle 5 points down, every patch but the look-alikes within 2: a shift, not a leak
    shifted = sanity_checks(_short(0.8, 0.4, 0.6, 0.75, no_look_alikes=0.79), majority=0.3)
    assert [c["passed"] for c in shifted] == [True, True, True, False, True, True]
    assert shifted[4]["check"] == "oracle (every patch but the look-alikes) >= dense - 2"


def test_the_headroom_check_fails_where_fastv_is_as_good_as_the_oracle() -> None:
    # FastV 2 points below the oracle at 20 %: no selection can be the claimed 3 points above FastV
    no_room = sanity_checks(_short(0.8, 0.4, 0.6, 0.79, fastv=0.74, oracle_at_budget=0.76), majority=0.3)
    assert [c["passed"] for c in no_room] == [True, True, True, True, True, False]
    assert no_room[5]["check"] == "oracle 0.2 (targets + background) >= fastv 0.2 + 3"
    assert no_room[5]["points"] == pytest.approx(2.0)
    room = sanity_checks(_short(0.8, 0.4, 0.6, 0.79, fastv=0.70, oracle_at_budget=0.76), majority=0.3)
    assert room[5]["passed"] and room[5]["points"] == pytest.approx(6.0)


def test_claims_need_the_interval_to_exclude_zero_against_fastv() -> None:
    scenes = [f"s{i}" for i in range(200)]
    ours = [1.0] * 200
    correct = {"dynamic-llava I 0.2": ours, "dense (stage 2)": ours, "fastv 0.2": [0.0] * 20 + [1.0] * 180}
    correct |= {f"random 0.2 seed {s}": [0.0] * 100 + [1.0] * 100 for s in RANDOM_SEEDS}
    met = {c["claim"]: c for c in claims(correct, scenes)}
    fastv = met["Dynamic-LLaVA >= FastV + 3, interval excluding 0"]
    assert fastv["difference"] == pytest.approx(10.0) and fastv["low"] > 0 and fastv["met"]
    assert met["Dynamic-LLaVA >= random (5 seeds) + 5"]["met"]
    correct["fastv 0.2"] = [0.0] * 2 + [1.0] * 198  # 1 point better only
    assert not {c["claim"]: c for c in claims(correct, scenes)}["Dynamic-LLaVA >= FastV + 3, interval excluding 0"]["met"]


def test_order_claim_needs_the_order_on_two_trainings() -> None:
    short = _short(0.8, 0.3, 0.4, 0.7, ours=0.7, fastv=0.6) | {"dynamic-llava I 0.2 (run 2)": {"overall": 0.65}}
    both = order_claim(short, ["dynamic-llava I 0.2", "dynamic-llava I 0.2 (run 2)"])
    assert both["met"] and [run["holds"] for run in both["runs"]] == [True, True]
    assert not order_claim(short, ["dynamic-llava I 0.2"])["met"]  # one training cannot show it
    short["dynamic-llava I 0.2 (run 2)"]["overall"] = 0.55  # below FastV on the second seed
    broken = order_claim(short, ["dynamic-llava I 0.2", "dynamic-llava I 0.2 (run 2)"])
    assert not broken["met"] and [run["holds"] for run in broken["runs"]] == [True, False]
    short["fastv 0.2"]["overall"] = 0.3  # FastV below random: not the claimed order either
    assert not order_claim(short, ["dynamic-llava I 0.2"] * 2)["met"]


def _batch(n_images: int, n_patches: int) -> TokenBatch:
    """Per sample: 2 text tokens, then one image of n_patches tokens."""
    t = 2 + n_patches
    kinds = torch.full((n_images, t), TEXT)
    kinds[:, 2:] = IMAGE
    image_ids = torch.full((n_images, t), -1)
    image_ids[:, 2:] = torch.arange(n_images)[:, None]
    positions = torch.arange(t).expand(n_images, t)
    return TokenBatch(torch.zeros(n_images, t, 4), positions, torch.full((n_images,), t), kinds, image_ids)


def test_centre_prior_keeps_the_central_patches_and_the_text() -> None:
    scores = centre_scores(16)
    assert set(scores.topk(4).indices.tolist()) == {5, 6, 9, 10}  # the 2 x 2 centre of a 4 x 4 grid
    keep = CentrePrior(0.25, sparse_layer=2).select(torch.zeros(2, 18, 4), _batch(2, 16))
    assert keep[:, :2].all() and keep[:, 2:].sum(1).tolist() == [4, 4]
    assert keep[0, 2 + 5] and not keep[0, 2]
    with pytest.raises(ValueError):
        centre_scores(15)


def test_given_patches_keeps_exactly_them_per_image() -> None:
    masks = [torch.tensor([True, False, False, True]), torch.tensor([False, False, True, False])]
    keep = GivenPatches(masks, sparse_layer=2).select(torch.zeros(2, 6, 4), _batch(2, 4))
    assert keep[:, 2:].tolist() == [m.tolist() for m in masks] and keep[:, :2].all()


def test_oracle_at_budget_adds_background_never_a_look_alike() -> None:
    targets = [i in (0, 5, 9) for i in range(16)]
    distractors = [i in (1, 2, 3, 4) for i in range(16)]
    keep = targets_plus_background(targets, distractors, budget=6, seed="a.png")
    assert sum(keep) == 6 and all(keep[i] for i in (0, 5, 9)) and not any(keep[i] for i in (1, 2, 3, 4))
    assert keep == targets_plus_background(targets, distractors, budget=6, seed="a.png")  # same image, same patches
    others = {tuple(targets_plus_background(targets, distractors, 6, f"{i}.png")) for i in range(20)}
    assert len(others) > 1  # the background is drawn per image, not a fixed corner
    assert targets_plus_background(targets, distractors, budget=2, seed="a.png") == targets  # never drops a target
    assert sum(targets_plus_background(targets, distractors, budget=16, seed="a.png")) == 12  # no look-alike


def test_negative_controls_hold_only_when_the_method_loses() -> None:
    scenes = [f"s{i}" for i in range(200)]
    correct = {"dense (stage 2)": [1.0] * 200, "dynamic-llava I 2 tokens": [0.0] * 100 + [1.0] * 100,
               "untrained predictor 0.2": [0.0] * 150 + [1.0] * 50}
    correct |= {f"random 0.2 seed {s}": [0.0] * 150 + [1.0] * 50 for s in RANDOM_SEEDS}
    held = [c["held"] for c in negative_controls(correct, scenes)]
    assert held == [True, True]
    correct["dynamic-llava I 2 tokens"] = [0.0] * 10 + [1.0] * 190  # 5 points below dense: it did not lose
    correct["untrained predictor 0.2"] = [0.0] * 100 + [1.0] * 100  # 25 points above random
    assert [c["held"] for c in negative_controls(correct, scenes)] == [False, False]


def test_question_type_views() -> None:
    short = {"dense (stage 2)": {"overall": 0.5, "per_type": {"attribute": 0.9, "count": 0.3}}}
    assert of_type(short, "attribute") == {"dense (stage 2)": {"overall": 0.9}}
    correct, scenes = only({"a": [1.0, 0.0, 1.0]}, ["s0", "s0", "s1"], [True, False, True])
    assert correct == {"a": [1.0, 1.0]} and scenes == ["s0", "s1"]
