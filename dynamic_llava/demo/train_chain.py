"""`dynamic-llava demo train --out DIR [--quick] [--seed N] [--precision P]`: the whole Dynamic-LLaVA chain
from scratch, in one process.

0. data: the synthetic shapes benchmark (`data synth`) in DIR/data;
1. start: a tiny plain LLaMA and a tiny, randomly initialised CLIP tower (DIR/start);
2. stage 0, the tower's pre-training (there is no pre-trained CLIP here): supervised by the scene
   specs, per patch only (`tower_pretrain`): DIR/stage0, a CLIP folder;
3. stage 1, feature alignment: the projector alone, regressed onto the start LLM's word embeddings of
   each patch's object attributes (`projector_align`; DIR/stage1/mm_projector.bin);
4. stage 2, instruction tuning: the LLM, the tower and the aligned projector frozen, `v1` template: the
   dense LLaVA (DIR/stage2, whose config names DIR/stage0 as its tower);
5. stage 3, Dynamic-LLaVA sparsification training (vision keep 0.2, output-text keep 0.5): DIR/stage3
   (from DIR/stage3_start: stage 2's files linked, with a `sparse_config` sizing the fresh predictors);
6. evaluation of both on the test split (`model_vqa_loader` + `score_synth`), printed as a table and
   written to DIR/summary.json with the majority baselines and the wall time of each stage.

Every step is the project's own entry point called in-process; this module only chooses sizes and flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import IMAGE_DECISIONS
from ..cpu_features import cpu_model_name, native_bf16
from ..errors import UserError
from ..eval.io import read_json

if TYPE_CHECKING:
    from .tower_pretrain import SceneSplits


@dataclass(frozen=True)
class Recipe:
    """Sizes and training hyper-parameters of one chain."""

    n_train: int  # training scenes (one multi-turn conversation each)
    n_test: int  # test (and val) scenes
    # Tower: 112 px in 14-px patches = 64 image tokens, so keeping 20 % leaves 12, fewer than the scenes'
    # object patches (each object fills one patch; targets plus grey look-alikes exceed 12).
    image_size: int = 112
    patch_size: int = 14
    tower_hidden: int = 128
    # LLaVA reads the tower's second-to-last hidden state (-2); with one layer that is the patch embedding
    # (conv + position + pre-norm), which sees only its own patch: no object can leak into other tokens,
    # so dropping a token loses exactly what it shows.
    tower_layers: int = 1
    select_layer: int = -2
    tower_heads: int = 4
    llm_hidden: int = 256
    llm_layers: int = 4
    llm_heads: int = 4
    # Tokens are dropped before the first layer: all 4 layers see the reduced set (LLaVA-1.5: 30 of 32).
    # Dropped from layer 1, layer 0 alone answered most questions: the question's words come after the
    # image and, in that one layer, fetch the patch they name from every image token (docs/RESULTS.md).
    sparse_layer: int = 0
    batch_size: int = 16  # samples per optimiser step of stages 2 and 3
    # Each step's samples are drawn at random and run as this many length-sorted micro-batches (gradient
    # accumulation): on this data a random batch is ~45 % padding, and the step's gradient does not change
    micro_batches: int = 4
    tower_steps: int = 1000  # a patch embedding with linear heads: fits far sooner than a transformer
    tower_lr: float = 3e-3
    tower_batch_size: int = 32
    align_steps: int = 4000
    align_lr: float = 1e-3  # at 3e-3 the fit spikes at the one-cycle peak and settles at cosine 0.91, not 0.996
    align_batch_size: int = 256  # images, all their patches
    stage2_epochs: float = 3.0
    stage2_steps: int | None = None  # set: stage 2 runs this many optimiser steps instead (`--stage2-steps`)
    stage2_lr: float = 1e-3
    # The trainer's schedule after the 5 % warm-up. With token subsets and the rate decayed to 0 (cosine), no stage 2
    # learnt to bind colour to shape (the existence questions; runs T16, T16L, T16s1); held (constant_with_warmup),
    # seed 0 learnt it in 2000 steps, seed 1 in 3000 (docs/RESULTS.md, runs K0, K1, L1)
    stage2_lr_schedule: str = "constant_with_warmup"
    # Share of the training conversations without a description on which stage 2 sees only some image tokens:
    # the targets plus a random number of other patches (`data synth --token-subset-share`, `train
    # --image_token_subsets`), so that its answers, counts included, do not hang on how many tokens it sees.
    # Without them the dense model counts by the share of the tokens it sees and the oracle check fails (RESULTS).
    stage2_token_subsets: float = 0.5
    stage3_epochs: float = 1.0
    stage3_steps: int | None = None  # set: stage 3 stops after this many optimiser steps instead (`--stage3-steps`)
    # The reference's ratio: predictors at 40x the LLM's rate (2e-4 vs 5e-6), so the LLM barely moves while
    # the masks are still near random
    stage3_lr: float = 2.5e-5
    predictor_lr: float = 1e-3
    # A dense model that attends sharply to the targets gives a dropped target an unbounded keep derivative,
    # which swamps the keep-rate regulariser: on the 1600-step stage 2, stage 3 with the exact derivative
    # learnt to keep every image token on 4 of 5 tries (RESULTS). "bounded" held the rate (`--keep_gradient`).
    keep_gradient: str = "bounded"
    # Stage 3 keeps in training the image tokens inference keeps (the top k of each image). With the reference's
    # per-token Gumbel decision, 1 of 2 trainings kept targets and look-alikes alike and inference's top k then
    # dropped 12 % of the targets (docs/RESULTS.md); `--image-decision gumbel` trains the reference's way.
    image_decision: str = "top_k"
    # Descriptions are 140-340 tokens, the one-turn question lists 100-140, short answers 1-3: the threshold
    # selects the descriptions and the lists for output-token decisions.
    output_text_len: int = 64
    # Predictor width: SPEC's 512 / 2048 would be twice the LLM's width and most of the bundled model's bytes
    predictor_d_model: int = 128
    predictor_heads: int = 4
    predictor_ff: int = 512
    bf16: bool | None = None  # None: bf16 where the CPU runs it natively (AMX / AVX512-BF16), else fp32
    eval_batch_size: int = 32
    # The test factory's N(0, 0.1) init saturates attention at width 256; trained from scratch, the LLM
    # learns to condition answers on the question far faster from the usual N(0, 0.02)
    llm_init_std: float = 0.02
    describe_share: float = 0.5  # training conversations that also ask for the long description
    answer_all_share: float = 0.5  # training conversations that ask and answer every question in one turn

    @property
    def use_bf16(self) -> bool:
        """`bf16` as given, or (None) whether the CPU runs bf16 natively."""
        return native_bf16() if self.bf16 is None else self.bf16


# Fresh scenes beat repeated epochs here (2000 scenes x 3 epochs and 6000 x 1 score alike): stage 2 is 3000 steps
# over 32000 scenes (1.5 passes). Counting is learnt only past 1000 steps, positions and existence later still
# (RESULTS, the V4 and V6 history sections); at 2000 steps seed 1 had not learnt existence (run K1). A quarter of
# the conversations carry a description, which keeps sequences short and still gives stage 3 (600 steps, 9600
# scenes) ~2400 descriptions; half ask every question in one turn. Stage 3's length decides how much of what the
# LLM loses adapting to the kept tokens it wins back (RESULTS: at 20 %, 300 steps 54.5 %, 600 steps 57.3 %, 900
# steps 59.2 %; 300 steps at 4x the LLM learning rate no better than 300). 600 keeps the chain inside the
# 60-minute bound on the Intel Xeon in bf16: 49-51 min with this 3000-step stage 2 (runs L1, L2); 900 took it to
# 65.4 min with a 2000-step one (run V9).
FULL = Recipe(n_train=32000, n_test=500, stage2_epochs=1.0, stage2_steps=3000, describe_share=0.25,
              stage3_epochs=0.3)
QUICK = Recipe(n_train=48, n_test=8, tower_hidden=32, llm_hidden=64, llm_layers=3, batch_size=8,
               micro_batches=2,
               tower_steps=20, tower_batch_size=8, align_steps=20, align_batch_size=8, stage2_epochs=1.0,
               stage3_epochs=1.0,
               eval_batch_size=36)


def make_start_model(recipe: Recipe, out: Path, seed: int) -> Path:
    """A plain LLaMA (the tiny tokenizer) with the chain's CLIP tower in out/vision_tower."""
    from ..tiny.checkpoint import make_tiny_checkpoint
    from ..tiny.vision_tower import write_tiny_clip_tower

    make_tiny_checkpoint(out, fmt="llm", seed=seed, hidden_size=recipe.llm_hidden,
                         intermediate_size=4 * recipe.llm_hidden, num_hidden_layers=recipe.llm_layers,
                         num_attention_heads=recipe.llm_heads, num_key_value_heads=recipe.llm_heads)
    _reinit_llm(out, seed, recipe.llm_init_std)
    shutil.rmtree(out / "vision_tower")  # the factory's tower is CLIP-336 sized; ours is smaller
    write_tiny_clip_tower(out / "vision_tower", seed=seed, image_size=recipe.image_size,
                          patch_size=recipe.patch_size, hidden_size=recipe.tower_hidden,
                          num_layers=recipe.tower_layers, num_heads=recipe.tower_heads,
                          intermediate_size=4 * recipe.tower_hidden)
    return out


