"""`dynamic-llava demo margins --model DIR --data DIR`: how a Dynamic-LLaVA's image predictor scores the
synthetic scenes' patches, by kind: each target shape, each look-alike shape, background.

The keep margin (keep logit - drop logit) is what inference ranks, keeping the top k of each image, and what
the reference's training decision compares with 0 after Gumbel noise. Per kind: the mean / min / max margin,
the share above 0 (what that training decision keeps, noise aside) and the share among the image's top k
(what inference keeps). A predictor that puts targets and look-alikes alike far above 0 was trained to keep
both and never to order them: inference's top k then cuts among them by chance (docs/RESULTS.md).

Prints a table; `--out` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import UserError

PROMPT = "Describe the image."  # image tokens come before the question: their margins do not depend on it
BACKGROUND = "background"


def image_margins(model_path: Path, image_paths: list[Path], batch_size: int
                  ) -> tuple[list[list[float]], float]:
    """Each image's keep margins [N] (patches row-major) as the model's inference computes them at its
    sparse_layer, and the model's vision keep rate."""
    import torch

    from ..generation import GenerationConfig, generate
    from ..model.loading import load_pretrained_model
    from ..model.policy import DynamicLlavaPolicy, SparsityOptions, make_policy
    from ..prompting import prepare_request

    tokenizer, model, processor, _ = load_pretrained_model(model_path, device="cpu")
    policy = make_policy(model, SparsityOptions(vision_policy="predictor"))
    if not isinstance(policy, DynamicLlavaPolicy) or policy.vision_rule != "predictor":
        raise UserError(f"{model_path} does not sparsify image tokens (no image predictor in its sparse_config)")
    recorded: list[torch.Tensor] = []
    score = policy.image_scores

    def recording_scores(*args: Any) -> torch.Tensor:
        recorded.append(score(*args))
        return recorded[-1]

    policy.image_scores = recording_scores  # type: ignore[method-assign]
    margins: list[list[float]] = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(image_paths), batch_size), desc="margins", unit="batch"):
            requests = [prepare_request(PROMPT, [path], tokenizer, processor, model.config, "llava_v1")
                        for path in image_paths[start:start + batch_size]]
            recorded.clear()
            generate(model, tokenizer, [r.input_ids for r in requests], [r.pixel_values for r in requests],
                     GenerationConfig(max_new_tokens=1), policy)
            margins += recorded[0].tolist()  # the prefill's scores, images in batch order
    return margins, policy.vision_keep_rate


def patch_kinds(scene: Any, n_patches: int) -> list[str]:
    """Per patch (row-major): "target SHAPE", "look-alike SHAPE" or "background"."""
    from ..data.scenes import GRID

    kinds = [BACKGROUND] * n_patches
    for obj in scene.objects:
        kinds[obj.row * GRID + obj.col] = f"{'target' if obj.is_target else 'look-alike'} {obj.shape}"
    return kinds


def margin_table(margins: list[list[float]], kinds: list[list[str]], keep_rate: float) -> dict[str, Any]:
    """Per patch kind: patches, margin mean / min / max, % above 0, % in the image's top k; and the patches
    above 0 per image."""
    from ..model.policy import kept_image_tokens

    values: dict[str, list[float]] = {}
    in_top_k: dict[str, int] = {}
    for image, image_kinds in zip(margins, kinds):
        top = set(sorted(range(len(image)), key=lambda j: -image[j])[:kept_image_tokens(keep_rate, len(image))])
        for j, (margin, kind) in enumerate(zip(image, image_kinds)):
            values.setdefault(kind, []).append(margin)
            in_top_k[kind] = in_top_k.get(kind, 0) + (j in top)
    above = [sum(m > 0 for m in image) for image in margins]
    return {
        "keep_rate": keep_rate, "images": len(margins),
        "above_zero_per_image": {"mean": statistics.mean(above), "min": min(above), "max": max(above)},
        "kinds": {kind: {"patches": len(v), "mean": statistics.mean(v), "min": min(v), "max": max(v),
                         "above_zero": 100 * sum(m > 0 for m in v) / len(v), "in_top_k": 100 * in_top_k[kind] / len(v)}
                  for kind, v in sorted(values.items())},
    }


def format_table(table: dict[str, Any]) -> str:
    above = table["above_zero_per_image"]
    lines = [(f"keep margins of {table['images']} images; top k at keep rate {table['keep_rate']:g}; patches above 0 "
              f"per image: mean {above['mean']:.1f}, min {above['min']}, max {above['max']}"), "",
             "| patch kind | patches | mean margin | min | max | above 0 % | in top k % |", "|---|---|---|---|---|---|---|"]
    for kind, row in table["kinds"].items():
        lines.append(f"| {kind} | {row['patches']} | {row['mean']:+.2f} | {row['min']:+.2f} | {row['max']:+.2f} "
                     f"| {row['above_zero']:.1f} | {row['in_top_k']:.1f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Dynamic-LLaVA checkpoint (a chain's DIR/stage3)")
    parser.add_argument("--data", required=True, help="a `data synth` folder (a chain's DIR/data)")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--scenes", type=int, default=200, help="the split's first N scenes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="also write the table as JSON to this file")


def run(args: argparse.Namespace) -> int:
    from ..data.scenes import scene_from_dict
    from ..eval.io import read_jsonl
    from ..model.checkpoint_files import require_dynamic_llava_checkpoint

    model, data = Path(args.model), Path(args.data)
    require_dynamic_llava_checkpoint(model)
    if not (data / args.split / "scenes.jsonl").is_file():
        raise UserError(f"{data} is not a `data synth` folder (no {args.split}/scenes.jsonl)")
    for flag, value in (("--scenes", args.scenes), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    rows = read_jsonl(data / args.split / "scenes.jsonl")[:args.scenes]
    margins, keep_rate = image_margins(model, [data / "images" / r["image"] for r in rows], args.batch_size)
    kinds = [patch_kinds(scene_from_dict(r), len(m)) for r, m in zip(rows, margins)]
    table = margin_table(margins, kinds, keep_rate)
    print(format_table(table))
    if args.out:
        Path(args.out).write_text(json.dumps({"model": str(model), "split": args.split, **table}, indent=1) + "\n",
                                  encoding="utf-8")
    return 0
