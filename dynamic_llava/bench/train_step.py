"""`dynamic-llava bench train`: time and peak memory of one training step (forward + backward),
dense LLaVA vs Dynamic-LLaVA's masked-softmax training (blocked, FlexAttention) vs the same maths written
with plain autograd.

Modes, each in its own subprocess so that none sees another's allocations:

- `dense`: plain LLaVA training, causal SDPA in every layer (`model.sparsity_training = None`);
- `masked`: Dynamic-LLaVA sparsification training (`SparsityTraining(tau=1.0)`): Gumbel decisions at
  sparse_layer, `masked_softmax_attention` (custom autograd: PyTorch's CPU flash kernel on CPU, score
  blocks recomputed in backward elsewhere) in the later layers, keep-rate loss;
- `naive-masked`: the same, with the decoder's masked-softmax call swapped (in that subprocess only)
  for `naive_masked_attention`, the reference's formula on autograd, which keeps several
  [B, H, T, T] tensors per layer for backward;
- `flex-masked`: the same, with `--masked_attention flex` (`flex_masked_softmax_attention`): compiled
  FlexAttention kernels on CUDA (the warm-up step compiles them); elsewhere flex's unfused math path,
  which materialises the scores like naive-masked. Left out, with a note, where torch has no FlexAttention.

`--modes` picks some of them (dense, the baseline of the ratios, always runs).

The step is `model(input_ids, labels, attention_mask, images)` under CPU autocast (bf16, as Trainer
does, fp32 master weights) and `loss.backward()` outside it; the optimizer is not part of the step
(its cost and state do not depend on the mode); gradients are set to None between steps, as Trainer
does. Every step reseeds torch, so the masked modes draw the same Gumbel noise and must give the
same loss. The modes' steps are interleaved (one warm-up round, then `--repeats` rounds of one step
per mode in rotating order; one process computes at a time), so a busy spell on this shared machine
hits every mode alike; each step also records its CPU seconds per wall second, which drop below the
thread count when other jobs compete. After each step a worker hands its freed heap back to the OS
(`malloc_trim`), so the idle ones hold about their weights; each step thus faults its working memory
in afresh, in every mode alike.

Random weights at real widths (see `bench prefill`). The CLIP tower (frozen, no gradient in every
mode, not what is compared) is, for mid and 7B, a one-layer stub with CLIP-L's width and patch grid
(576 image tokens, the real projector shape); tiny keeps its tiny CLIP.

Memory: the process's resident-set high-water mark (`VmHWM`, Linux) is reset after the model and the
inputs are built (`/proc/self/clear_refs`), so the peak covers the steps only; the increase is that
peak minus the resident set before the first step, and includes the gradients (one fp32 copy of the
trainable weights, the same in every mode). `ru_maxrss` is recorded too, but it cannot be reset and a
child started by fork + exec inherits its parent's value.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..errors import UserError, run_command
from ..model.config import DynamicLlavaConfig, SparseConfig
from ..model.flex_masked_attention import flex_attention_available
from ..model.llava import DynamicLlavaForCausalLM
from ..model.sparsity_training import SparsityTraining, masked_attention_function, use_masked_attention
from .device import add_device_argument, device_info, peak_memory_bytes, reset_peak_memory, resolve_device, timed
from .output import write_json
from .shapes import SHAPES, VOCAB, Shape

MODES = ("dense", "masked", "naive-masked", "flex-masked")
REFERENCE_EPS = 1e-6  # the reference's masked softmax: (w + eps / T) / (sum w + eps)
PROMPT_PREFIX = 35  # BOS + v1.5 system prompt + " USER:", then <image>, then the rest of the prompt
_MIB = 2**20

# Frozen stand-in for CLIP ViT-L/14-336: its width (the projector's input) and patch grid, one layer.
_STUB_TOWER = dict(hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=16,
                   image_size=336, patch_size=14)
TRAIN_SHAPES: dict[str, Shape] = {
    "tiny": SHAPES["tiny"],
    # Between tiny and 7B, 5-10 s per step on 2 cores: 7B's head size (128) and half its width, so that
    # attention's share of the work (which grows with tokens / width) is not far from 7B's.
    "mid": Shape(dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16),
                 _STUB_TOWER),
    "llava-1.5-7b": replace(SHAPES["llava-1.5-7b"], vision=_STUB_TOWER),
}


# ----------------------------------------------------------------------------- naive attention
def naive_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                           key_valid: torch.Tensor | None = None, eps: float = REFERENCE_EPS,
                           decided: torch.Tensor | None = None) -> torch.Tensor:
    """`masked_softmax_attention`'s maths the straightforward way, as the reference computes it (autograd
    gives dL/dkeep at every slot, `decided` or not): scores in
    the input dtype with a min-value causal/padding mask, row max subtracted, exp in fp32 times
    G = keep_j (1 on the diagonal), (w + eps / T) / (sum w + eps), cast back, times V. Autograd saves
    the [B, H, T, T] scores, exp and numerator (fp32) and probabilities for backward, in every layer."""
    b, h, t, d = q.shape
    group = h // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    if key_valid is None:
        key_valid = torch.ones(keep.shape, dtype=torch.bool, device=keep.device)
    eye = torch.eye(t, dtype=torch.bool, device=q.device)
    visible = (torch.ones(t, t, dtype=torch.bool, device=q.device).tril() & key_valid[:, None, None, :]) | eye
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    s = s.masked_fill(~visible, torch.finfo(s.dtype).min)
    s = s - s.amax(-1, keepdim=True)
    dtype = torch.promote_types(s.dtype, torch.float32)  # fp32 (fp64 stays fp64, for the tests)
    policy = keep.to(dtype)[:, None, None, :]
    gate = policy + (1.0 - policy) * eye.to(dtype)
    w = s.to(dtype).exp() * gate
    p = (w + eps / t) / (w.sum(-1, keepdim=True) + eps)
    return torch.matmul(p.to(v.dtype), v)


def _attention_of(mode: str) -> Callable[..., torch.Tensor]:
    """The masked-softmax implementation a mode trains with (dense: the default one, never called)."""
    if mode == "naive-masked":
        return naive_masked_attention
    return masked_attention_function("flex" if mode == "flex-masked" else "blocked")


def _count_attention_calls(model: DynamicLlavaForCausalLM, implementation: Callable[..., torch.Tensor]
                           ) -> list[int]:
    """Make the model's decoder layers train with `implementation`, counting calls."""
    calls = [0]

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls[0] += 1
        return implementation(*args, **kwargs)

    if use_masked_attention(model, counted) == 0:
        raise RuntimeError("the model has no decoder attention to train with a masked softmax: update this bench")
    return calls


