"""`dynamic-llava demo compare --chain DIR --out docs/results/`: the paper's comparison on the demo chain's model.

On the chain's Dynamic-LLaVA (DIR/stage3) and its test split, for every method in the same engine:
- short-answer accuracy per question type, through `model_vqa_loader` (one answers file per method) and
  `score_synth`, and POPE (accuracy / F1 per negative kind, `eval_pope`'s scoring) on the existence questions;
- image tokens kept, and the mean KV-cache bytes of one answer;
- prefill FLOPs at the model's shape, the paper's formula and the exact count (`bench.flops`);
- on the long descriptions (`generation_ability`'s per-sample evaluation): teacher-forced perplexity,
  METEOR of the greedy output, output tokens kept, KV-cache bytes, and the KV bytes after every token
  of the reference description (the curve of KV bytes vs output length);
- a figure of the patches each vision policy kept on a few test images.

Writes results.json, table.md (the tables of docs/RESULTS.md), accuracy_vs_flops.png,
kv_vs_output_length.png and kept_patches.png into --out; per-method answer files go to --work.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

VISION_BUDGETS = (0.1, 0.2, 0.5)
OUTPUT_KEEP = 0.5
DESCRIBE_MAX_NEW_TOKENS = 400  # descriptions are 150-340 tokens


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a name, its family (plot series) and the inference flags that select it."""

    name: str
    family: str
    flags: tuple[str, ...]
    vision_keep: float = 1.0
    vision_rule: str | None = None  # None: every image token (dense prefill)


def short_answer_methods() -> list[Method]:
    """Dense; Dynamic-LLaVA I (vision only) and I|T (vision + output text); FastV; random; H2O (decoding)."""
    methods = [Method("dense", "dense", ("--no-sparse",))]
    for rate in VISION_BUDGETS:
        r = f"{rate:g}"
        methods += [
            Method(f"dynamic-llava I {r}", "dynamic-llava I", ("--vision-keep-rate", r, "--no-output-sparsity"),
                   rate, "predictor"),
            Method(f"dynamic-llava I|T {r}", "dynamic-llava I|T", ("--vision-keep-rate", r), rate, "predictor"),
            Method(f"fastv {r}", "fastv", ("--vision-policy", "fastv", "--vision-keep-rate", r,
                                           "--no-output-sparsity"), rate, "fastv"),
            Method(f"random {r}", "random", ("--vision-policy", "random", "--vision-keep-rate", r,
                                             "--no-output-sparsity"), rate, "random"),
        ]
    methods.append(Method(f"h2o {OUTPUT_KEEP:g}", "h2o", ("--vision-keep-rate", "1", "--output-policy", "h2o",
                                                         "--output-keep-rate", f"{OUTPUT_KEEP:g}")))
    return methods


def generation_methods() -> list[Method]:
    """The description runs: dense, Dynamic-LLaVA I / I|T at 20 % image tokens, the output-token baselines
    (H2O, random, every other token) at 50 % with every image token, and FastV / random images at 20 %."""
    keep = f"{OUTPUT_KEEP:g}"
    return [
        Method("dense", "dense", ("--no-sparse",)),
        Method("dynamic-llava I 0.2", "dynamic-llava I", ("--vision-keep-rate", "0.2", "--no-output-sparsity"),
               0.2, "predictor"),
        Method("dynamic-llava I|T 0.2", "dynamic-llava I|T", ("--vision-keep-rate", "0.2"), 0.2, "predictor"),
        Method("dynamic-llava T", "dynamic-llava T", ("--vision-keep-rate", "1")),
        Method(f"h2o {keep}", "h2o", ("--vision-keep-rate", "1", "--output-policy", "h2o", "--output-keep-rate", keep)),
        Method(f"random output {keep}", "random output", ("--vision-keep-rate", "1", "--output-policy", "random",
                                                          "--output-keep-rate", keep)),
        Method("structure", "structure", ("--vision-keep-rate", "1", "--output-policy", "structure")),
        Method("fastv 0.2", "fastv", ("--vision-policy", "fastv", "--vision-keep-rate", "0.2",
                                      "--no-output-sparsity"), 0.2, "fastv"),
        Method("random 0.2", "random", ("--vision-policy", "random", "--vision-keep-rate", "0.2",
                                        "--no-output-sparsity"), 0.2, "random"),
    ]


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("|", "").replace(".", "")


