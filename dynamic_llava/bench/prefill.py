"""`dynamic-llava bench prefill`: ours dense vs ours sparse (Dynamic-LLaVA) vs transformers, at real shapes.

Random weights at the real LLaVA-1.5 shape (the speed of a forward pass does not depend on the weight
values), created on the meta device, materialised once and filled from a small seeded random pool:
seconds, not minutes. transformers' `LlavaForConditionalGeneration` is built on the meta device too and
given our very modules and parameters (checked by data_ptr), so both run the same weights in one copy.

Measured side by side in one run: prefill (vision tower + projector + LLM forward to next-token
logits; median over repeats, the three runs interleaved so machine noise hits all alike); greedy
decoding with the KV cache through `model.step` (dense and sparse steps interleaved); the KV-cache
bytes each holds afterwards, checked against the expected entry counts.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration

from ..errors import UserError
from ..model.llava import DynamicLlavaForCausalLM, StepOutput
from ..model.policy import TokenPolicy, kept_image_tokens, make_policy
from .attention_kernels import attention_kernels, describe
from .device import (
    add_device_argument, add_dtype_argument, device_info, peak_memory_bytes, reset_peak_memory, resolve_device,
    resolve_dtype_name, timed,
)
from .flops import exact_prefill_flops, paper_formula_flops
from .flops import schedules as flops_schedules
from .output import write_json
from .random_llava import (
    DENSE, Decoder, Inputs, build_model, build_reference, calibrate_output_predictor, make_inputs, make_policies,
    ours_prefill, reference_prefill,
)
from .shapes import SHAPES, Shape

TRANSFORMERS_CALL = "model(input_ids, pixel_values, attention_mask, use_cache=True, logits_to_keep=1)"


def _time_interleaved(runners: dict[str, Callable[[], Any]], repeats: int, device: torch.device
                      ) -> dict[str, dict[str, list[float]]]:
    """Run each runner `repeats` times, rotating the order each round: seconds on `device`, the kernel
    seconds and minor page faults of the process during the run (fresh large tensors are page-faulted)
    and, on CUDA, the run's peak allocated GPU memory."""
    names = list(runners)
    fields = ["seconds", "kernel_seconds", "page_faults"] + (["peak_memory_bytes"] if device.type == "cuda" else [])
    runs: dict[str, dict[str, list[float]]] = {name: {field: [] for field in fields} for name in names}
    with tqdm(total=repeats * len(names), desc="prefill", unit="run") as bar:
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                reset_peak_memory(device)
                before = resource.getrusage(resource.RUSAGE_SELF)
                _, seconds = timed(device, runners[name])
                after = resource.getrusage(resource.RUSAGE_SELF)
                runs[name]["seconds"].append(seconds)
                runs[name]["kernel_seconds"].append(after.ru_stime - before.ru_stime)
                runs[name]["page_faults"].append(after.ru_minflt - before.ru_minflt)
                if device.type == "cuda":
                    runs[name]["peak_memory_bytes"].append(peak_memory_bytes(device))
                bar.update(1)
    return runs


# ----------------------------------------------------------------------------- accounting and checks
def prefill_flops(shape: Shape, text_tokens: int, image_tokens: int, keep_rate: float) -> dict[str, float]:
    """Exact matmul FLOPs of one sample's prefill, dense and sparse, and the paper's image-only formula."""
    plans = {p.name: p for p in flops_schedules(shape, image_tokens, keep_rate, fastv_k=3, fastv_ratio=0.75)}
    dense, sparse = (exact_prefill_flops(shape, plans[name], text_tokens, image_tokens) for name in ("dense", "sparse"))
    return {"dense": dense, "sparse": sparse, "sparse_over_dense": sparse / dense,
            "paper_formula_dense": paper_formula_flops(shape, plans["dense"], image_tokens),
            "paper_formula_sparse": paper_formula_flops(shape, plans["sparse"], image_tokens)}


