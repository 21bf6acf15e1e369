"""`dynamic-llava bench decode`: decoding cost as the output grows, dense vs Dynamic-LLaVA, side by side.

With the KV cache: per-token latency and KV-cache bytes at each output length (e.g. 1K / 2K / 4K tokens).
Without the cache: total time to generate 256 / 512 / 1K tokens by recomputing the sequence each step.
Random weights at the real shapes (see `bench prefill`); the untrained output-text predictor is
calibrated to keep about half of the generated tokens, and the output says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from ..errors import UserError
from ..generation import append_token
from ..model.llava import DynamicLlavaForCausalLM
from ..model.policy import DensePolicy, TokenPolicy
from .output import write_json
from .prefill import Decoder, Inputs, build_model, calibrate_output_predictor, make_inputs
from .shapes import SHAPES


def _lengths(text: str) -> list[int]:
    if not text:
        return []
    try:
        values = sorted({int(x) for x in text.split(",") if x})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if values[0] < 1:
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), required=True)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lengths", type=_lengths, default=[1024, 2048, 4096],
                        help="output lengths at which the cached decode is measured")
    parser.add_argument("--no-cache-lengths", type=_lengths, default=[256, 512, 1024],
                        help="output lengths generated without the KV cache (empty: skip)")
    parser.add_argument("--window", type=int, default=16, help="steps whose median gives the per-token latency")
    parser.add_argument("--prompt-text-tokens", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here (at the end)")
    parser.add_argument("--plot", default=None, help="PNG of KV bytes and per-token latency vs output length")


@torch.inference_mode()
def cached_decode(model: DynamicLlavaForCausalLM, inputs: Inputs, policy: TokenPolicy, lengths: list[int],
                  window: int) -> list[dict[str, Any]]:
    """Greedy decode to max(lengths) with the cache; at each length: latency (median of the last
    `window` steps) and the KV bytes held (and allocated)."""
    decoder = Decoder(model, inputs, policy)
    points = []
    for step in range(1, max(lengths) + 1):
        decoder.step()
        if step in lengths:
            report = decoder.kv_report(model.sparse_layer)
            points.append({"output_tokens": step,
                           "seconds_per_token": statistics.median(decoder.seconds[-window:]),
                           "kv_cache_bytes": report["kv_cache_bytes"],
                           "kv_cache_allocated_bytes": report["kv_cache_allocated_bytes"],
                           "output_tokens_kept": report["output_tokens_kept"],
                           "entries_check": report["entries_check"]})
    return points


@torch.inference_mode()
def uncached_decode_seconds(model: DynamicLlavaForCausalLM, inputs: Inputs, policy: TokenPolicy,
                            lengths: list[int]) -> dict[int, float]:
    """Seconds to generate each of `lengths` tokens greedily, recomputing the whole sequence per token."""
    start = time.perf_counter()
    batch = model.embed(inputs.prompts, inputs.images)
    out = model.step(batch, model.new_cache(len(inputs.prompts)), policy)
    positions = batch.lengths.clone()
    times = {}
    for step in range(1, max(lengths) + 1):
        tokens = out.logits.argmax(-1)
        if step in lengths:
            times[step] = time.perf_counter() - start
        if step == max(lengths):
            break
        batch = append_token(batch, model.model.embed_tokens(tokens[:, None]), positions)
        out = model.step(batch, model.new_cache(len(inputs.prompts)), policy)
        positions = positions + 1
    return times


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.window < 1 or not args.lengths:
        raise UserError("--batch-size and --window must be >= 1, and --lengths not empty")
    plot = None
    if args.plot:
        try:
            import matplotlib
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install matplotlib") from None
        matplotlib.use("Agg")
        plot = args.plot
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    model = build_model(shape, dtype, args.seed)
    inputs = make_inputs(args.batch_size, args.prompt_text_tokens, shape.vision, args.seed)
    rule = calibrate_output_predictor(model, inputs, n_tokens=32)
    policies = {"dense": DensePolicy(), "sparse": model.default_policy()}
    result: dict[str, Any] = {"shape": args.shape, "dtype": args.dtype, "batch_size": args.batch_size,
                              "prompt_tokens": args.prompt_text_tokens + inputs.image_tokens,
                              "output_keep_rule": rule, "with_cache": {}, "without_cache_seconds": {}}
    for name, policy in policies.items():
        print(f"{name}: cached decode to {max(args.lengths)} tokens ...", flush=True)
        result["with_cache"][name] = cached_decode(model, inputs, policy, args.lengths, args.window)
    if args.no_cache_lengths:
        for name, policy in policies.items():
            print(f"{name}: decode without cache to {max(args.no_cache_lengths)} tokens ...", flush=True)
            result["without_cache_seconds"][name] = uncached_decode_seconds(model, inputs, policy,
                                                                            args.no_cache_lengths)
    _print_table(result)
    if plot:
        _plot(result, plot)
    if args.json:
        write_json(args.json, result)
    return 0


def _print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['shape']}, {result['dtype']}, batch {result['batch_size']}, "
          f"prompt {result['prompt_tokens']} tokens; {result['output_keep_rule']}")
    print(f"{'with KV cache':>14}{'dense s/tok':>13}{'sparse s/tok':>14}{'dense KV MiB':>14}{'sparse KV MiB':>15}"
          f"{'KV ratio':>10}")
    for dense, sparse in zip(result["with_cache"]["dense"], result["with_cache"]["sparse"]):
        ratio = sparse["kv_cache_bytes"] / dense["kv_cache_bytes"]
        print(f"{dense['output_tokens']:>14}{dense['seconds_per_token']:>13.4f}{sparse['seconds_per_token']:>14.4f}"
              f"{dense['kv_cache_bytes'] / 2**20:>14.1f}{sparse['kv_cache_bytes'] / 2**20:>15.1f}{ratio:>10.3f}")
    if result["without_cache_seconds"]:
        dense, sparse = result["without_cache_seconds"]["dense"], result["without_cache_seconds"]["sparse"]
        print(f"{'without cache':>14}{'dense s':>13}{'sparse s':>14}{'ratio':>14}")
        for length in dense:
            print(f"{length:>14}{dense[length]:>13.2f}{sparse[length]:>14.2f}{sparse[length] / dense[length]:>14.3f}")


def _plot(result: dict[str, Any], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, (kv_axis, latency_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in result["with_cache"].items():
        lengths = [p["output_tokens"] for p in points]
        kv_axis.plot(lengths, [p["kv_cache_bytes"] / 2**20 for p in points], marker="o", label=name)
        latency_axis.plot(lengths, [p["seconds_per_token"] * 1000 for p in points], marker="o", label=name)
    kv_axis.set(xlabel="output tokens", ylabel="KV cache (MiB)", title="KV-cache bytes")
    latency_axis.set(xlabel="output tokens", ylabel="ms per token", title="decode latency (KV cache)")
    for axis in (kv_axis, latency_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.suptitle(f"{result['shape']} {result['dtype']} batch {result['batch_size']}")
    fig.tight_layout()
    partial = f"{path}.partial.png"
    fig.savefig(partial)
    plt.close(fig)
    os.replace(partial, path)
    print(f"wrote {path}")