def _subset(data: Path, split: str, scenes: int, work: Path) -> tuple[Path, list[dict], list[dict]]:
    """The questions of the split's first `scenes` scenes (a file for model_vqa_loader) and their answers."""
    from ..eval.io import read_jsonl

    ids = {s["scene_id"] for s in read_jsonl(data / split / "scenes.jsonl")[:scenes]}
    keep = lambda row: row["question_id"].rsplit("_", 1)[0] in ids  # noqa: E731 - ids are <scene_id>_<k>
    questions = [q for q in read_jsonl(data / split / "questions.jsonl") if keep(q)]
    answers = [a for a in read_jsonl(data / split / "answers.jsonl") if keep(a)]
    path = work / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    return path, questions, answers


def _pope(data: Path, split: str, answers: list[dict], truth: list[dict]) -> dict[str, Any]:
    """POPE per negative kind, scored like `eval_pope` (LLaVA's yes/no reading), on the existence questions."""
    from ..eval.eval_pope import score
    from ..eval.io import read_jsonl

    kind = {q["question_id"]: q["category"] for q in read_jsonl(data / split / "pope" / "questions.jsonl")}
    text = {a["question_id"]: a["text"] for a in answers}
    out = {}
    for negative in sorted({kind[t["question_id"]] for t in truth if t["question_id"] in kind}):
        rows = [t for t in truth if kind.get(t["question_id"]) == negative]
        s = score([t["answer"] for t in rows], [text[t["question_id"]] for t in rows])
        out[negative] = {"accuracy": s.accuracy, "f1": s.f1, "yes_ratio": s.yes_ratio, "questions": len(rows)}
    return out


def run_short_answers(model: Path, data: Path, split: str, scenes: int, work: Path, batch_size: int,
                      methods: list[Method]) -> dict[str, dict[str, Any]]:
    from ..data.score_synth import score
    from ..eval import model_vqa_loader
    from ..eval.io import read_jsonl

    question_file, _, truth = _subset(data, split, scenes, work)
    results = {}
    for method in methods:
        answers_file = work / f"answers_{_slug(method.name)}.jsonl"
        answers_file.unlink(missing_ok=True)  # a fresh run, not a resume of an older one
        argv = ["--model-path", str(model), "--question-file", str(question_file),
                "--image-folder", str(data / "images"), "--answers-file", str(answers_file),
                "--conv-mode", "llava_v1", "--batch-size", str(batch_size), "--max-new-tokens", "8",
                "--device", "cpu", *method.flags]
        print(f"\n--- {method.name}: python -m dynamic_llava.eval.model_vqa_loader {shlex.join(argv)}", flush=True)
        if model_vqa_loader.main(argv) != 0:
            raise UserError(f"model_vqa_loader failed for {method.name}")
        rows = read_jsonl(answers_file)
        scores = score(rows, truth)
        meta = [r["metadata"] for r in rows]
        results[method.name] = {
            "family": method.family, "flags": list(method.flags), "vision_keep_rate": method.vision_keep,
            "per_type": {c: r["accuracy"] for c, r in scores["per_type"].items()},
            "overall": scores["overall"]["accuracy"], "questions": scores["overall"]["questions"],
            "pope": _pope(data, split, rows, [t for t in truth if t["category"] == "existence"]),
            "image_tokens": statistics.mean(m["image_tokens"] for m in meta),
            "image_tokens_kept": statistics.mean(m["image_tokens_kept"] for m in meta),
            "kv_cache_bytes": statistics.mean(m["kv_cache_bytes"] for m in meta),
            "kv_cache_bytes_dense": statistics.mean(m["kv_cache_bytes_dense"] for m in meta),
        }
    return results


