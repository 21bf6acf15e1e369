"""Prefill FLOPs: the paper's formula and an exact per-operation count, dense vs token-dropping policies.

The paper (SPEC 3) counts, per decoder layer, `32 N C^2 + 4 N^2 C` for the N image tokens only. The
exact count adds everything a prefill multiplies: CLIP tower, projector, every LLM layer on the tokens
it actually sees (text included; grouped K/V heads; gated FFN; causal attention scores and values),
the image predictor where the policy uses it, and the LM head on the last token. Multiply-adds count
as 2 FLOPs. `dynamic-llava bench flops` prints both.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..model.config import SparseConfig
from .output import write_json
from .shapes import SHAPES, VOCAB, Shape

TERA = 1e12


@dataclass(frozen=True)
class Schedule:
    """How many image tokens each decoder layer sees (layers before `from_layer` see all of them)."""

    name: str
    from_layer: int
    kept_image_tokens: int
    uses_image_predictor: bool = False


def paper_layer_flops(n: int, c: int) -> float:
    """SPEC 3: one decoder layer on n image tokens of width c (batch 1)."""
    return 32 * n * c * c + 4 * n * n * c


def schedules(shape: Shape, image_tokens: int, vision_keep_rate: float, fastv_k: int, fastv_ratio: float
              ) -> list[Schedule]:
    sparse = SparseConfig.from_dict(shape.sparse)
    return [
        Schedule("dense", 0, image_tokens),
        Schedule("sparse", sparse.sparse_layer, math.floor(vision_keep_rate * image_tokens + 1e-6), True),
        Schedule("fastv", fastv_k, image_tokens - math.floor(fastv_ratio * image_tokens + 1e-6)),
    ]


def paper_formula_flops(shape: Shape, schedule: Schedule, image_tokens: int) -> float:
    c, layers = shape.llm["hidden_size"], shape.llm["num_hidden_layers"]
    return (schedule.from_layer * paper_layer_flops(image_tokens, c)
            + (layers - schedule.from_layer) * paper_layer_flops(schedule.kept_image_tokens, c))


def _decoder_layer_flops(shape: Shape, n: int, causal: bool) -> float:
    llm = shape.llm
    c, f = llm["hidden_size"], llm["intermediate_size"]
    heads = llm["num_attention_heads"]
    kv = llm.get("num_key_value_heads", heads) * (c // heads)
    projections = 2 * n * (2 * c * c + 2 * c * kv + 3 * c * f)  # q, o; k, v; gate, up, down
    pairs = n * (n + 1) / 2 if causal else n * n
    return projections + 2 * 2 * c * pairs  # scores and weighted values


def _vision_flops(shape: Shape, image_tokens: int, causal: bool) -> float:
    v = shape.vision
    cv, n = v["hidden_size"], image_tokens + 1  # + CLS
    per_layer = 2 * n * (4 * cv * cv + 2 * cv * v["intermediate_size"]) + 2 * 2 * cv * n * n
    patch_embedding = 2 * image_tokens * 3 * v["patch_size"] ** 2 * cv
    return v["num_hidden_layers"] * per_layer + patch_embedding


def _image_predictor_flops(shape: Shape, n: int) -> float:
    sparse = SparseConfig.from_dict(shape.sparse)
    c, d, ff = shape.llm["hidden_size"], sparse.d_model, sparse.dim_feedforward
    blocks = sparse.num_layers * (2 * n * (3 * d * d + d * d + 2 * d * ff) + 2 * 2 * d * n * n)
    head = 2 * n * (d * d // 2 + (d // 2) * (d // 4) + (d // 4) * 2)
    return 2 * n * c * d + blocks + head


def exact_prefill_flops(shape: Shape, schedule: Schedule, text_tokens: int, image_tokens: int,
                        causal: bool = True, vocab: int = VOCAB) -> float:
    """Every matmul of one sample's prefill (one image). `causal=False` counts full attention squares,
    as operator-level counters do for fused attention kernels."""
    c, layers = shape.llm["hidden_size"], shape.llm["num_hidden_layers"]
    mm_hidden = shape.vision["hidden_size"]
    full = text_tokens + image_tokens
    reduced = text_tokens + schedule.kept_image_tokens
    total = _vision_flops(shape, image_tokens, causal) + 2 * image_tokens * (mm_hidden * c + c * c)
    total += schedule.from_layer * _decoder_layer_flops(shape, full, causal)
    total += (layers - schedule.from_layer) * _decoder_layer_flops(shape, reduced, causal)
    if schedule.uses_image_predictor:
        total += _image_predictor_flops(shape, image_tokens)
    return total + 2 * c * vocab  # LM head, last token


def shape_from_configs(model_config: Any, tower_config: Any) -> Shape:
    """The `Shape` of a loaded checkpoint: its LLaMA config (with `sparse_config`) and CLIP vision config."""
    llm = {k: getattr(model_config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                 "num_attention_heads")}
    llm["num_key_value_heads"] = getattr(model_config, "num_key_value_heads", None) or llm["num_attention_heads"]
    vision = {k: getattr(tower_config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                    "num_attention_heads", "image_size", "patch_size")}
    sparse = SparseConfig.from_dict(getattr(model_config, "sparse_config", None))
    return Shape(llm, vision, {"d_model": sparse.d_model, "nhead": sparse.nhead,
                               "dim_feedforward": sparse.dim_feedforward, "num_layers": sparse.num_layers})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), required=True)
    parser.add_argument("--text-tokens", type=int, default=60, help="prompt text tokens besides the image")
    parser.add_argument("--image-tokens", type=int, default=576)
    parser.add_argument("--vision-keep-rate", type=float, default=0.2)
    parser.add_argument("--fastv-k", type=int, default=3, help="FastV: layer after which image tokens drop")
    parser.add_argument("--fastv-ratio", type=float, default=0.75, help="FastV: fraction of image tokens dropped")
    parser.add_argument("--json", default=None, help="write the figures to this file")


def compute(args: argparse.Namespace) -> dict:
    if not 0 < args.vision_keep_rate <= 1 or not 0 <= args.fastv_ratio < 1:
        raise UserError("--vision-keep-rate must be in (0, 1] and --fastv-ratio in [0, 1)")
    shape = SHAPES[args.shape]
    plans = schedules(shape, args.image_tokens, args.vision_keep_rate, args.fastv_k, args.fastv_ratio)
    paper = {p.name: paper_formula_flops(shape, p, args.image_tokens) / TERA for p in plans}
    exact = {p.name: exact_prefill_flops(shape, p, args.text_tokens, args.image_tokens) / TERA for p in plans}
    return {
        "shape": args.shape,
        "text_tokens": args.text_tokens,
        "image_tokens": args.image_tokens,
        "kept_image_tokens": {p.name: p.kept_image_tokens for p in plans},
        "paper_formula_tflops": paper,
        "exact_tflops": exact,
        "notes": "paper formula: sum over layers of 32 N C^2 + 4 N^2 C, image tokens only (SPEC 3); exact: every "
                 "matmul of the prefill incl. CLIP tower, projector, text tokens, causal attention, image "
                 "predictor (sparse) and LM head on the last token; batch 1",
    }


def run(args: argparse.Namespace) -> int:
    result = compute(args)
    print(f"prefill TFLOPs, {args.shape}, {args.text_tokens} text + {args.image_tokens} image tokens, batch 1")
    print(f"{'':10}{'kept img':>10}{'paper':>10}{'exact':>10}{'exact/dense':>13}")
    for name in ("dense", "sparse", "fastv"):
        exact = result["exact_tflops"][name]
        print(f"{name:10}{result['kept_image_tokens'][name]:>10}{result['paper_formula_tflops'][name]:>10.2f}"
              f"{exact:>10.2f}{exact / result['exact_tflops']['dense']:>13.3f}")
    if args.json:
        write_json(args.json, result)
    return 0
