"""`dynamic-llava bench decode`: decoding cost as the output grows, dense vs Dynamic-LLaVA, side by side.

With the KV cache: per-token latency and KV-cache bytes at each output length (e.g. 1K / 2K / 4K tokens).
A decode step's cost depends on how many entries each layer's cache holds, not on their values, so each
length is measured on a cache filled to what that many generated tokens leave (all of them in layers
< sparse_layer; the measured kept fraction in later layers for Dynamic-LLaVA) followed by `--window`
real timed steps. A real greedy decode to `--check-length` tokens is timed too and compared with the
filled cache at the same length: the check that filling measures what decoding costs.

Without the cache every step is a forward over the whole sequence; the total time for N tokens is the
sum of those steps. The step is timed at `--no-cache-points` output lengths spread over [0, N) and the
sum taken over the piecewise-linear interpolation; a real uncached decode of `--no-cache-check` tokens
checks the estimate.

Random weights at the real shapes (see `bench prefill`). Batch B is B copies of one sample (prefilled
once, then replicated). The untrained output-text predictor is calibrated to keep about half of the
generated tokens, and the output says so. A length whose cache would not fit in the RAM available is
reported as such instead of being run.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MissingExtra, UserError
from ..generation import append_token
from ..model.batch import OUTPUT, TokenBatch
from ..model.llava import DynamicLlavaForCausalLM
from ..model.policy import TokenPolicy
from .attention_kernels import describe
from .device import (
    add_device_argument, add_dtype_argument, device_info, peak_memory_bytes, reset_peak_memory, resolve_device,
    resolve_dtype_name, timed,
)
from .output import write_json
from .random_llava import Decoder, Inputs, build_model, calibrate_output_predictor, make_inputs, make_policies
from .shapes import SHAPES

_ACTIVATION_MARGIN = 1 << 30  # bytes left for one decode step's activations when judging what fits
METHOD = {
    "with_cache": "prefill, 1 real step, cache filled to length - 1 - window generated tokens (all in layers < "
                  "sparse_layer, the measured kept fraction in later ones; random K/V, true positions), then "
                  "`window` real timed steps (median); checked against a real decode at check_length",
    "without_cache": "vision tower once + one full-sequence step timed at each point, summed over t = 0..N-1 "
                     "with linear interpolation between points; checked against a real uncached decode",
}


def _lengths(text: str) -> list[int]:
    if not text:
        return []
    try:
        values = sorted({int(x) for x in text.split(",") if x})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if values and values[0] < 1:  # "," alone: no lengths, as ""
        raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(SHAPES), required=True)
    add_dtype_argument(parser)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--lengths", type=_lengths, default=[1024, 2048, 4096],
                        help="output lengths at which the cached decode is measured")
    parser.add_argument("--check-length", type=int, default=128,
                        help="real greedy decode to this many tokens, compared with the filled cache (0: skip)")
    parser.add_argument("--no-cache-lengths", type=_lengths, default=[256, 512, 1024],
                        help="output lengths whose total time without the KV cache is measured (empty: skip)")
    parser.add_argument("--no-cache-points", type=int, default=5,
                        help="output lengths at which one uncached step is timed (>= 2)")
    parser.add_argument("--no-cache-check", type=int, default=8,
                        help="real uncached decode of this many tokens, compared with the estimate (0: skip)")
    parser.add_argument("--window", type=int, default=16, help="steps whose median gives the per-token latency")
    parser.add_argument("--prompt-text-tokens", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here (at the end)")
    parser.add_argument("--plot", default=None, help="PNG of KV bytes and per-token latency vs output length")
    add_device_argument(parser)


def available_memory(device: torch.device = torch.device("cpu")) -> int:
    """Bytes that could be allocated now: free GPU memory on CUDA, else what the kernel could hand out
    (MemAvailable: free plus reclaimable page cache)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_bytes_needed(model: DynamicLlavaForCausalLM, sparse_layer: int, batch_size: int, prompt_tokens: int,
                       prompt_kept: int, output_tokens: int, output_kept: int) -> int:
    """KV bytes held after `output_tokens` generated tokens (`output_kept` of them in the layers >= sparse_layer)."""
    config = model.config
    per_entry = 2 * config.num_key_value_heads * config.head_dim * model.dtype.itemsize
    layers = config.num_hidden_layers
    entries = sparse_layer * (prompt_tokens + output_tokens) + (layers - sparse_layer) * (prompt_kept + output_kept)
    return batch_size * entries * per_entry