def check_parity(seed: int) -> float:
    """Max |logit difference| / max |logit|, ours dense vs transformers, every position, tiny shape, fp32."""
    shape = SHAPES["tiny"]
    model = build_model(shape, torch.float32, seed)
    ref = build_reference(model)
    inputs = make_inputs(2, 40, shape.vision, seed)
    with torch.inference_mode():
        ours = model.forward_full(inputs.prompts, inputs.images, make_policy(model, DENSE)).logits
        theirs = ref(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
                     attention_mask=inputs.attention_mask).logits
    return float((ours - theirs).abs().max() / theirs.abs().max())


def _reference_kv_bytes(out: Any) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers)


# ----------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), required=True,
                        help="real LLaVA-1.5 shapes with random weights, or tiny (seconds; smoke test)")
    add_dtype_argument(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="copies of the prompt and image")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefill runs per model (after a warm-up)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps (0: prefill only)")
    parser.add_argument("--prompt-text-tokens", type=int, default=60, help="text tokens besides the image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here (at the end)")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    args.dtype = resolve_dtype_name(args.dtype, device)
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    _check_arguments(args)
    print(f"bench prefill: {args.shape}, {args.dtype}, batch {args.batch_size}, on {device}, "
          f"{torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    parity = _check_parity_before_timing(args.seed)
    model, ref = _build_models(shape, dtype, args.seed, device)
    inputs = make_inputs(args.batch_size, args.prompt_text_tokens, shape.vision, args.seed, device)
    _check_context_length(model, inputs, args.decode_tokens)
    policies = make_policies(model)
    with torch.inference_mode():
        warm = _warm_up(model, ref, inputs, policies, args.dtype)
        runs = _time_interleaved(_prefill_runners(model, ref, inputs, policies), args.repeats, device)
        decoded = _measure_decode(model, inputs, policies, args.decode_tokens)
    flops = prefill_flops(shape, inputs.text_tokens, inputs.image_tokens, policies["sparse"].vision_keep_rate)
    result = _result(args, device, inputs, runs, warm, decoded, flops, parity)
    _print_summary(result)
    if args.json is not None:
        write_json(args.json, result)
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    for name, low in (("batch_size", 1), ("repeats", 1), ("decode_tokens", 0), ("prompt_text_tokens", 2)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}")


def _check_parity_before_timing(seed: int) -> float:
    """`check_parity`, printed; a RuntimeError (nothing is timed) when ours and transformers disagree."""
    parity = check_parity(seed)
    print(f"parity (tiny shape, fp32, dense, all positions): ours vs transformers max rel |diff| = {parity:.2e}")
    if parity > 1e-4:
        raise RuntimeError("ours dense and transformers disagree: not timing")
    return parity


def _build_models(shape: Shape, dtype: torch.dtype, seed: int, device: torch.device
                  ) -> tuple[DynamicLlavaForCausalLM, LlavaForConditionalGeneration]:
    """Ours with random weights and transformers' LLaVA sharing them, and say so."""
    start = time.perf_counter()
    model = build_model(shape, dtype, seed, device)
    ref = build_reference(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built random weights: {n_params / 1e9:.2f} B parameters, "
          f"{sum(p.nbytes for p in model.parameters()) / 2**30:.1f} GiB, in {time.perf_counter() - start:.1f} s; "
          "transformers reference shares every parameter (data_ptr checked)", flush=True)
    return model, ref


def _check_context_length(model: DynamicLlavaForCausalLM, inputs: Inputs, decode_tokens: int) -> None:
    n_prompt = inputs.text_tokens + inputs.image_tokens
    if n_prompt + decode_tokens > model.config.max_position_embeddings:
        raise UserError(f"{n_prompt} prompt + {decode_tokens} decode tokens exceed the context length")


@dataclass
class _WarmUp:
    """The untimed first prefill of each model: what it leaves in the KV cache, ours vs transformers."""

    kv_bytes: dict[str, int]  # dense, sparse, transformers
    logits_diff: float  # max rel |diff| of the next-token logits, ours dense vs transformers
    argmax_agrees: bool
    image_kept: list[int]  # image tokens the sparse prefill keeps, per sample
    kernels: dict[str, dict[str, int]]  # dense, sparse, transformers: SDPA calls per kernel (bench.attention_kernels)


def _warm_up(model: DynamicLlavaForCausalLM, ref: LlavaForConditionalGeneration, inputs: Inputs,
             policies: dict[str, TokenPolicy], dtype_name: str) -> _WarmUp:
    print(f"warm-up: {inputs.text_tokens} text + {inputs.image_tokens} image tokens x {len(inputs.prompts)}",
          flush=True)
    # One prefill each, its KV cache measured and freed at once (two 7B caches at batch 8 are 5 GB).
    kv_bytes: dict[str, int] = {}
    outs: dict[str, StepOutput] = {}
    kernels: dict[str, dict[str, int]] = {}
    for name, policy in policies.items():
        (_, cache, out), kernels[name] = attention_kernels(lambda: ours_prefill(model, inputs, policy))
        kv_bytes[name], outs[name] = int(cache.bytes_per_sample().sum()), out
        del cache
    ref_out, kernels["transformers"] = attention_kernels(lambda: reference_prefill(ref, inputs))
    kv_bytes["transformers"], theirs = _reference_kv_bytes(ref_out), ref_out.logits[:, -1].float()
    del ref_out
    logits_diff = float((outs["dense"].logits.float() - theirs).abs().max() / theirs.abs().max())
    argmax_agrees = bool((outs["dense"].logits.argmax(-1) == theirs.argmax(-1)).all())
    image_kept = (outs["sparse"].keep.sum(1) - inputs.text_tokens).tolist()
    expected_kept = kept_image_tokens(policies["sparse"].vision_keep_rate, inputs.image_tokens)
    print(f"  next-token logits, ours dense vs transformers ({dtype_name}): max rel |diff| {logits_diff:.2e}, "
          f"argmax {'agrees' if argmax_agrees else 'DIFFERS'}")
    print(f"  sparse keeps {image_kept} of {inputs.image_tokens} image tokens per sample "
          f"(expected {expected_kept})", flush=True)
    return _WarmUp(kv_bytes, logits_diff, argmax_agrees, image_kept, kernels)


def _prefill_runners(model: DynamicLlavaForCausalLM, ref: LlavaForConditionalGeneration, inputs: Inputs,
                     policies: dict[str, TokenPolicy]) -> dict[str, Callable[[], Any]]:
    return {
        "dense": lambda: ours_prefill(model, inputs, policies["dense"]),
        "sparse": lambda: ours_prefill(model, inputs, policies["sparse"]),
        "transformers": lambda: reference_prefill(ref, inputs),
    }


@dataclass
class _Decoded:
    """Greedy decoding with the KV cache, dense and sparse (nothing with --decode-tokens 0)."""

    seconds_per_token: dict[str, float | None]  # median
    reports: dict[str, dict[str, Any]]  # Decoder.kv_report at the end
    output_keep_rule: str
    kernels: dict[str, dict[str, int]]  # one untimed step after the measurement, per model


def _measure_decode(model: DynamicLlavaForCausalLM, inputs: Inputs, policies: dict[str, TokenPolicy],
                    n_tokens: int) -> _Decoded:
    """Calibrate the output-text predictor, then decode `n_tokens`, dense and sparse steps interleaved."""
    if not n_tokens:
        return _Decoded({"dense": None, "sparse": None}, {}, "not used (--decode-tokens 0)", {})
    print("calibrating the output-text predictor ...", flush=True)
    rule = calibrate_output_predictor(model, inputs, n_tokens)
    decoders = {name: Decoder(model, inputs, policy) for name, policy in policies.items()}
    for step in tqdm(range(n_tokens), desc="decode", unit="token"):
        for name in (("dense", "sparse") if step % 2 == 0 else ("sparse", "dense")):
            decoders[name].step()
    sparse_layer = policies["sparse"].sparse_layer
    seconds = {name: statistics.median(d.seconds) for name, d in decoders.items()}
    reports = {name: d.kv_report(sparse_layer) for name, d in decoders.items()}
    return _Decoded(seconds, reports, rule, {name: d.recorded_step() for name, d in decoders.items()})


def _result(args: argparse.Namespace, device: torch.device, inputs: Inputs, runs: dict[str, dict[str, list[float]]],
            warm: _WarmUp, decoded: _Decoded, flops: dict[str, float], parity: float) -> dict[str, Any]:
    """The JSON record (`_print_summary` reads it too)."""
    prefill = {name: statistics.median(run["seconds"]) for name, run in runs.items()}
    decode, reports = decoded.seconds_per_token, decoded.reports
    kv = {name: reports[name]["kv_cache_bytes"] if reports else warm.kv_bytes[name] for name in ("dense", "sparse")}
    return {
        "prefill_seconds": prefill,
        "decode_seconds_per_token": decode,
        "kv_cache_bytes": kv,
        "ratios": {
            "sparse_over_dense_prefill": prefill["sparse"] / prefill["dense"],
            "dense_over_transformers_prefill": prefill["dense"] / prefill["transformers"],
            "sparse_over_dense_decode": decode["sparse"] / decode["dense"] if args.decode_tokens else None,
            "sparse_over_dense_kv_bytes": kv["sparse"] / kv["dense"],
        },
        "shape": args.shape, "dtype": args.dtype, "batch_size": args.batch_size, "repeats": args.repeats,
        "decode_tokens": args.decode_tokens, "prompt_tokens": inputs.text_tokens + inputs.image_tokens,
        "text_tokens": inputs.text_tokens, "image_tokens": inputs.image_tokens, "image_tokens_kept": warm.image_kept,
        **_prefill_run_stats(runs, prefill, device),
        "kv_cache_bytes_after_prefill": warm.kv_bytes,
        "kv_cache": reports,
        "output_keep_rule": decoded.output_keep_rule,
        "attention_kernels": {"prefill": warm.kernels, "decode": decoded.kernels},
        "flops_prefill_per_sample": flops,
        "parity": {"tiny_fp32_all_positions_max_rel_diff": parity,
                   "this_shape_next_token_logits_max_rel_diff": warm.logits_diff,
                   "this_shape_argmax_agrees": warm.argmax_agrees},
        "transformers_call": TRANSFORMERS_CALL + " (lm_head on the last position only, as ours)",
        "weights": "random (seeded); a forward pass's speed does not depend on weight values",
        **_environment(device),
    }


def _prefill_run_stats(runs: dict[str, dict[str, list[float]]], prefill: dict[str, float], device: torch.device
                       ) -> dict[str, Any]:
    """Every timed prefill run, the fastest, the GPU memory peak and the kernel's share of the time."""
    return {
        "prefill_runs": runs,
        "prefill_seconds_min": {name: min(run["seconds"]) for name, run in runs.items()},
        # CUDA only: the largest per-run peak of allocated GPU memory (weights included)
        **({"prefill_peak_memory_bytes": {name: max(run["peak_memory_bytes"]) for name, run in runs.items()}}
           if device.type == "cuda" else {}),
        "prefill_kernel_share": {name: statistics.median(run["kernel_seconds"]) / prefill[name]
                                 for name, run in runs.items()},
    }


def _environment(device: torch.device) -> dict[str, Any]:
    """Where and when the run happened."""
    return {
        "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
        **device_info(device), "transformers": transformers.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _print_summary(r: dict[str, Any]) -> None:
    mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "-"  # noqa: E731
    sec = lambda s: f"{s:.4f}" if s is not None else "-"  # noqa: E731
    prefill, decode, after_prefill = r["prefill_seconds"], r["decode_seconds_per_token"], r["kv_cache_bytes_after_prefill"]
    end = {name: rep["kv_cache_bytes"] for name, rep in r["kv_cache"].items()}
    print(f"\n{r['shape']}, {r['dtype']}, batch {r['batch_size']}: {r['text_tokens']} text + {r['image_tokens']} "
          f"image tokens, median of {r['repeats']} prefill runs, {r['decode_tokens']} decode steps")
    print(f"{'':20}{'prefill s':>11}{'x ours dense':>14}{'decode s/tok':>14}{'KV MiB prefill':>16}"
          f"{'KV MiB end':>12}")
    for name, label in (("dense", "ours dense"), ("sparse", "ours sparse"), ("transformers", "transformers dense")):
        print(f"{label:20}{prefill[name]:>11.3f}{prefill[name] / prefill['dense']:>14.3f}"
              f"{sec(decode.get(name)):>14}{mib(after_prefill[name]):>16}{mib(end.get(name)):>12}")
    ratios, flops = r["ratios"], r["flops_prefill_per_sample"]
    print(f"sparse / dense prefill: {ratios['sparse_over_dense_prefill']:.3f} "
          f"(exact-FLOPs ideal {flops['sparse_over_dense']:.3f}: {flops['sparse'] / 1e12:.3g} vs "
          f"{flops['dense'] / 1e12:.3g} TFLOPs per sample; paper formula, image tokens only: "
          f"{flops['paper_formula_sparse'] / 1e12:.3g} vs {flops['paper_formula_dense'] / 1e12:.3g})")
    print(f"ours dense / transformers dense prefill: {ratios['dense_over_transformers_prefill']:.3f} "
          f"(transformers called as {TRANSFORMERS_CALL})")
    low = r["prefill_seconds_min"]
    print(f"same ratios from the fastest run of each: sparse / dense {low['sparse'] / low['dense']:.3f}, "
          f"ours dense / transformers {low['dense'] / low['transformers']:.3f}")
    share = r["prefill_kernel_share"]
    print("kernel CPU time / wall time per prefill (mostly page faults on fresh large tensors): "
          + ", ".join(f"{name} {value:.0%}" for name, value in share.items()))
    if max(share.values()) > 0.1:
        print("  (glibc returns large freed blocks to the OS, so every forward faults them in again; "
              "see docs/BENCHMARKS.md for GLIBC_TUNABLES that keep them)")
    seconds = [run["seconds"] for run in r["prefill_runs"].values()]
    if any(max(v) > 1.5 * min(v) for v in seconds):
        print("WARNING: a model's prefill times vary by more than 1.5x between runs: the machine is busy "
              "(other processes share the cores); these ratios are unreliable")
    if r["kv_cache"]:
        dense, sparse = r["kv_cache"]["dense"], r["kv_cache"]["sparse"]
        print(f"sparse / dense decode per token: {ratios['sparse_over_dense_decode']:.3f}; "
              f"KV bytes: {ratios['sparse_over_dense_kv_bytes']:.3f}")
        print(f"layers >= sparse_layer hold per sample: dense {dense['entries_per_sparse_layer']} entries, sparse "
              f"{sparse['entries_per_sparse_layer']} = {r['text_tokens']} text + {r['image_tokens_kept']} image + "
              f"{sparse['output_tokens_kept']} of {r['decode_tokens']} output tokens kept "
              f"(entry check: {'OK' if dense['entries_check'] and sparse['entries_check'] else 'FAILED'}); "
              f"{mib(sparse['kv_cache_bytes_sparse_layers'])} vs {mib(dense['kv_cache_bytes_sparse_layers'])} MiB")
    print(f"output keep rule: {r['output_keep_rule']}")
    for phase, kernels in r["attention_kernels"].items():
        print(f"SDPA kernels, {phase}: " + "; ".join(f"{name} {describe(k)}" for name, k in kernels.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.bench.prefill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