# ----------------------------------------------------------------------------- model and inputs
@dataclass(frozen=True)
class StepConfig:
    shape: str
    layers: int
    batch_size: int
    prompt_text_tokens: int
    answer_tokens: int
    dtype: str  # "bf16" (autocast, fp32 master weights) or "fp32"
    gradient_checkpointing: bool
    repeats: int
    seed: int
    device: str = "cpu"  # resolved (cuda -> cuda:N) before the workers start


def _shape(config: StepConfig) -> Shape:
    shape = TRAIN_SHAPES[config.shape]
    return replace(shape, llm={**shape.llm, "num_hidden_layers": config.layers})


def parameter_count(shape: Shape) -> int:
    """Parameters of the LLM, projector and predictors (no tower), counted on the meta device."""
    config = DynamicLlavaConfig(vocab_size=VOCAB, mm_hidden_size=shape.vision["hidden_size"],
                                sparse_config=shape.sparse, **shape.llm)
    with torch.device("meta"):
        return sum(p.numel() for p in DynamicLlavaForCausalLM(config).parameters())


def build_training_model(config: StepConfig) -> DynamicLlavaForCausalLM:
    from .random_llava import (
        build_model,  # transformers' LLaVA classes: only the worker needs them
    )

    model = build_model(_shape(config), torch.float32, config.seed, config.device).train()
    if config.gradient_checkpointing:
        # What Trainer calls: activation_checkpointing_enable where transformers has it (gradient_checkpointing_enable
        # became its deprecated alias), gradient_checkpointing_enable in the 5.x releases before
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    return model