@torch.inference_mode()
def real_decode(model: DynamicLlavaForCausalLM, inputs: Inputs, policy: TokenPolicy, length: int, batch_size: int,
                window: int) -> dict[str, Any]:
    """Greedy decode of `length` tokens with the cache: latency (median of the last `window` steps), KV bytes
    and the kept fraction of generated tokens."""
    device = model.lm_head.weight.device
    reset_peak_memory(device)
    decoder = Decoder(model, inputs, policy)
    decoder.replicate(batch_size)
    for _ in range(length):
        decoder.step()
    report = decoder.kv_report(policy.sparse_layer)
    kept = decoder.outputs_kept.float().mean().item()
    point = {"output_tokens": length, "seconds_per_token": statistics.median(decoder.seconds[-window:]),
             "kv_cache_bytes": report["kv_cache_bytes"], "output_tokens_kept": round(kept),
             "output_keep_fraction": kept / length, "entries_check": report["entries_check"],
             **_peak(device)}
    return {**point, "attention_kernels": decoder.recorded_step()}


@torch.inference_mode()
def filled_decode(model: DynamicLlavaForCausalLM, inputs: Inputs, policy: TokenPolicy, length: int,
                  keep_fraction: float, batch_size: int, window: int, seed: int) -> dict[str, Any]:
    """Latency and KV bytes at `length` generated tokens: prefill, fill the cache to that length (one
    warm-up step first), then `window` timed steps."""
    device = model.lm_head.weight.device
    reset_peak_memory(device)
    decoder = Decoder(model, inputs, policy)
    decoder.replicate(batch_size)
    decoder.step()
    filled = length - 1 - window
    decoder.fill(filled, round(keep_fraction * filled), policy.sparse_layer, seed)
    decoder.seconds.clear()
    for _ in range(window):
        decoder.step()
    report = decoder.kv_report(policy.sparse_layer)
    point = {"output_tokens": decoder.fed, "seconds_per_token": statistics.median(decoder.seconds),
             "kv_cache_bytes": report["kv_cache_bytes"],
             "kv_cache_allocated_bytes": report["kv_cache_allocated_bytes"],
             "output_tokens_kept": report["output_tokens_kept"][0], "entries_check": report["entries_check"],
             **_peak(device)}
    return {**point, "attention_kernels": decoder.recorded_step()}


def _peak(device: torch.device) -> dict[str, int]:
    """The measurement's peak allocated GPU memory (weights included), on CUDA only."""
    peak = peak_memory_bytes(device)
    return {} if peak is None else {"peak_memory_bytes": peak}


def with_generated(model: DynamicLlavaForCausalLM, batch: TokenBatch, n_generated: int, seed: int) -> TokenBatch:
    """The prompt batch (equal-length samples) followed by `n_generated` random generated tokens."""
    if n_generated == 0:
        return batch
    b = len(batch.lengths)
    if not bool((batch.lengths == batch.embeds.shape[1]).all()):
        raise ValueError("with_generated needs unpadded, equal-length prompts")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (b, n_generated), generator=generator).to(batch.embeds.device)
    positions = batch.lengths[:, None] + torch.arange(n_generated, device=ids.device)[None, :]
    return TokenBatch(embeds=torch.cat([batch.embeds, model.model.embed_tokens(ids)], dim=1),
                      positions=torch.cat([batch.positions, positions], dim=1),
                      lengths=batch.lengths + n_generated,
                      kinds=torch.cat([batch.kinds, torch.full_like(ids, OUTPUT)], dim=1),
                      image_ids=torch.cat([batch.image_ids, torch.full_like(ids, -1)], dim=1))


@torch.inference_mode()
def uncached_step_seconds(model: DynamicLlavaForCausalLM, inputs: Inputs, policy: TokenPolicy,
                          points: list[int], seed: int) -> dict[int | str, float]:
    """Seconds of one uncached decoding step (the whole sequence on a fresh cache) after t generated
    tokens, for each t in `points`, and of the vision tower + embedding ("embed"), which runs once."""
    device = model.lm_head.weight.device
    model.embed(inputs.prompts, inputs.images)  # warm-up
    prompt, embed_seconds = timed(device, lambda: model.embed(inputs.prompts, inputs.images))
    seconds: dict[int | str, float] = {"embed": embed_seconds}
    model.step(with_generated(model, prompt, points[0], seed), model.new_cache(len(inputs.prompts)), policy)  # warm-up
    for t in points:
        batch = with_generated(model, prompt, t, seed)
        seconds[t] = timed(device, lambda: model.step(batch, model.new_cache(len(inputs.prompts)), policy))[1]
    return seconds