def prefill_flops(model_config: Any, tower_config: Any, text_tokens: int, methods: list[Method]
                  ) -> dict[str, dict[str, float]]:
    """Paper formula and exact prefill FLOPs (batch 1, one image) per method at the demo model's shape."""
    from ..bench import flops

    shape = flops.shape_from_configs(model_config, tower_config)
    n_image = (tower_config.image_size // tower_config.patch_size) ** 2
    sparse_layer = model_config.sparse.sparse_layer
    out = {}
    for method in methods:
        kept = math.floor(method.vision_keep * n_image + 1e-6)
        schedule = (flops.Schedule(method.name, 0, n_image) if method.vision_rule is None else
                    flops.Schedule(method.name, sparse_layer, kept, method.vision_rule == "predictor"))
        out[method.name] = {
            "kept_image_tokens": schedule.kept_image_tokens,
            "paper_formula": flops.paper_formula_flops(shape, schedule, n_image),
            "exact": flops.exact_prefill_flops(shape, schedule, text_tokens, n_image, vocab=model_config.vocab_size),
        }
    return out


def kv_curve(model: Any, request: Any, target: list[int]) -> list[int]:
    """KV-cache bytes of one sample after each reference token is fed back (teacher forcing, the model's
    current policy, online compression / eviction as in decoding)."""
    import torch

    policy = model.default_policy()
    device = model.lm_head.weight.device
    curve = []
    with torch.inference_mode():
        cache = model.new_cache(1)
        batch = model.embed([request.input_ids], [request.pixel_values])
        model.step(batch, cache, policy)
        position = batch.lengths.to(device)
        per_entry = cache.bytes_per_entry()
        for token in target[:-1]:
            model.step(model.embed_generated(torch.tensor([token], device=device), position), cache, policy)
            position = position + 1
            curve.append(int(cache.lengths()[:, 0].sum()) * per_entry)
    return curve


def run_generation(model_path: Path, data: Path, split: str, samples: int, curve_samples: int,
                   methods: list[Method], max_new_tokens: int = DESCRIBE_MAX_NEW_TOKENS) -> dict[str, dict[str, Any]]:
    from ..eval.generation_ability import aggregate, evaluate_sample, load_meteor, read_samples
    from ..model.loading import load_pretrained_model
    from ..prompting import prepare_request
    from ..sparsity_options import add_sparsity_arguments, sparsity_overrides

    meteor, note = load_meteor()
    rows = read_samples(str(data / split / "describe.jsonl"), str(data / "images"), samples)
    parser = argparse.ArgumentParser()
    add_sparsity_arguments(parser)
    results = {}
    for method in methods:
        flags = parser.parse_args(list(method.flags))
        print(f"\n--- {method.name}: python -m dynamic_llava.eval.generation_ability --model-path {model_path} "
              f"--question-file {data / split / 'describe.jsonl'} --image-folder {data / 'images'} "
              f"--limit {samples} --max-new-tokens {max_new_tokens} {shlex.join(method.flags)}", flush=True)
        tokenizer, model, processor, _ = load_pretrained_model(model_path, device="cpu", **sparsity_overrides(flags))
        args = argparse.Namespace(image_folder=str(data / "images"), conv_mode="llava_v1",
                                  max_new_tokens=max_new_tokens)
        per_sample = [evaluate_sample(model, tokenizer, processor, s, args, meteor) for s in rows]
        curves = []
        for sample in rows[:curve_samples]:
            request = prepare_request(sample["text"], [data / "images" / sample["image"]], tokenizer, processor,
                                      model.config, "llava_v1")
            target = tokenizer(sample["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            curves.append(kv_curve(model, request, target))
        length = min(len(c) for c in curves)
        results[method.name] = {"family": method.family, "flags": list(method.flags), **aggregate(per_sample),
                                "meteor_note": note,
                                "kv_curve_bytes": [statistics.mean(c[t] for c in curves) for t in range(length)]}
    return results


def kept_patch_masks(model_path: Path, data: Path, split: str, images: int, rate: float
                     ) -> tuple[list[Path], dict[str, list[list[bool]]]]:
    """Per vision rule, the keep mask of each of the split's first `images` images (describe prompt)."""
    from ..eval.io import read_jsonl
    from ..generation import GenerationConfig, generate
    from ..model.loading import load_pretrained_model
    from ..prompting import prepare_request

    samples = read_jsonl(data / split / "describe.jsonl")[:images]
    paths = [data / "images" / s["image"] for s in samples]
    masks: dict[str, list[list[bool]]] = {}
    for rule in ("predictor", "fastv", "random"):
        tokenizer, model, processor, _ = load_pretrained_model(model_path, device="cpu", vision_policy=rule,
                                                               vision_keep_rate=rate)
        masks[rule] = []
        for sample, path in zip(samples, paths):
            request = prepare_request(sample["text"], [path], tokenizer, processor, model.config, "llava_v1")
            result = generate(model, tokenizer, [request.input_ids], [request.pixel_values],
                              GenerationConfig(max_new_tokens=1))[0]
            masks[rule].append(result.image_keep[0])
    return paths, masks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chain", required=True, help="a `demo train` output folder (stage3/ and data/ inside)")
    parser.add_argument("--out", required=True, help="folder for results.json, table.md and the PNGs")
    parser.add_argument("--work", default=None, help="folder for per-method answer files (default: CHAIN/compare)")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--scenes", type=int, default=200, help="scenes of the split for the short answers")
    parser.add_argument("--describe-samples", type=int, default=20, help="descriptions for PPL / METEOR")
    parser.add_argument("--curve-samples", type=int, default=5, help="descriptions averaged in the KV curve")
    parser.add_argument("--mask-images", type=int, default=4, help="images in the kept-patch figure")
    parser.add_argument("--max-new-tokens", type=int, default=DESCRIBE_MAX_NEW_TOKENS,
                        help="greedy description length limit")
    parser.add_argument("--batch-size", type=int, default=32)


def run(args: argparse.Namespace) -> int:
    from ..model.loading import load_pretrained_model
    from . import compare_report

    chain, out = Path(args.chain), Path(args.out)
    model, data = chain / "stage3", chain / "data"
    if not (model / "config.json").is_file() or not (data / args.split / "scenes.jsonl").is_file():
        raise UserError(f"{chain} is not a `dynamic-llava demo train` output (needs stage3/ and data/)")
    for flag, value in (("--scenes", args.scenes), ("--describe-samples", args.describe_samples),
                        ("--curve-samples", args.curve_samples), ("--mask-images", args.mask_images),
                        ("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    work = Path(args.work) if args.work else chain / "compare"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    summary = json.loads((chain / "summary.json").read_text()) if (chain / "summary.json").is_file() else {}

    methods = short_answer_methods()
    short = run_short_answers(model, data, args.split, args.scenes, work, args.batch_size, methods)
    _, loaded, _, _ = load_pretrained_model(model, device="cpu")
    tower = loaded.model.vision_tower.vision_tower.config
    text_tokens = _prompt_text_tokens(model, data, args.split, work)
    flops = prefill_flops(loaded.config, tower, text_tokens, methods)
    generation = run_generation(model, data, args.split, args.describe_samples, args.curve_samples,
                                generation_methods(), args.max_new_tokens)
    paths, masks = kept_patch_masks(model, data, args.split, args.mask_images, 0.2)
    results = {
        "model": str(model), "split": args.split, "scenes": args.scenes,
        "majority_baseline": _majority(data, args.split, args.scenes, work),
        "shape": {"llm_hidden": loaded.config.hidden_size, "llm_layers": loaded.config.num_hidden_layers,
                  "tower_hidden": tower.hidden_size, "tower_layers": tower.num_hidden_layers,
                  "image_tokens": short["dense"]["image_tokens"], "prompt_text_tokens": text_tokens,
                  "sparse_layer": loaded.config.sparse.sparse_layer},
        "short_answers": short, "prefill_flops": flops, "generation": generation,
        "kept_patches": {"images": [str(p) for p in paths], "vision_keep_rate": 0.2, "masks": masks},
        "chain_summary": {k: summary.get(k) for k in ("recipe", "timings", "total_seconds")},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    compare_report.write_report(results, out)
    print((out / "table.md").read_text())
    return 0


def _majority(data: Path, split: str, scenes: int, work: Path) -> dict[str, Any]:
    """The majority-answer baseline (most frequent training answer per type) on the compared questions."""
    stats = json.loads((data / "stats.json").read_text())
    always = {c: r["answer"] for c, r in stats["majority_baseline_test"].items() if c != "overall"}
    _, _, truth = _subset(data, split, scenes, work)
    per_type = {}
    for category in always:
        rows = [t for t in truth if t["category"] == category]
        per_type[category] = sum(t["answer"] == always[category] for t in rows) / len(rows)
    overall = sum(t["answer"] == always[t["category"]] for t in truth) / len(truth)
    return {"per_type": per_type, "overall": overall, "answers": always}


def _prompt_text_tokens(model_path: Path, data: Path, split: str, work: Path) -> int:
    """Mean text tokens (system prompt, template, question) of the compared short-answer prompts."""
    from ..eval.io import read_jsonl
    from ..model.loading import load_pretrained_model
    from ..prompting import prepare_request

    tokenizer, model, processor, _ = load_pretrained_model(model_path, device="cpu")
    questions = read_jsonl(work / "questions.jsonl")[:50]
    counts = [len(prepare_request(q["text"], [data / "images" / q["image"]], tokenizer, processor, model.config,
                                  "llava_v1").input_ids) - 1 for q in questions]  # minus the <image> placeholder
    return round(statistics.mean(counts))
