"""`dynamic-llava demo train --quick`: the whole chain (data, start model, stages 0-3, evaluation) end to end
at toy size; every stage's output loads and the summary holds what the demo reports. `demo export` and
`demo compare` run on that chain's output."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dynamic_llava.cli import build_parser
from dynamic_llava.cli import main as cli_main
from dynamic_llava.cpu_features import cpu_model_name, native_bf16
from dynamic_llava.data.questions import SHORT_ANSWER_TYPES
from dynamic_llava.demo.train_chain import FULL, recipe_from_args
from dynamic_llava.eval.io import read_jsonl
from dynamic_llava.model.loading import load_pretrained_model


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "chain"
    assert cli_main(["demo", "train", "--out", str(out), "--quick", "--seed", "0", "--stage2-steps", "9",
                    "--stage3-steps", "4", "--describe-share", "0.25"]) == 0
    return out


def test_stages_2_and_3_run_the_steps_asked_for(chain: Path) -> None:
    # the quick recipe's epoch is 6 steps: stage 2 goes past it into the repeated data, stage 3 stops short
    for stage, steps in (("stage2", 9), ("stage3", 4)):
        state = json.loads((chain / stage / "trainer_state.json").read_text())
        assert state["global_step"] == steps
        assert state["log_history"][-1]["train_runtime"] > 0  # the trainer ended its run, not a stopped one
    recipe = json.loads((chain / "summary.json").read_text())["recipe"]
    assert (recipe["stage2_steps"], recipe["stage3_steps"], recipe["image_decision"]) == (9, 4, "top_k")
    assert recipe["stage2_token_subsets"] == 0.5  # the default
    config = json.loads((chain / "data" / "stats.json").read_text())["config"]
    assert (config["describe_share"], config["token_subset_share"]) == (0.25, 0.5)  # flag and default reach the data
    # stage 2's default schedule; stage 3 keeps its own
    for stage, schedule in (("stage2", "constant_with_warmup"), ("stage3", "cosine")):
        args = torch.load(chain / stage / "training_args.bin", weights_only=False)
        assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == schedule
    records = json.loads((chain / "data" / "train" / "instruct.json").read_text())
    assert 0 < sum("image_token_subset" in r for r in records) < len(records)


@pytest.mark.parametrize("flag", ["--stage2-token-subsets", "--describe-share", "--answer-all-share"])
@pytest.mark.parametrize("share", ["-0.1", "1.5", "half"])
def test_a_share_outside_0_1_is_refused(flag: str, share: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "train", "--out", str(tmp_path / "chain"), "--quick", flag, share])
    assert exit_info.value.code == 2
    assert not (tmp_path / "chain").exists()


@pytest.mark.parametrize("stage", ["--stage2-steps", "--stage3-steps"])
@pytest.mark.parametrize("steps", ["0", "-3", "many"])
def test_a_stage_length_below_one_step_is_refused(stage: str, steps: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "train", "--out", str(tmp_path / "chain"), "--quick", stage, steps])
    assert exit_info.value.code == 2
    assert not (tmp_path / "chain").exists()


@pytest.mark.parametrize(("flag", "bf16"), [("auto", None), ("bf16", True), ("fp32", False)])
def test_precision_flag_sets_the_recipe(flag: str, bf16: bool | None) -> None:
    args = build_parser().parse_args(["demo", "train", "--out", "unused", "--precision", flag,
                                       "--stage2-steps", "2500", "--stage3-steps", "7"])
    recipe = recipe_from_args(args)
    assert recipe.bf16 is bf16 and recipe.n_train == FULL.n_train
    assert (recipe.stage2_steps, recipe.stage3_steps) == (2500, 7)
    if flag != "auto":  # forced: the CPU's bf16 support no longer decides
        assert recipe.use_bf16 is bf16


def test_the_training_mix_flags_set_the_recipe() -> None:
    default = recipe_from_args(build_parser().parse_args(["demo", "train", "--out", "unused"]))
    assert (default.describe_share, default.answer_all_share, default.stage2_token_subsets) == (
        FULL.describe_share, FULL.answer_all_share, 0.5)
    assert default.stage2_steps == 3000
    recipe = recipe_from_args(build_parser().parse_args(["demo", "train", "--out", "unused", "--describe-share",
                                                         "0.1", "--answer-all-share", "0",
                                                         "--stage2-token-subsets", "0"]))
    assert (recipe.describe_share, recipe.answer_all_share, recipe.stage2_token_subsets) == (0.1, 0.0, 0.0)


@pytest.mark.parametrize(("flags", "field", "value"), [
    ([], "stage2_lr_schedule", "constant_with_warmup"),
    (["--stage2-lr-schedule", "cosine"], "stage2_lr_schedule", "cosine"),
    ([], "image_decision", "top_k"),
    (["--image-decision", "gumbel"], "image_decision", "gumbel")])
def test_choice_flags_set_the_recipe(flags: list[str], field: str, value: str) -> None:
    recipe = recipe_from_args(build_parser().parse_args(["demo", "train", "--out", "unused", *flags]))
    assert getattr(recipe, field) == value


@pytest.mark.parametrize(("flag", "choice"), [("--stage2-lr-schedule", "linear"), ("--image-decision", "argmax"),
                                              ("--precision", "fp16")])
def test_an_unknown_choice_is_refused(flag: str, choice: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "train", "--out", str(tmp_path / "chain"), "--quick", flag, choice])
    assert exit_info.value.code == 2
    assert not (tmp_path / "chain").exists()


def test_every_stage_output_exists_and_loads(chain: Path) -> None:
    data = chain / "data"
    for name in ("stats.json", "train/pretrain.json", "train/instruct.json", "test/questions.jsonl",
                 "test/answers.jsonl"):
        assert (data / name).is_file(), name
    assert (chain / "start" / "config.json").is_file() and (chain / "start" / "vision_tower").is_dir()
    # stage 0: the pre-trained tower, a CLIP folder of its own that differs from the start's
    start_tower = safe_open(chain / "start" / "vision_tower" / "model.safetensors", "pt")
    tower = safe_open(chain / "stage0" / "model.safetensors", "pt")
    name = "vision_model.embeddings.patch_embedding.weight"  # what LLaVA reads at select layer -2 of 1
    assert not torch.equal(start_tower.get_tensor(name), tower.get_tensor(name))
    # stage 1: the aligned projector over the start LLM, which stages 2 and 3 keep frozen
    _, aligned, _, _ = load_pretrained_model(chain / "stage1", model_base=chain / "start", sparse=False)
    projector = torch.load(chain / "stage1" / "mm_projector.bin", weights_only=True)
    assert projector and all(torch.equal(aligned.state_dict()[k], v) for k, v in projector.items())
    # stage 2: a dense LLaVA over the frozen stage-0 tower
    _, dense, processor, _ = load_pretrained_model(chain / "stage2", sparse=False)
    assert Path(json.loads((chain / "stage2" / "config.json").read_text())["mm_vision_tower"]) == chain / "stage0"
    loaded = {k.removeprefix("vision_model."): v for k, v in dense.model.vision_tower.vision_tower.state_dict().items()}
    assert torch.equal(loaded[name.removeprefix("vision_model.")].float(), tower.get_tensor(name).float())
    assert processor.crop_size["height"] == dense.model.vision_tower.vision_tower.config.image_size
    assert "sparse_config" not in json.loads((chain / "stage2" / "config.json").read_text())
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in projector.items())
    # stage 3: a Dynamic-LLaVA checkpoint with the paper's keep rates
    _, sparse, _, _ = load_pretrained_model(chain / "stage3")
    assert sparse.sparse.vision_keep_rate == 0.2 and sparse.sparse.output_text_keep_rate == 0.5
    assert any("image_score_predictor" in name for name, _ in sparse.named_parameters())
    assert all(torch.equal(sparse.state_dict()[k], v) for k, v in projector.items())


def test_summary_has_per_type_accuracies_and_stage_times(chain: Path) -> None:
    summary = json.loads((chain / "summary.json").read_text())
    for model in ("dense", "dynamic_llava"):
        per_type = summary[model]["per_type"]
        assert set(per_type) == set(SHORT_ANSWER_TYPES)
        assert all(0.0 <= row["accuracy"] <= 1.0 for row in per_type.values())
        assert 0.0 <= summary[model]["overall"]["accuracy"] <= 1.0
    assert set(summary["majority_baseline_test"]) == {*SHORT_ANSWER_TYPES, "overall"}
    assert summary["tower_pretraining_val"]["colour_accuracy_object_patches"] >= 0.0
    assert -1.0 <= summary["projector_alignment_val"]["cosine"] <= 1.0
    assert {"data", "start", "stage0", "stage1", "stage2", "stage3", "eval_dense", "eval_sparse"} <= set(summary["timings"])
    machine = summary["machine"]  # the CPU the stages trained on: results differ between machines
    assert machine["cpu"] == cpu_model_name() and machine["native_bf16"] is native_bf16()
    assert machine["torch"] == torch.__version__ and machine["threads"] >= 1


def test_the_sparse_model_keeps_a_fifth_of_the_image_tokens(chain: Path) -> None:
    sparse = read_jsonl(chain / "eval" / "dynamic" / "answers.jsonl")
    dense = read_jsonl(chain / "eval" / "dense" / "answers.jsonl")
    assert sparse and len(sparse) == len(dense)
    for row in sparse:
        stats = row["metadata"]
        assert stats["image_tokens_kept"] == math.floor(0.2 * stats["image_tokens"] + 1e-6)
    assert all(row["metadata"]["image_tokens_kept"] == row["metadata"]["image_tokens"] for row in dense)
    summary = json.loads((chain / "summary.json").read_text())
    assert summary["dynamic_llava"]["image_tokens_kept"] == pytest.approx(0.2, abs=0.02)
    assert summary["dense"]["image_tokens_kept"] == 1.0


def test_export_writes_a_self_contained_bf16_model_and_samples(chain: Path, tmp_path: Path) -> None:
    model_dir, samples = tmp_path / "model", tmp_path / "samples"
    assert cli_main(["demo", "export", "--from", str(chain / "stage3"), "--out", str(model_dir),
                     "--samples-out", str(samples), "--samples", "2"]) == 0
    config = json.loads((model_dir / "config.json").read_text())
    assert config["mm_vision_tower"] == "vision_tower" and (model_dir / "vision_tower" / "model.safetensors").is_file()
    with safe_open(model_dir / "model.safetensors", "pt") as stored:
        assert {stored.get_tensor(k).dtype for k in stored.keys()} == {torch.bfloat16}  # noqa: SIM118 (not iterable)
    _, model, _, _ = load_pretrained_model(model_dir)  # fp32 on the CPU, from the bf16 weights
    assert model.sparse.vision_keep_rate == 0.2
    questions = read_jsonl(samples / "questions.jsonl")
    assert {q["image"] for q in questions} == {p.name for p in samples.glob("*.png")} and len(questions) == 18
    assert all(q["answer"] and q["category"] in SHORT_ANSWER_TYPES for q in questions)


def test_export_refuses_a_dense_checkpoint(chain: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["demo", "export", "--from", str(chain / "stage2"), "--out", str(tmp_path / "m"),
                     "--samples-out", str(tmp_path / "s")]) == 2
    assert "not a Dynamic-LLaVA checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_margins_rank_the_patches_as_inference_keeps_them(chain: Path, tmp_path: Path) -> None:
    """`demo margins`' "in top k" shares count the same patches the predictor policy keeps in `generate`."""
    from dynamic_llava.data.scenes import scene_from_dict
    from dynamic_llava.demo.keep_margins import patch_kinds
    from dynamic_llava.generation import GenerationConfig, generate
    from dynamic_llava.model.policy import SparsityOptions, make_policy
    from dynamic_llava.prompting import prepare_request

    out = tmp_path / "margins.json"
    assert cli_main(["demo", "margins", "--model", str(chain / "stage3"), "--data", str(chain / "data"),
                     "--scenes", "5", "--batch-size", "2", "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    kinds = table["kinds"]
    assert table["images"] == 5 and sum(row["patches"] for row in kinds.values()) == 5 * 64
    assert "background" in kinds and any(kind.startswith("target ") for kind in kinds)
    assert all(row["min"] <= row["mean"] <= row["max"] for row in kinds.values())

    tokenizer, model, processor, _ = load_pretrained_model(chain / "stage3")
    kept: dict[str, int] = {}
    for row in read_jsonl(chain / "data" / "test" / "scenes.jsonl")[:5]:
        request = prepare_request("What is in the image?", [chain / "data" / "images" / row["image"]], tokenizer,
                                  processor, model.config, "llava_v1")
        result = generate(model, tokenizer, [request.input_ids], [request.pixel_values],
                          GenerationConfig(max_new_tokens=1), make_policy(model, SparsityOptions()))[0]
        for keep, kind in zip(result.image_keep[0], patch_kinds(scene_from_dict(row), 64)):
            kept[kind] = kept.get(kind, 0) + keep
    for kind, row in kinds.items():
        assert round(row["in_top_k"] * row["patches"] / 100) == kept[kind], kind
    assert sum(kept.values()) == 5 * 12


def test_margins_refuse_a_dense_model(chain: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "margins.json"
    assert cli_main(["demo", "margins", "--model", str(chain / "stage2"), "--data", str(chain / "data"),
                     "--out", str(out)]) == 2
    assert "not a Dynamic-LLaVA checkpoint" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("command", "model_flag", "outputs"),
                         [("export", "--from", ["--out", "--samples-out"]), ("margins", "--model", ["--out"])])
def test_a_broken_checkpoint_config_is_one_clear_error(command: str, model_flag: str, outputs: list[str],
                                                       tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": ')
    args = ["demo", command, model_flag, str(bad), "--data", str(tmp_path / "data")]
    for flag in outputs:
        args += [flag, str(tmp_path / flag.strip("-"))]
    assert cli_main(args) == 2
    assert f"malformed {bad / 'config.json'}: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_compare_refuses_a_dense_model_as_another_stage3(chain: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["demo", "compare", "--chain", str(chain), "--out", str(tmp_path / "out"),
                     "--work", str(tmp_path / "work"), "--other-stage3", str(chain / "stage2")]) == 2
    assert "not a Dynamic-LLaVA checkpoint" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_compare_writes_every_method_with_its_budget(chain: Path, tmp_path: Path) -> None:
    from dynamic_llava.demo.compare import (
        NO_LOOK_ALIKES,
        ORACLE_AT_BUDGET,
        object_patches,
        scene_of,
    )

    out = tmp_path / "results"
    assert cli_main(["demo", "compare", "--chain", str(chain), "--out", str(out), "--work", str(tmp_path / "work"),
                     "--scenes", "2", "--describe-samples", "1", "--curve-samples", "1", "--mask-images", "2",
                     "--max-new-tokens", "6", "--other-stage3", str(chain / "stage3")]) == 0
    results = json.loads((out / "results.json").read_text())
    short, flops = results["short_answers"], results["prefill_flops"]
    families = {row["family"] for row in short.values()}
    assert families == {"dense", "dynamic-llava I", "fastv", "fastv (K=2)", "random", "random (stage 3)",
                        "centre prior", "oracle", "negative control", "dynamic-llava I (other run)"}
    questions = read_jsonl(tmp_path / "work" / "questions.jsonl")
    assert len({scene_of(q) for q in questions}) == 2
    targets = object_patches(chain / "data", "test")
    mean_targets = sum(sum(targets[q["image"]][0]) for q in questions) / len(questions)
    mean_look_alikes = sum(sum(targets[q["image"]][1]) for q in questions) / len(questions)
    for name, row in short.items():
        if row["family"] == "dense":
            expected = 64
        elif name == "oracle (target patches)":
            expected = mean_targets  # exactly each image's target patches
        elif name == NO_LOOK_ALIKES:
            expected = 64 - mean_look_alikes
        else:
            expected = max(1, math.floor(row["vision_keep_rate"] * 64 + 1e-6))
        assert row["image_tokens_kept"] == pytest.approx(expected), name
        assert row["questions"] == len(questions) and set(row["per_type"]) <= set(SHORT_ANSWER_TYPES)
        on_stage3 = row["family"].startswith(("dynamic-llava I", "random (stage 3)")) or name in (
            "dense (stage 3)", "dynamic-llava I 2 tokens", "untrained predictor 0.2")
        expected = "stage3 run 2" if row["family"] == "dynamic-llava I (other run)" else "stage3" if on_stage3 else "stage2"
        assert row["checkpoint"] == expected, name
        assert set(row["pope"]) == {"random", "popular", "adversarial"}
    assert short["oracle (target patches)"]["kept_objects"] == {"targets": 1.0, "distractors": 0.0}
    for oracle in (ORACLE_AT_BUDGET, NO_LOOK_ALIKES):  # 12 tokens / every other patch (above)
        assert short[oracle]["kept_objects"] == {"targets": 1.0, "distractors": 0.0}
    assert short["dense (stage 2)"]["kept_objects"] == {"targets": 1.0, "distractors": 1.0}
    assert flops["fastv 0.2"]["kept_image_tokens"] == flops["dynamic-llava I 0.2"]["kept_image_tokens"] == 12
    # same budget and layer, same paper-formula FLOPs; FastV's layer 0 reads every token; fewer image tokens,
    # fewer FLOPs and a smaller cache
    assert flops["random 0.2 seed 0"]["paper_formula"] == flops["dynamic-llava I 0.2"]["paper_formula"] < \
        flops["fastv 0.2"]["paper_formula"] < flops["dense (stage 2)"]["paper_formula"]
    assert flops["random 0.1"]["exact"] < flops["random 0.2 seed 0"]["exact"] < flops["random 0.5"]["exact"]
    assert short["random 0.2 seed 0"]["kv_cache_bytes"] < short["dense (stage 2)"]["kv_cache_bytes"]
    # tokens dropped before layer 0 (the chain's recipe); FastV's signal needs layer 0's attention
    assert short["random 0.2 seed 0"]["sparse_layer"] == 0 and short["fastv 0.2"]["sparse_layer"] == 1
    assert short["dynamic-llava I 2 tokens"]["image_tokens_kept"] == 2
    # the untrained predictor picks other patches than the trained one, which is restored afterwards
    masks = {name: [r["image_keep"] for r in read_jsonl(tmp_path / "work" / f"answers_{slug}.jsonl")]
             for name, slug in (("untrained", "untrained_predictor_0_2"), ("trained", "dynamic_llava_I_0_2"))}
    assert masks["untrained"] != masks["trained"]
    # the other run is the same checkpoint here: the same answers, the same claims
    assert short["dynamic-llava I 0.2 (run 2)"]["overall"] == short["dynamic-llava I 0.2"]["overall"]
    assert [c["difference"] for c in results["claims"]["overall, run 2"]] == \
        [c["difference"] for c in results["claims"]["overall"]]
    order = results["order"]
    assert [run["row"] for run in order["runs"]] == ["dynamic-llava I 0.2", "dynamic-llava I 0.2 (run 2)"]
    assert order["runs"][0]["holds"] == order["runs"][1]["holds"] and order["met"] == order["runs"][0]["holds"]
    assert "training seed" in (out / "table.md").read_text()
    for view in ("overall", "attribute"):
        checks = results["sanity_checks"][view]
        assert checks[0]["check"] == "dense >= majority + 30"
        assert len(checks) == 6 and all(isinstance(c["passed"], bool) for c in checks)
        assert len(results["claims"][view]) == 3 and len(results["negative_controls"][view]) == 2
        assert all(c["low"] <= c["difference"] <= c["high"]
                   for c in results["claims"][view] + results["negative_controls"][view])
    generation = results["generation"]
    assert {"dense", "h2o 0.5", "structure", "dynamic-llava I|T 0.2"} <= set(generation)
    assert all(len(row["kv_curve_bytes"]) > 0 for row in generation.values())
    masks = results["kept_patches"]["masks"]
    assert set(masks) == {"predictor", "fastv", "random"}
    assert all(sum(mask) == 12 for rule in masks.values() for mask in rule)
    for name in ("table.md", "accuracy_vs_flops.png", "kv_vs_output_length.png", "kept_patches.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    assert "| majority answer |" in table and "Sanity checks" in table and "Claims" in table
    assert "Negative controls" in table


def test_the_chains_image_tokens_each_see_only_their_own_patch(chain: Path) -> None:
    """The tower is read at its patch embedding: changing one patch's pixels moves that image token only,
    so no token carries another patch's object and dropping a token loses exactly what it shows."""
    _, model, _, _ = load_pretrained_model(chain / "stage2", sparse=False)
    tower = model.model.vision_tower
    pixels = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    changed = pixels.clone()
    changed[:, :, 14:28, 28:42] += 1.0  # patch row 1, column 2: token 1 x 8 + 2
    with torch.no_grad():
        moved = (tower(changed) - tower(pixels)).abs().amax(-1)[0] > 1e-5
    assert moved.nonzero().flatten().tolist() == [10]


def test_resume_keeps_finished_stages_and_reruns_the_rest(chain: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "chain"
    shutil.copytree(chain, copy, symlinks=True)
    shutil.rmtree(copy / "stage3")  # as if stopped during stage 3, its start folder left behind
    before = json.loads((copy / "timings.json").read_text())
    assert cli_main(["demo", "train", "--out", str(copy), "--quick", "--resume"]) == 0
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["resumed_stages"] == ["data", "start", "stage0", "stage1", "stage2"]
    assert (copy / "stage3" / "config.json").is_file()
    assert summary["timings"]["stage2"] == before["stage2"]  # kept from the first run
    assert summary["timings"]["stage3"] != before["stage3"]
    assert cli_main(["demo", "train", "--out", str(copy), "--quick"]) == 2  # without --resume: refused


BENCH_MICRO_BATCHES = Path(__file__).resolve().parents[1] / "scripts" / "bench_micro_batches.py"


def test_micro_batch_benchmark_times_each_setting_on_the_chain(chain: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, str(BENCH_MICRO_BATCHES), "--chain", str(chain), "--out", str(out),
                          "--steps", "2", "--micro-batches", "1", "4"], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = json.loads((out / "bench_micro_batches.json").read_text())["rows"]
    assert [(r["micro_batches"], r["per_device_batch"]) for r in rows] == [(1, 16), (4, 4)]
    assert rows[0]["ratio_to_first"] == 1.0 and all(r["seconds_per_step"] > 0 for r in rows)
    for row in rows:  # each setting really trained its steps, with its own accumulation
        state = json.loads((out / f"micro_batches_{row['micro_batches']}" / "trainer_state.json").read_text())
        assert state["global_step"] == 2
        args = torch.load(out / f"micro_batches_{row['micro_batches']}" / "training_args.bin", weights_only=False)
        assert args.gradient_accumulation_steps == row["micro_batches"]


def test_micro_batch_benchmark_refuses_a_folder_that_is_not_a_chain(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(BENCH_MICRO_BATCHES), "--chain", str(tmp_path), "--out",
                          str(tmp_path / "bench")], check=False, capture_output=True, text=True)
    assert run.returncode == 2 and "not a finished chain folder" in run.stderr
    assert not (tmp_path / "bench").exists()