def total_from_steps(step_seconds: dict[int | str, float], n_tokens: int) -> float:
    """The embedding plus the step times for t = 0 .. n_tokens - 1, steps between measured points
    interpolated linearly."""
    known = sorted((t, s) for t, s in step_seconds.items() if t != "embed")
    total = step_seconds["embed"]
    for t in range(n_tokens):
        for (t0, s0), (t1, s1) in zip(known, known[1:]):
            if t0 <= t <= t1:
                total += s0 + (s1 - s0) * (t - t0) / (t1 - t0)
                break
        else:
            raise ValueError(f"step {t} is outside the measured points {[p for p, _ in known]}")
    return total


@torch.inference_mode()
def uncached_decode_seconds(model: DynamicLlavaForCausalLM, inputs: Inputs, policy: TokenPolicy,
                            n_tokens: int) -> float:
    """Seconds to generate `n_tokens` greedily, recomputing the whole sequence per token (a real run)."""
    def decode() -> None:
        batch = model.embed(inputs.prompts, inputs.images)
        out = model.step(batch, model.new_cache(len(inputs.prompts)), policy)
        positions = batch.lengths.clone()
        for _ in range(n_tokens - 1):
            tokens = out.logits.argmax(-1)
            batch = append_token(batch, model.model.embed_tokens(tokens[:, None]), positions)
            out = model.step(batch, model.new_cache(len(inputs.prompts)), policy)
            positions = positions + 1

    return timed(model.lm_head.weight.device, decode)[1]