def make_batch(config: StepConfig, vision: dict[str, int]) -> dict[str, Any]:
    """B copies of one v1.5-shaped sample (random ids): prompt text with one <image>, then an answer of
    `answer_tokens` supervised tokens (long enough for output-text decisions)."""
    generator = torch.Generator().manual_seed(config.seed)
    prompt = torch.randint(3, VOCAB, (config.prompt_text_tokens,), generator=generator)
    prompt[0] = 1  # BOS
    answer = torch.randint(3, VOCAB, (config.answer_tokens,), generator=generator)
    split = min(PROMPT_PREFIX, config.prompt_text_tokens)
    ids = torch.cat([prompt[:split], torch.tensor([IMAGE_TOKEN_INDEX]), prompt[split:], answer])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-config.answer_tokens:] = answer
    pixels = torch.randn(config.batch_size, 3, vision["image_size"], vision["image_size"], generator=generator)
    b = config.batch_size
    batch = {"input_ids": ids[None].repeat(b, 1), "labels": labels[None].repeat(b, 1),
             "attention_mask": torch.ones(b, len(ids), dtype=torch.long), "images": pixels}
    return {name: tensor.to(config.device) for name, tensor in batch.items()}


def training_step(model: DynamicLlavaForCausalLM, batch: dict[str, Any], dtype: str) -> dict[str, float]:
    """Forward under autocast, backward outside it (as Trainer's training_step); the loss terms."""
    device_type = model.lm_head.weight.device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        out = model(**batch)
    out.loss.backward()
    terms = {name: getattr(out, name) for name in ("loss", "lm_loss", "vision_keep", "output_keep")}
    return {name: float(value.detach()) for name, value in terms.items() if value is not None}


# ----------------------------------------------------------------------------- memory (Linux /proc)
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise UserError(f"/proc/self/status has no {field}: the memory measurement needs Linux")


def _reset_peak() -> None:
    """Set VmHWM to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError as error:
        raise UserError(f"cannot reset the resident-set peak through /proc/self/clear_refs ({error})") from None


def _ru_maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- one mode (worker process)
class ModeRunner:
    """One mode's model and inputs in this process; `step()` runs and measures one training step."""

    def __init__(self, mode: str, config: StepConfig) -> None:
        self.mode, self.config = mode, config
        self.model = build_training_model(config)
        if mode != "dense":
            self.model.sparsity_training = SparsityTraining(tau=1.0)
        self.calls = _count_attention_calls(self.model, _attention_of(mode))
        self.batch = make_batch(config, _shape(config).vision)
        gc.collect()
        self.load_peak_kib, self.baseline_kib = _status_kib("VmHWM"), _status_kib("VmRSS")
        _reset_peak()  # from here on VmHWM is the peak of the steps
        self.steps = 0

    def step(self) -> dict[str, Any]:
        torch.manual_seed(self.config.seed)  # the same Gumbel noise in every step and mode
        device = torch.device(self.config.device)
        reset_peak_memory(device)
        cpu_start = _cpu_seconds()
        terms, seconds = timed(device, lambda: training_step(self.model, self.batch, self.config.dtype))
        cpu = _cpu_seconds() - cpu_start
        peak_gpu = peak_memory_bytes(device)  # before zero_grad: the gradients are part of the step's peak
        self.model.zero_grad(set_to_none=True)
        _release_free_memory()
        self.steps += 1
        reply = {"seconds": seconds, "cpu_seconds": cpu, "peak_kib": _status_kib("VmHWM"), "terms": terms}
        return reply if peak_gpu is None else {**reply, "peak_gpu_bytes": peak_gpu}

    def summary(self) -> dict[str, Any]:
        if self.mode != "dense" and self.calls[0] == 0:
            raise RuntimeError(f"{self.mode}: the masked-softmax attention was never called")
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return {"baseline_kib": self.baseline_kib, "load_peak_kib": self.load_peak_kib,
                "ru_maxrss_mib": _ru_maxrss_mib(), "gradient_mib": trainable * 4 / _MIB,
                "masked_attention_calls_per_step": self.calls[0] / max(self.steps, 1)}