def _reinit_llm(folder: Path, seed: int, std: float) -> None:
    """Re-draw the saved LLM's weights: matrices and embeddings N(0, std), norm scales 1 (seeded)."""
    import torch
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    state = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    fresh = {name: torch.randn(t.shape, generator=generator) * std if t.dim() >= 2 else torch.ones(t.shape)
             for name, t in sorted(state.items())}
    save_file({k: v.to(state[k].dtype).contiguous() for k, v in fresh.items()}, path, metadata={"format": "pt"})


def _common_flags(recipe: Recipe, data: Path, out: Path, seed: int, lr_schedule: str = "cosine") -> list[str]:
    return ["--image_folder", str(data / "images"), "--output_dir", str(out),
            "--mm_projector_type", "mlp2x_gelu",
            "--mm_vision_select_layer", str(recipe.select_layer), "--image_aspect_ratio", "pad",
            "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
            "--model_max_length", "1024", "--per_device_train_batch_size", str(recipe.batch_size // recipe.micro_batches),
            "--gradient_accumulation_steps", str(recipe.micro_batches), "--sort_micro_batches_by_length", "True",
            "--weight_decay", "0.0", "--warmup_ratio", "0.05", "--lr_scheduler_type", lr_schedule,
            "--logging_steps", "10", "--report_to", "none", "--save_strategy", "no",
            "--dataloader_num_workers", "0", "--seed", str(seed), "--bf16", str(recipe.use_bf16)]


def stage0(recipe: Recipe, data: Path, start: Path, out: Path, seed: int, splits: SceneSplits) -> dict[str, Any]:
    """The tower's pre-training on the training scenes; its loss history and held-out head accuracies are
    kept in out/pretrain_result.json."""
    from .tower_pretrain import pretrain_tower

    result = pretrain_tower(data, start / "vision_tower", out, steps=recipe.tower_steps, lr=recipe.tower_lr,
                            batch_size=recipe.tower_batch_size, seed=seed, threads=None,
                            select_layer=recipe.select_layer, bf16=recipe.use_bf16, splits=splits)
    (out / "pretrain_result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def stage1(recipe: Recipe, data: Path, start: Path, tower: Path, out: Path, seed: int,
           splits: SceneSplits) -> dict[str, Any]:
    """Feature alignment: the projector alone, fitted to word-embedding slots (LLaVA's pre-training stage
    with a target the generator knows); its loss history and held-out fit are kept in out/align_result.json."""
    from .projector_align import align_projector

    result = align_projector(data, start, tower, out, steps=recipe.align_steps, lr=recipe.align_lr,
                             batch_size=recipe.align_batch_size, seed=seed, select_layer=recipe.select_layer,
                             bf16=recipe.use_bf16, splits=splits)
    (out / "align_result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def stage2(recipe: Recipe, data: Path, start: Path, tower: Path, projector: Path, out: Path, seed: int,
           extra_flags: Sequence[str] = ()) -> None:
    """Instruction tuning of the LLM, the pre-trained tower and the aligned projector frozen (trained, the
    projector drifts off its slots and the look-up is learnt later): the dense LLaVA. `extra_flags` go to
    the trainer last (a benchmark's `--max_steps`)."""
    from ..train.train import train

    train(["--model_name_or_path", str(start), "--vision_tower", str(tower),
           "--version", "v1", "--pretrain_mm_mlp_adapter", str(projector), "--freeze_mm_mlp_adapter", "True",
           "--data_path", str(data / "train" / "instruct.json"),
           *_common_flags(recipe, data, out, seed, recipe.stage2_lr_schedule),
           "--num_train_epochs", str(recipe.stage2_epochs), "--learning_rate", str(recipe.stage2_lr),
           "--image_token_subsets", str(recipe.stage2_token_subsets > 0),
           *_max_steps(recipe.stage2_steps), *extra_flags])


def sparse_start(recipe: Recipe, dense: Path, out: Path) -> Path:
    """The stage-3 start: the dense checkpoint's files (linked) with a `sparse_config` sizing the predictors,
    which loading then initialises fresh (the dense folder itself stays a plain LLaVA-1.5 checkpoint)."""
    out.mkdir(parents=True)
    for item in dense.iterdir():
        if item.name not in ("config.json", "trainer_state.json", "training_args.bin"):
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((dense / "config.json").read_text(encoding="utf-8"))
    config["sparse_config"] = {"d_model": recipe.predictor_d_model, "nhead": recipe.predictor_heads,
                               "dim_feedforward": recipe.predictor_ff}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def stage3(recipe: Recipe, data: Path, dense: Path, tower: Path, out: Path, seed: int) -> None:
    """Dynamic-LLaVA sparsification training on top of the dense model (tower frozen, as in the paper; the
    projector too, as in stage 2)."""
    from ..train.train import train

    start = out.parent / f"{out.name}_start"
    if start.exists():  # left by a stopped run
        shutil.rmtree(start)
    sparse_start(recipe, dense, start)
    train(["--model_name_or_path", str(start),
           "--vision_tower", str(tower),
           "--version", "v1", "--requires_image", "True", "--freeze_mm_mlp_adapter", "True",
           "--data_path", str(data / "train" / "instruct.json"), *_common_flags(recipe, data, out, seed),
           "--num_train_epochs", str(recipe.stage3_epochs), "--learning_rate", str(recipe.stage3_lr),
           "--predictor_lr", str(recipe.predictor_lr), "--sparse_layer", str(recipe.sparse_layer),
           "--vision_keep_rate", "0.2", "--keep_gradient", recipe.keep_gradient,
           "--image_decision", recipe.image_decision,
           "--output_text_keep_rate", "0.5", "--output_text_len_for_training", str(recipe.output_text_len),
           *_max_steps(recipe.stage3_steps)],
          sparse=True)


def _max_steps(steps: int | None) -> list[str]:
    """The trainer flag that replaces a stage's epochs by a step count (the data repeats past one epoch)."""
    return [] if steps is None else ["--max_steps", str(steps)]


def evaluate(recipe: Recipe, model: Path, data: Path, out: Path, dense: bool) -> dict[str, Any]:
    """Answer the test questions with `model_vqa_loader` and score them with `score_synth`; add the kept
    fractions of image / output tokens from the runner's per-answer stats."""
    from ..data.score_synth import score
    from ..eval import model_vqa_loader
    from ..eval.io import read_jsonl

    answers = out / "answers.jsonl"
    argv = ["--model-path", str(model), "--question-file", str(data / "test" / "questions.jsonl"),
            "--image-folder", str(data / "images"), "--answers-file", str(answers), "--conv-mode", "llava_v1",
            "--batch-size", str(recipe.eval_batch_size), "--max-new-tokens", "8", "--device", "cpu",
            "--dtype", "float32"]  # as `demo compare` runs them, whatever the CPU's bf16 support
    if model_vqa_loader.main([*argv, "--no-sparse"] if dense else argv) != 0:
        raise UserError(f"evaluation of {model} failed (see the error above)")
    rows = read_jsonl(answers)
    result = score(rows, read_jsonl(data / "test" / "answers.jsonl"))

    def kept(kind: str) -> float | None:
        total = sum(r["metadata"][f"{kind}_tokens"] for r in rows)
        return sum(r["metadata"][f"{kind}_tokens_kept"] for r in rows) / total if total else None

    result["image_tokens_kept"], result["output_tokens_kept"] = kept("image"), kept("output")
    return result


def _timed(name: str, timings: dict[str, dict[str, float]], step: Callable[[], Any]) -> Any:
    """Run one stage, announcing it and recording its wall time and the machine's load (shared CPU)."""
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    value = step()
    seconds = time.perf_counter() - start
    timings[name] = {"seconds": round(seconds, 1), "load_average_1min": round(os.getloadavg()[0], 2)}
    print(f"=== {name}: {seconds:.0f} s ===", flush=True)
    return value


class StageRunner:
    """Runs the chain's stages in order, recording each one's wall time in out/timings.json. With `resume`,
    a stage whose completion marker exists (its last file written) is not run again: its result is read
    back and its recorded time kept; the first unfinished stage starts from scratch (its partial output
    removed), and so does every later one."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.out, self.resume, self.reused = out, resume, []
        path = out / "timings.json"
        self.timings: dict[str, dict[str, float]] = read_json(path) if resume and path.is_file() else {}
        self.redo = not resume

    def run(self, name: str, marker: Path, folder: Path | None, step: Callable[[], Any],
            read_back: Callable[[], Any] = lambda: None) -> Any:
        if not self.redo and marker.is_file() and name in self.timings:
            print(f"\n=== {name}: finished earlier, reused ===", flush=True)
            self.reused.append(name)
            return read_back()
        self.redo = True  # every later stage depends on this one
        if folder is not None and folder.exists():
            shutil.rmtree(folder)
        value = _timed(name, self.timings, step)
        (self.out / "timings.json").write_text(json.dumps(self.timings, indent=2) + "\n", encoding="utf-8")
        return value


def format_table(summary: dict[str, Any]) -> str:
    """Accuracy per question type: majority baseline, dense LLaVA, Dynamic-LLaVA."""
    majority, dense, sparse = (summary["majority_baseline_test"], summary["dense"], summary["dynamic_llava"])
    lines = [f"{'question type':<14}{'majority':>10}{'dense':>10}{'dynamic':>10}"]
    for category in [*dense["per_type"], "overall"]:
        dense_row, sparse_row = ((r["overall"] if category == "overall" else r["per_type"][category])
                                 for r in (dense, sparse))
        lines.append(f"{category:<14}{100 * majority[category]['accuracy']:>9.1f}%"
                     f"{100 * dense_row['accuracy']:>9.1f}%{100 * sparse_row['accuracy']:>9.1f}%")
    lines.append(f"{'image tokens kept':<34}{100 * dense['image_tokens_kept']:>9.1f}%"
                 f"{100 * sparse['image_tokens_kept']:>9.1f}%")
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    """Where this run's stages trained: the same recipe and seed learn differently on another CPU
    (docs/RESULTS.md), so a summary names it (stages reused by `--resume` may have run elsewhere)."""
    import torch

    return {"cpu": cpu_model_name(), "native_bf16": native_bf16(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def run_chain(out: Path, recipe: Recipe, seed: int = 0, resume: bool = False) -> dict[str, Any]:
    """Every stage into `out` (new or empty; with `resume`, a chain folder whose finished stages are kept);
    returns the summary also written to out/summary.json."""
    from ..data.synth import SynthConfig, write_dataset
    from ..model.checkpoint_files import load_image_processor
    from .tower_pretrain import SceneSplits

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not resume)):
        raise UserError(f"{out} exists and is not empty (--resume continues a chain folder)")
    out.mkdir(parents=True, exist_ok=True)
    data, start, tower = out / "data", out / "start", out / "stage0"
    stages = StageRunner(out, resume)
    read = lambda path: lambda: read_json(path)
    stats = stages.run("data", data / "stats.json", data, lambda: write_dataset(
        SynthConfig(seed, recipe.image_size, recipe.n_train, n_val=recipe.n_test, n_test=recipe.n_test,
                    describe_share=recipe.describe_share, answer_all_share=recipe.answer_all_share,
                    token_subset_share=recipe.stage2_token_subsets), data),
        read(data / "stats.json"))
    stages.run("start", start / "vision_tower" / "config.json", start, lambda: make_start_model(recipe, start, seed))
    # stages 0 and 1 read the same images: loaded once (the start tower's processor is the one stage 0 saves)
    splits = None

    def shared_splits() -> SceneSplits:
        nonlocal splits
        if splits is None:
            splits = SceneSplits(data, load_image_processor(start / "vision_tower"), recipe.image_size,
                                 recipe.patch_size)
        return splits

    tower_result = stages.run("stage0", tower / "pretrain_result.json", tower,
                              lambda: stage0(recipe, data, start, tower, seed, shared_splits()),
                              read(tower / "pretrain_result.json"))
    align_result = stages.run("stage1", out / "stage1" / "align_result.json", out / "stage1",
                              lambda: stage1(recipe, data, start, tower, out / "stage1", seed, shared_splits()),
                              read(out / "stage1" / "align_result.json"))
    splits = None  # ~1.2 GB of pixels stages 2 and 3 do not need
    stages.run("stage2", out / "stage2" / "config.json", out / "stage2",
               lambda: stage2(recipe, data, start, tower, out / "stage1" / "mm_projector.bin", out / "stage2", seed))
    stages.run("stage3", out / "stage3" / "config.json", out / "stage3",
               lambda: stage3(recipe, data, out / "stage2", tower, out / "stage3", seed))
    stages.redo = True  # the evaluations always run
    dense = stages.run("eval_dense", out / "eval", out / "eval" / "dense",
                       lambda: evaluate(recipe, out / "stage2", data, out / "eval" / "dense", dense=True))
    sparse = stages.run("eval_sparse", out / "eval", out / "eval" / "dynamic",
                        lambda: evaluate(recipe, out / "stage3", data, out / "eval" / "dynamic", dense=False))
    timings = stages.timings
    summary = {"recipe": dataclasses.asdict(recipe), "bf16": recipe.use_bf16, "seed": seed,
               "majority_baseline_test": stats["majority_baseline_test"], "tower_pretraining_val": tower_result.get("val"),
               "projector_alignment_val": align_result.get("val"),
               "dense": dense, "dynamic_llava": sparse,
               "timings": timings, "total_seconds": round(sum(t["seconds"] for t in timings.values()), 1),
               "resumed_stages": stages.reused, "machine": _machine(),
               "models": {"dense": str(out / "stage2"), "dynamic_llava": str(out / "stage3")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print("\n" + format_table(summary))
    print(f"total {summary['total_seconds']:.0f} s (sum of the stages' wall times"
          f"{', some from an earlier run: ' + ', '.join(stages.reused) if stages.reused else ''}); "
          f"summary written to {out / 'summary.json'}")
    return summary


# `--stage2-lr-schedule` choices, the trainer's `--lr_scheduler_type` names (both after the 5 % warm-up)
STAGE2_LR_SCHEDULES = ("cosine", "constant_with_warmup")

# `--precision` -> Recipe.bf16
PRECISIONS: dict[str, bool | None] = {"auto": None, "bf16": True, "fp32": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: the same chain in a few minutes (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue a stopped chain in --out: finished "
                        "stages are kept, the first unfinished one and all later ones run again")
    parser.add_argument("--stage2-steps", type=_positive_int, default=None, metavar="N",
                        help="optimiser steps of stage 2 (default: the recipe's, 3000 for the full chain, one pass for "
                        "--quick; docs/RESULTS.md)")
    parser.add_argument("--stage3-steps", type=_positive_int, default=None, metavar="N",
                        help="optimiser steps of stage 3 (default: the recipe's, 600 for the full chain; 900 "
                        "brings Dynamic-LLaVA to dense but takes the chain past 60 minutes: docs/RESULTS.md)")
    parser.add_argument("--stage2-token-subsets", type=_share, default=None, metavar="SHARE",
                        help="share of the training conversations without a description on which stage 2 sees only "
                        "the targets and a random number of other patches (default: the recipe's, "
                        f"{FULL.stage2_token_subsets:g}; docs/RESULTS.md)")
    parser.add_argument("--stage2-lr-schedule", choices=STAGE2_LR_SCHEDULES, default=None,
                        help="stage 2's learning-rate schedule after its 5 %% warm-up (default: the recipe's, "
                        f"{FULL.stage2_lr_schedule}; docs/RESULTS.md)")
    parser.add_argument("--describe-share", type=_share, default=None, metavar="SHARE",
                        help="share of the training conversations that also ask for the long description (default: "
                        f"the recipe's, {FULL.describe_share:g}; `data synth --describe-share`)")
    parser.add_argument("--answer-all-share", type=_share, default=None, metavar="SHARE",
                        help="share of the training conversations that ask and answer every question in one turn "
                        f"(default: the recipe's, {FULL.answer_all_share:g}; `data synth --answer-all-share`)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="auto",
                        help="training precision of every stage (evaluation is always fp32). auto: bf16 autocast "
                        "where the CPU runs bf16 natively (AMX / AVX512-BF16), else fp32. On an Intel Xeon with AMX "
                        "the full chain took 40 min in bf16, 50 in fp32; which learns more varies from machine to "
                        "machine (docs/RESULTS.md)")
    parser.add_argument("--image-decision", choices=IMAGE_DECISIONS, default=FULL.image_decision,
                        help="how stage 3 picks image tokens in training (`train --image_decision`): top_k, the "
                        "tokens inference keeps (default), or gumbel, the reference's per-token decision "
                        "(docs/RESULTS.md)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The recipe `demo train` runs: the full or quick one with the command line's overrides."""
    overrides = {name: value for name in ("stage2_steps", "stage3_steps", "stage2_token_subsets", "describe_share",
                                          "answer_all_share", "stage2_lr_schedule")
                 if (value := getattr(args, name)) is not None}
    return dataclasses.replace(QUICK if args.quick else FULL, **overrides, bf16=PRECISIONS[args.precision],
                               image_decision=args.image_decision)


def run(args: argparse.Namespace) -> int:
    run_chain(Path(args.out), recipe_from_args(args), args.seed, args.resume)
    return 0