def _check_arguments(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.window < 1 or not args.lengths:
        raise UserError("--batch-size and --window must be >= 1, and --lengths not empty")
    if args.check_length < 0 or args.no_cache_check < 0:
        raise UserError("--check-length and --no-cache-check must be >= 0")
    if args.lengths[0] < args.window + 2:
        raise UserError(f"every --lengths value must be >= --window + 2 = {args.window + 2}")
    if 0 < args.check_length < args.window + 2:
        raise UserError(f"--check-length must be 0 or >= --window + 2 = {args.window + 2}")
    if args.no_cache_lengths and args.no_cache_points < 2:
        raise UserError("--no-cache-points must be >= 2")
    if args.no_cache_lengths and args.no_cache_check > max(args.no_cache_lengths):
        raise UserError("--no-cache-check must not exceed the largest --no-cache-lengths value")


def _require_matplotlib() -> None:
    """--plot: refuse before any work when matplotlib is missing; draw off-screen."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra("matplotlib", needed_by="--plot") from None
    matplotlib.use("Agg")


@dataclass
class _Bench:
    """What every measurement of one run uses."""

    args: argparse.Namespace
    device: torch.device
    model: DynamicLlavaForCausalLM
    inputs: Inputs  # one sample: prefilled once, then replicated to --batch-size
    batch_inputs: Inputs  # --batch-size samples: the uncached steps
    output_keep_rule: str
    policies: dict[str, TokenPolicy]
    prompt_kept: dict[str, int]  # prompt tokens each policy keeps in the layers >= sparse_layer

    @property
    def prompt_tokens(self) -> int:
        return self.args.prompt_text_tokens + self.inputs.image_tokens


def _set_up(args: argparse.Namespace, device: torch.device) -> _Bench:
    """The random-weight model with its output-text predictor calibrated, the inputs and the two policies."""
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    model = build_model(shape, dtype, args.seed, device)
    inputs = make_inputs(1, args.prompt_text_tokens, shape.vision, args.seed, device)
    batch_inputs = make_inputs(args.batch_size, args.prompt_text_tokens, shape.vision, args.seed, device)
    rule = calibrate_output_predictor(model, inputs, n_tokens=32)
    policies = make_policies(model)
    with torch.inference_mode():
        prompt_kept = {name: int(model.step(model.embed(inputs.prompts, inputs.images), model.new_cache(1),
                                            policy).keep.sum()) for name, policy in policies.items()}
    return _Bench(args, device, model, inputs, batch_inputs, rule, policies, prompt_kept)


def _run_record(bench: _Bench) -> dict[str, Any]:
    """The JSON's opening: what was run, where, and how it is measured."""
    args = bench.args
    return {
        "shape": args.shape, "dtype": args.dtype, "batch_size": args.batch_size, "prompt_tokens": bench.prompt_tokens,
        "prompt_tokens_kept": bench.prompt_kept, "threads": torch.get_num_threads(),
        "weights_bytes": sum(p.numel() * p.element_size() for p in bench.model.parameters()),
        **device_info(bench.device),
        "load_average_1min_start": os.getloadavg()[0],
        "output_keep_rule": bench.output_keep_rule, "method": METHOD}


def _check_filling(bench: _Bench) -> tuple[dict[str, Any], dict[str, float]]:
    """With --check-length: a real decode and the filled cache at that length, per policy; and the kept
    fraction of generated tokens each policy really has (else 1 dense, 0.5 sparse: the calibration's aim)."""
    args = bench.args
    check: dict[str, Any] = {}
    keep_fraction = {"dense": 1.0, "sparse": 0.5}
    if not args.check_length:
        return check, keep_fraction
    for name, policy in bench.policies.items():
        print(f"{name}: real decode of {args.check_length} tokens ...", flush=True)
        real = real_decode(bench.model, bench.inputs, policy, args.check_length, args.batch_size, args.window)
        keep_fraction[name] = real["output_keep_fraction"]
        filled = filled_decode(bench.model, bench.inputs, policy, args.check_length, keep_fraction[name],
                               args.batch_size, args.window, args.seed)
        check[name] = {"real": real, "filled": filled,
                       "filled_over_real": filled["seconds_per_token"] / real["seconds_per_token"]}
    return check, keep_fraction


def _with_cache(bench: _Bench, keep_fraction: dict[str, float]) -> dict[str, list[dict[str, Any]]]:
    """Per policy, the cached decode at each of --lengths (the policies alternate at each length)."""
    points: dict[str, list[dict[str, Any]]] = {}
    for length in bench.args.lengths:
        for name in bench.policies:
            points.setdefault(name, []).append(_cached_point(bench, name, length, keep_fraction[name]))
    return points


def _cached_point(bench: _Bench, name: str, length: int, keep_fraction: float) -> dict[str, Any]:
    """`filled_decode` at `length` output tokens, or, when its KV cache would not fit, what it would need."""
    args, policy = bench.args, bench.policies[name]
    gc.collect()
    kept = round(keep_fraction * length)
    need = cache_bytes_needed(bench.model, policy.sparse_layer, args.batch_size, bench.prompt_tokens,
                              bench.prompt_kept[name], length, kept)
    free = available_memory(bench.device)
    point: dict[str, Any] = {"output_tokens": length, "kv_cache_bytes_needed": need}
    if need * 1.25 + _ACTIVATION_MARGIN > free:  # the cache grows by up to 25 % at a time
        point.update(fits=False, available_bytes=free)
        print(f"{name}: {length} tokens: the KV cache needs {need / 2**30:.1f} GiB, "
              f"{free / 2**30:.1f} GiB available: not run", flush=True)
    else:
        print(f"{name}: decode at {length} output tokens ...", flush=True)
        point.update(fits=True, **filled_decode(bench.model, bench.inputs, policy, length, keep_fraction,
                                                args.batch_size, args.window, args.seed))
    return point


def _without_cache(bench: _Bench) -> dict[str, dict[str, Any]]:
    """Per policy, uncached steps timed at --no-cache-points lengths, the totals estimated from them for each of
    --no-cache-lengths and, with --no-cache-check, checked against a real uncached decode."""
    args = bench.args
    if not args.no_cache_lengths:
        return {}
    longest = max(args.no_cache_lengths)
    points = sorted({round(i * (longest - 1) / (args.no_cache_points - 1)) for i in range(args.no_cache_points)})
    result: dict[str, dict[str, Any]] = {}
    for name, policy in bench.policies.items():
        print(f"{name}: uncached steps at {points} output tokens ...", flush=True)
        steps = uncached_step_seconds(bench.model, bench.batch_inputs, policy, points, args.seed)
        entry: dict[str, Any] = {"step_seconds": steps,
                                 "total_seconds": {n: total_from_steps(steps, n) for n in args.no_cache_lengths}}
        if args.no_cache_check:
            print(f"{name}: real uncached decode of {args.no_cache_check} tokens ...", flush=True)
            real = uncached_decode_seconds(bench.model, bench.batch_inputs, policy, args.no_cache_check)
            estimate = total_from_steps(steps, args.no_cache_check)
            entry["check"] = {"output_tokens": args.no_cache_check, "real_seconds": real,
                              "estimated_seconds": estimate, "estimate_over_real": estimate / real}
        result[name] = entry
    return result


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    device = resolve_device(args.device)
    if args.plot:
        _require_matplotlib()
    args.dtype = resolve_dtype_name(args.dtype, device)
    bench = _set_up(args, device)
    result = _run_record(bench)
    result["check"], keep_fraction = _check_filling(bench)
    result["with_cache"] = _with_cache(bench, keep_fraction)
    result["without_cache"] = _without_cache(bench)
    result["output_keep_fraction"] = keep_fraction
    result["load_average_1min_end"] = os.getloadavg()[0]  # other jobs on the machine inflate absolute times
    _print_tables(result)
    if args.plot:
        _plot(result, args.plot)
    if args.json:
        write_json(args.json, result)
    return 0


def _kv_bytes(point: dict[str, Any]) -> int:
    return point["kv_cache_bytes"] if point["fits"] else point["kv_cache_bytes_needed"]


def _print_tables(result: dict[str, Any]) -> None:
    print(f"\n{result['shape']}, {result['dtype']}, batch {result['batch_size']}, prompt {result['prompt_tokens']} "
          f"tokens ({result['prompt_tokens_kept']['sparse']} kept by Dynamic-LLaVA), {result['threads']} threads")
    print(f"output-text predictor: {result['output_keep_rule']}")
    for name, check in result["check"].items():
        print(f"check ({name}): real decode {check['real']['seconds_per_token']:.4f} s/token, filled cache "
              f"{check['filled']['seconds_per_token']:.4f} s/token at {check['real']['output_tokens']} tokens "
              f"(filled / real {check['filled_over_real']:.3f})")
    print(f"\n{'with KV cache':>14}{'dense s/tok':>13}{'sparse s/tok':>14}{'ratio':>8}{'dense KV MiB':>14}"
          f"{'sparse KV MiB':>15}{'KV ratio':>10}{'kept out':>10}")
    for dense, sparse in zip(result["with_cache"]["dense"], result["with_cache"]["sparse"]):
        line = f"{dense['output_tokens']:>14}"
        for point in (dense, sparse):
            line += f"{point['seconds_per_token']:>13.4f}" if point["fits"] else f"{'(no fit)':>13}"
        both = dense["fits"] and sparse["fits"]
        line += f"{sparse['seconds_per_token'] / dense['seconds_per_token']:>8.3f}" if both else f"{'-':>8}"
        mib = [_kv_bytes(p) / 2**20 for p in (dense, sparse)]
        line += f"{mib[0]:>14.1f}{mib[1]:>15.1f}{mib[1] / mib[0]:>10.3f}"
        line += f"{sparse['output_tokens_kept']:>10}" if sparse["fits"] else f"{'-':>10}"
        print(line)
    print("(KV MiB: held after that many output tokens, computed from the entry counts where not run; "
          "'(no fit)': more than the RAM available here)")
    for name, points in result["with_cache"].items():
        run = [p for p in points if p["fits"]]
        if run:
            print(f"SDPA kernels of one {name} step at {run[-1]['output_tokens']} tokens: "
                  f"{describe(run[-1]['attention_kernels'])}")
    if result["without_cache"]:
        dense, sparse = result["without_cache"]["dense"], result["without_cache"]["sparse"]
        print(f"\n{'without cache':>14}{'dense s':>13}{'sparse s':>14}{'ratio':>8}")
        for n, seconds in dense["total_seconds"].items():
            other = sparse["total_seconds"][n]
            print(f"{n:>14}{seconds:>13.1f}{other:>14.1f}{other / seconds:>8.3f}")
        for name, entry in result["without_cache"].items():
            if "check" in entry:
                c = entry["check"]
                print(f"check ({name}): {c['output_tokens']} tokens really took {c['real_seconds']:.1f} s, "
                      f"estimated {c['estimated_seconds']:.1f} s (estimate / real {c['estimate_over_real']:.3f})")


def _plot(result: dict[str, Any], path: str) -> None:
    import matplotlib.pyplot as plt

    fig, (kv_axis, latency_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in result["with_cache"].items():
        kv_axis.plot([p["output_tokens"] for p in points], [_kv_bytes(p) / 2**30 for p in points],
                     marker="o", label=name)
        run = [p for p in points if p["fits"]]
        latency_axis.plot([p["output_tokens"] for p in run], [p["seconds_per_token"] * 1000 for p in run],
                          marker="o", label=name)
    kv_axis.set(xlabel="output tokens", ylabel="KV cache (GiB)", title="KV-cache bytes")
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