def _release_free_memory() -> None:
    """Hand freed heap back to the OS (glibc), so the idle workers hold little more than their weights
    while another one steps (three mid-shape peaks at once do not fit in 24 GiB)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _worker(spec: str) -> int:
    """Serve one mode: build, answer "ready"; then one JSON line per "step" command, "summary" at "done"."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints (Python or C) must not corrupt the protocol on the real stdout
    job = json.loads(spec)
    start = time.perf_counter()
    runner = ModeRunner(job["mode"], StepConfig(**job["config"]))
    print(f"  {job['mode']}: built in {time.perf_counter() - start:.1f} s, resident "
          f"{runner.baseline_kib / 1024:.0f} MiB", file=sys.stderr, flush=True)
    protocol.write(json.dumps("ready") + "\n")
    protocol.flush()
    for command in sys.stdin:
        reply = runner.step() if command.strip() == "step" else runner.summary()
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()
        if command.strip() == "done":
            break
    return 0


class _Worker:
    """Parent side of one worker process; `error` is set (and the mode dropped) if the process dies."""

    def __init__(self, mode: str, config: StepConfig) -> None:
        self.mode, self.error = mode, None
        spec = json.dumps({"mode": mode, "config": asdict(config)})
        self.proc = subprocess.Popen([sys.executable, "-m", "dynamic_llava.bench.train_step", "--worker", spec],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def request(self, command: str | None) -> Any:
        try:
            if command is not None:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if line:
            return json.loads(line)
        code = self.proc.wait()
        self.error = "killed (SIGKILL: out of memory?)" if code == -9 else f"worker exited with code {code}"
        return None


def measure_modes(config: StepConfig, modes: tuple[str, ...] = MODES) -> dict[str, dict[str, Any]]:
    """The modes side by side: one worker process each (built one after the other), then 1 warm-up +
    `repeats` rounds in which every mode runs one step, the order rotating each round, so that a busy
    spell on the machine hits all modes alike. Only one process computes at a time."""
    workers = {}
    for mode in modes:
        worker = _Worker(mode, config)
        if worker.request(None) == "ready":  # wait: builds must not overlap each other's steps
            workers[mode] = worker
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for r in range(1 + config.repeats):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        line = []
        for mode in order:
            worker = workers.get(mode)
            if worker is None or worker.error:
                continue
            reply = worker.request("step")
            if reply is not None:
                runs[mode].append(reply)
                line.append(f"{mode} {reply['seconds']:.2f} s")
        print(f"  {'warm-up' if r == 0 else f'round {r}/{config.repeats}'}: {', '.join(line)}", flush=True)
    results = {}
    for mode in modes:
        worker = workers.get(mode)
        summary = worker.request("done") if worker is not None and worker.error is None else None
        if worker is not None:
            worker.proc.wait()
        if summary is None or len(runs[mode]) < 1 + config.repeats:
            results[mode] = {"error": worker.error if worker is not None else "worker failed to start"}
            continue
        results[mode] = _mode_result(runs[mode], summary)
    return results


def _mode_result(runs: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    timed, baseline = runs[1:], summary["baseline_kib"]
    peak = max(run["peak_kib"] for run in runs)
    return {
        "step_seconds": statistics.median(run["seconds"] for run in timed),
        "step_seconds_runs": [run["seconds"] for run in timed],
        "step_seconds_min": min(run["seconds"] for run in timed),
        "warmup_seconds": runs[0]["seconds"],
        # CPU seconds of the process per wall second: below the thread count when other jobs compete
        "cpu_per_wall_runs": [run["cpu_seconds"] / run["seconds"] for run in timed],
        "peak_increase_mib": (peak - baseline) / 1024,
        "peak_increase_first_step_mib": (runs[0]["peak_kib"] - baseline) / 1024,
        "peak_rss_mib": peak / 1024,
        "baseline_rss_mib": baseline / 1024,
        "load_peak_rss_mib": summary["load_peak_kib"] / 1024,
        "ru_maxrss_mib": summary["ru_maxrss_mib"],
        "gradient_mib": summary["gradient_mib"],
        "masked_attention_calls_per_step": summary["masked_attention_calls_per_step"],
        "first_step": runs[0]["terms"],
        # CUDA only: peak allocated GPU memory of each timed step (weights and gradients included)
        **({"peak_gpu_memory_bytes_runs": [run["peak_gpu_bytes"] for run in timed]}
           if "peak_gpu_bytes" in runs[0] else {}),
    }


# ----------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=list(TRAIN_SHAPES), required=True,
                        help="tiny (seconds), mid (hidden 2048, 8 layers), llava-1.5-7b (needs --layers here)")
    parser.add_argument("--layers", type=int, default=None, help="LLM layers (default: the shape's)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--prompt-text-tokens", type=int, default=40, help="prompt text besides the image")
    parser.add_argument("--answer-tokens", type=int, default=60,
                        help="supervised answer tokens (>= output_text_len_for_training for output decisions)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: CPU autocast over fp32 weights, as Trainer --bf16; fp32: no autocast")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode, after one warm-up step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated, of {', '.join(MODES)} (default: all; flex-masked only where torch "
                             "has FlexAttention); dense always runs")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (at the end)")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    shape = TRAIN_SHAPES[args.shape]
    layers = args.layers or shape.llm["num_hidden_layers"]
    sparse_layer = SparseConfig(**shape.sparse).sparse_layer
    if layers <= sparse_layer:
        raise UserError(f"--layers must be > sparse_layer ({sparse_layer}), or no layer uses the masked softmax")
    for name, low in (("batch_size", 1), ("repeats", 1), ("prompt_text_tokens", 1), ("answer_tokens", 1)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} must be >= {low}")
    modes = _modes(args.modes)
    config = StepConfig(args.shape, layers, args.batch_size, args.prompt_text_tokens, args.answer_tokens,
                        args.dtype, args.gradient_checkpointing, args.repeats, args.seed, str(device))
    n_params = parameter_count(_shape(config))
    _check_memory(n_params, args.shape, device, len(modes))
    image_tokens = (shape.vision["image_size"] // shape.vision["patch_size"]) ** 2
    text_tokens = args.prompt_text_tokens + args.answer_tokens
    print(f"bench train: {args.shape} ({layers} layers, {n_params / 1e6:.0f} M parameters), {args.dtype}, "
          f"batch {args.batch_size}, {image_tokens} image + {text_tokens} text tokens "
          f"({args.answer_tokens}-token answer), gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {torch.get_num_threads()} threads; "
          "one subprocess per mode, steps interleaved", flush=True)
    measured = measure_modes(config, modes)
    dense = measured["dense"]
    ratios = {mode: {"step_seconds": r["step_seconds"] / dense["step_seconds"],
                     "step_seconds_min": r["step_seconds_min"] / dense["step_seconds_min"],
                     "peak_increase": r["peak_increase_mib"] / dense["peak_increase_mib"]}
              for mode, r in measured.items() if "error" not in r and "error" not in dense}
    result: dict[str, Any] = {
        "modes": measured, "ratios_to_dense": ratios, **asdict(config), "parameters": n_params,
        "image_tokens": image_tokens, "text_tokens": text_tokens, "sequence_tokens": image_tokens + text_tokens,
        "step": f"forward ({device.type} autocast if bf16) + loss.backward(); optimizer excluded; grads set to None "
                "between steps",
        "memory": "VmHWM reset after model + inputs are built; increase = peak over the steps - VmRSS before them",
        "vision_tower": "frozen stub (no grad in every mode)" if args.shape != "tiny" else "tiny CLIP (frozen)",
        "threads": torch.get_num_threads(), "machine": platform.machine(), **device_info(device),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _print_table(result)
    if args.json is not None:
        write_json(args.json, result)
    return 1 if any("error" in r for r in measured.values()) else 0


def _modes(spec: str | None) -> tuple[str, ...]:
    """--modes in MODES' order, dense included; by default all, less flex-masked where torch has no FlexAttention."""
    if spec is None:
        if flex_attention_available():
            return MODES
        print(f"flex-masked left out: torch {torch.__version__} has no FlexAttention (AuxRequest)", flush=True)
        return tuple(mode for mode in MODES if mode != "flex-masked")
    asked = {mode.strip() for mode in spec.split(",") if mode.strip()}
    unknown = sorted(asked - set(MODES))
    if unknown:
        raise UserError(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    if "flex-masked" in asked:
        masked_attention_function("flex")  # UserError where torch has no FlexAttention
    return tuple(mode for mode in MODES if mode in asked | {"dense"})


def _check_memory(n_params: int, shape: str, device: torch.device, n_modes: int) -> None:
    """Every mode's fp32 weights (the workers live side by side) + one set of fp32 gradients must fit,
    before any activation (in the GPU's free memory on CUDA)."""
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[0]
    else:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    needed = n_params * 4 * (n_modes + 1)
    if needed > 0.8 * available:
        raise UserError(f"{shape}: {n_modes} copies of the fp32 weights + gradients need {needed / 2**30:.1f} GiB, "
                        f"{available / 2**30:.1f} GiB available: use fewer --layers")


def _print_table(r: dict[str, Any]) -> None:
    print(f"\n{r['shape']}, {r['layers']} layers, {r['dtype']}, batch {r['batch_size']}, "
          f"{r['sequence_tokens']} tokens per sample, gradient checkpointing "
          f"{'on' if r['gradient_checkpointing'] else 'off'}: median of {r['repeats']} steps after a warm-up "
          f"(forward + backward, optimizer excluded)")
    gpu = any("peak_gpu_memory_bytes_runs" in m for m in r["modes"].values())  # CUDA: the memory that matters
    print(f"{'mode':14}{'step s':>9}{'x dense':>9}{'peak MiB +':>12}{'x dense':>9}{'peak MiB':>10}{'loss':>9}"
          f"{'cpu/wall':>10}" + (f"{'GPU GiB':>9}" if gpu else ""))
    for mode, m in r["modes"].items():
        if "error" in m:
            print(f"{mode:14}  failed: {m['error']}")
            continue
        ratio = r["ratios_to_dense"].get(mode, {})
        fmt = lambda key: f"{ratio[key]:.2f}" if key in ratio else "-"  # noqa: E731
        print(f"{mode:14}{m['step_seconds']:>9.2f}{fmt('step_seconds'):>9}{m['peak_increase_mib']:>12.0f}"
              f"{fmt('peak_increase'):>9}{m['peak_rss_mib']:>10.0f}{m['first_step']['loss']:>9.3f}"
              f"{statistics.median(m['cpu_per_wall_runs']):>10.2f}"
              + (f"{max(m['peak_gpu_memory_bytes_runs']) / 2**30:>9.2f}" if gpu else ""))
    ok = [m for m in r["modes"].values() if "error" not in m]
    if ok:
        print(f"peak MiB + = resident-set peak of the steps over the resident set before them (includes "
              f"{ok[0]['gradient_mib']:.0f} MiB of fp32 gradients); loss = first step's (the masked modes draw "
              "the same Gumbel noise); cpu/wall = CPU seconds per wall second of the steps "
              f"(at most {r['threads']}: lower when other jobs compete for the cores)")
    if r["ratios_to_dense"]:
        print("same ratios from the fastest step of each mode (other jobs only ever add time): "
              + ", ".join(f"{mode} {ratio['step_seconds_min']:.2f}" for mode, ratio in r["ratios_to_dense"].items()))
    if any(max(m["step_seconds_runs"]) > 1.5 * min(m["step_seconds_runs"]) for m in ok):
        print("WARNING: a mode's step times vary by more than 1.5x: the machine is busy; the ratios are unreliable")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.bench.train_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one mode, in this process
    args, _ = parser.parse_known_args(argv)
    if args.worker:
        return _worker(args.worker)
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
