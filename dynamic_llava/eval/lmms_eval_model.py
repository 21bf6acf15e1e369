"""lmms-eval model `dynamic_llava`: Dynamic-LLaVA (or dense LLaVA-1.5) inside lmms-eval.

`lmms-eval --model dynamic_llava --model_args pretrained=PATH,vision_keep_rate=0.2 --tasks ...` (the name
is registered by `lmms_eval_plugin`). Prompts come from `prompting.prepare_request`, answers
(`generate_until`) from `generation.generate`, batched, so they are the answers of
`python -m dynamic_llava.eval.model_vqa_loader` for the same questions and settings. Likelihoods
(`loglikelihood`: multiple-choice tasks) come from one full-sequence pass of the model with its token policy
(`model.step` returning every token's logits, as `forward_full`): image tokens are dropped at
`sparse_layer` exactly as at prefill, and the continuation is scored as prompt text (always kept; the
output-token predictor only decides about tokens the model generates).

Under `accelerate launch` each process takes lmms-eval's share of the documents (rank / world size) on its
own device. The efficiency figures of every request (image tokens kept, generated tokens kept, KV-cache
bytes and the dense figure) are gathered on rank 0, logged, added to lmms-eval's results file
(`throughput` section, per-request means) and, with `efficiency_path=DIR`, written to DIR/<model>/ (where
lmms-eval writes its results for `--output_path DIR`): `<time>_dynamic_llava_efficiency_samples.jsonl`
(one line per request) and `<time>_dynamic_llava_efficiency.json` (totals per task and overall).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from loguru import logger
from lmms_eval.api.instance import GenerationResult as LmmsGeneration
from lmms_eval.api.instance import Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.utils import sanitize_model_name
from tqdm import tqdm

from ..conversation import get_conv_template
from ..errors import UserError
from ..generation import GenerationConfig, generate
from ..mm_utils import tokenizer_image_token
from ..model.batch import IMAGE
from ..model.loading import load_pretrained_model
from ..model.policy import OUTPUT_RULES, VISION_RULES, describe_sparsity, make_policy
from ..model_options import resolve_device
from ..prompting import PreparedRequest, prepare_request
from ..sparsity_options import sparsity_overrides
from .io import write_json_atomic, write_text_atomic

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_MAX_NEW_TOKENS = 1024  # when a task's generation_kwargs give none (lmms-eval's llava model does the same)
STAT_KEYS = ("image_tokens", "image_tokens_kept", "output_tokens", "output_tokens_kept", "kv_cache_bytes",
             "kv_cache_bytes_dense")


def exit_on_user_error(method: F) -> F:
    """Bad input ends the run with one message and exit code 2 (lmms-eval would print a traceback and exit 0)."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    return wrapper  # type: ignore[return-value]


def _option(name: str, value: Any, kind: type, choices: tuple[str, ...] = ()) -> Any:
    """A model_args value (lmms-eval has already turned numbers and true/false into int, float, bool)."""
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str:
        value = str(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise UserError(f"model_args {name} must be {kind.__name__}, got {value!r}")
    if choices and value not in choices:
        raise UserError(f"model_args {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


class DynamicLlava(lmms):
    is_simple = True

    @exit_on_user_error
    def __init__(self, pretrained: str | None = None, model_base: str | None = None,
                 conv_template: str = "vicuna_v1", device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 1, sparse: bool = True, vision_keep_rate: float | None = None,
                 output_text_keep_rate: float | None = None, vision_policy: str | None = None,
                 output_policy: str | None = None, sparse_layer: int | None = None, policy_seed: int | None = None,
                 output_sparsity: bool = True, use_cache: bool = True, efficiency_path: str | None = None,
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        del max_batch_size  # lmms-eval's limit for --batch_size auto, which is refused below
        if unknown:
            raise UserError(f"unknown model_args for dynamic_llava: {', '.join(sorted(unknown))}")
        if pretrained is None:
            raise UserError("model_args needs pretrained=PATH (a checkpoint folder)")
        try:
            self._batch_size = int(batch_size)
        except ValueError:
            raise UserError(f"batch size must be a positive integer, got {batch_size!r} (auto is not supported)") from None
        if self._batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.conv_template = _option("conv_template", conv_template, str)
        get_conv_template(self.conv_template)  # an unknown name fails here, before loading
        self.use_cache = _option("use_cache", use_cache, bool)
        flags = argparse.Namespace(  # the flags of every project runner, for the shared mapping to loader overrides
            no_sparse=not _option("sparse", sparse, bool),
            no_output_sparsity=not _option("output_sparsity", output_sparsity, bool),
            vision_keep_rate=_option("vision_keep_rate", vision_keep_rate, float),
            output_keep_rate=_option("output_text_keep_rate", output_text_keep_rate, float),
            vision_policy=_option("vision_policy", vision_policy, str, VISION_RULES),
            output_policy=_option("output_policy", output_policy, str, OUTPUT_RULES),
            sparse_layer=_option("sparse_layer", sparse_layer, int),
            policy_seed=_option("policy_seed", policy_seed, int))

        # `accelerate launch` / torchrun: lmms-eval's CLI has joined the process group; like its evaluator, read
        # rank and world size from torch.distributed (accelerate's own state says one process on CPU-only hosts)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self._world_size > 1:  # one process per device
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
            if torch.cuda.is_available():
                torch.cuda.set_device(device)  # where NCCL's object collectives (clean) put their tensors
        else:
            device = resolve_device(device)
        self.pretrained = str(pretrained)
        self.efficiency_dir = None
        if efficiency_path is not None:
            self.efficiency_dir = Path(str(efficiency_path)) / sanitize_model_name(self.pretrained)
            if self._rank == 0:
                try:
                    self.efficiency_dir.mkdir(parents=True, exist_ok=True)
                except OSError as error:
                    raise UserError(f"cannot create efficiency_path folder {self.efficiency_dir}: "
                                    f"{error.strerror or error}") from None
        self._tokenizer, self._model, self._image_processor, _ = load_pretrained_model(
            self.pretrained, None if model_base is None else str(model_base), device=device,
            dtype=str(dtype), **sparsity_overrides(flags))  # "auto": as every command's --dtype
        self._model.eval()
        self._records: list[dict[str, Any]] = []
        self._seconds = 0.0
        self._ignored_kwargs: set[str] = set()

    @property
    def device(self) -> torch.device:
        """Where lmms-eval's evaluator puts its tensors for counting requests across ranks."""
        return self._model.device

    # ----------------------------------------------------------------- requests
    @exit_on_user_error
    def generate_until(self, requests: list[Instance]) -> list[LmmsGeneration]:
        outputs: list[LmmsGeneration | None] = [None] * len(requests)
        for batch in self._batches(requests, "generate_until"):
            prepared = [self._prepare(requests[i]) for i in batch]
            configs = [self._generation_config(requests[i].args[1], p.stop) for i, p in zip(batch, prepared)]
            start = time.perf_counter()
            results = generate(self._model, self._tokenizer, [p.input_ids for p in prepared],
                               [p.pixel_values for p in prepared], configs, make_policy(self._model))
            self._seconds += time.perf_counter() - start
            for i, result in zip(batch, results):
                # stripped as in the project's answer files
                outputs[i] = LmmsGeneration(result.text.strip(), TokenCounts(input_tokens=result.prompt_tokens,
                                                                             output_tokens=result.output_tokens))
                self._record(requests[i], {**result.efficiency_stats(), "prompt_tokens": result.prompt_tokens})
        return outputs  # type: ignore[return-value]

    @exit_on_user_error
    def loglikelihood(self, requests: list[Instance]) -> list[LmmsGeneration]:
        """(negative log-likelihood of the continuation, summed over its tokens; whether greedy decoding would
        produce it). A loss, not a log-probability: lmms-eval picks a multiple-choice answer by argmin.

        Each pair travels inside a GenerationResult: lmms-eval 0.7.3's evaluator turns any other non-string
        output into its string (`api.instance.unwrap_generation_output`), which breaks multiple-choice
        scoring, while it passes a GenerationResult's `text` through unchanged."""
        outputs: list[LmmsGeneration | None] = [None] * len(requests)
        model = self._model
        for batch in self._batches(requests, "loglikelihood"):
            items = [self._scoring_inputs(requests[i]) for i in batch]
            start = time.perf_counter()
            with torch.inference_mode():
                tokens = model.embed([ids for ids, _, _ in items], [pixels for _, pixels, _ in items])
                cache = model.new_cache(len(items))
                out = model.step(tokens, cache, make_policy(model), all_logits=True)
            self._seconds += time.perf_counter() - start
            per_entry = cache.bytes_per_entry()
            held = cache.lengths()
            for row, (i, (ids, _, n_cont)) in enumerate(zip(batch, items)):
                length = int(tokens.lengths[row])
                # the continuation is the last n_cont tokens; each is predicted by the token before it
                logits = out.logits[row, length - n_cont - 1:length - 1].float()
                targets = ids[len(ids) - n_cont:].to(logits.device)
                nll = -torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum()
                outputs[i] = LmmsGeneration((float(nll), bool((logits.argmax(-1) == targets).all())))
                is_image = tokens.kinds[row, :length] == IMAGE
                self._record(requests[i], {
                    "image_tokens": int(is_image.sum()),
                    "image_tokens_kept": int((out.keep[row, :length] & is_image).sum()),
                    "output_tokens": 0, "output_tokens_kept": 0,
                    "kv_cache_bytes": int(held[:, row].sum()) * per_entry,
                    "kv_cache_bytes_dense": model.config.num_hidden_layers * length * per_entry,
                    "prompt_tokens": length})
        return outputs  # type: ignore[return-value]

    @exit_on_user_error
    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise UserError("dynamic_llava answers single-turn tasks only (generate_until, loglikelihood, "
                        "multiple_choice), not generate_until_multi_round")

    def clean(self) -> None:
        """Called by lmms-eval on every process after the last request: report the efficiency figures."""
        gathered: list[Any] = [(self._records, self._seconds)]
        if self._world_size > 1:
            gathered = [None] * self._world_size
            torch.distributed.all_gather_object(gathered, (self._records, self._seconds))
        if self._rank == 0:
            records = [record for part, _ in gathered for record in part]
            if records:
                self._report(records, sum(seconds for _, seconds in gathered))
        self._records, self._seconds = [], 0.0
        super().clean()

    # ----------------------------------------------------------------- helpers
    def _batches(self, requests: list[Instance], what: str) -> Iterator[list[int]]:
        """Request indices in batches, longest contexts first (similar lengths share a batch: less padding)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        with tqdm(total=len(order), disable=self._rank != 0, desc=f"dynamic_llava {what}") as progress:
            for start in range(0, len(order), self._batch_size):
                batch = order[start:start + self._batch_size]
                yield batch
                progress.update(len(batch))

    def _prepare(self, request: Instance) -> PreparedRequest:
        """The request's context and images as the project's runners prompt them."""
        context, visuals = request.args[0], []
        if len(request.args) == 6:  # (context, gen_kwargs or continuation, doc_to_visual, doc_id, task, split)
            _, _, doc_to_visual, doc_id, task, split = request.args
            visuals = list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
        return prepare_request(context, visuals, self._tokenizer, self._image_processor, self._model.config,
                               self.conv_template)

    def _scoring_inputs(self, request: Instance) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(ids of prompt + continuation, pixels, continuation length in tokens).

        Like lm-eval's `_encode_pair`: the whole text is tokenised once and the continuation is what follows
        the prompt's tokens. A 2-tuple request (context, continuation) is the unconditional part of
        `acc_mutual_info`: no images."""
        continuation = request.args[1]
        if callable(continuation):  # output_type loglikelihood: the task's doc_to_target
            _, _, _, doc_id, task, split = request.args
            continuation = continuation(self.task_dict[task][split][doc_id])
        prepared = self._prepare(request)
        ids = tokenizer_image_token(prepared.prompt + str(continuation), self._tokenizer, return_tensors="pt")
        return ids, prepared.pixel_values, len(ids) - len(prepared.input_ids)

    def _generation_config(self, gen_kwargs: dict[str, Any], stop: str) -> GenerationConfig:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if int(kwargs.pop("num_beams", 1)) != 1:
            raise UserError("beam search is not supported: the task's num_beams must be 1")
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if kwargs.pop("do_sample", None) is False:
            temperature = 0.0
        top_p = kwargs.pop("top_p", None)
        max_new_tokens = int(kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        ignored = set(kwargs) - self._ignored_kwargs
        if ignored and self._rank == 0:
            logger.warning(f"dynamic_llava ignores these generation_kwargs: {', '.join(sorted(ignored))}")
        self._ignored_kwargs |= ignored
        return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=None if temperature == 0 or top_p is None else float(top_p),
                                stop_strings=[stop, *until], use_cache=self.use_cache)

    def _record(self, request: Instance, stats: dict[str, int]) -> None:
        if request.metadata.get("__padding_only__"):  # lmms-eval's filler to even out ranks: not a document
            return
        record: dict[str, Any] = {"task": request.task_name, "doc_id": request.doc_id,
                                  "request": request.request_type, "rank": self._rank}
        if request.request_type == "loglikelihood":
            record["choice"] = request.idx
        self._records.append({**record, **stats})

    def _report(self, records: list[dict[str, Any]], seconds: float) -> None:
        overall = _totals(records)
        tasks = sorted({record["task"] for record in records})
        n = overall["requests"]
        logger.info(f"dynamic_llava efficiency over {n} requests: image tokens kept {overall['image_tokens_kept']} of "
                    f"{overall['image_tokens']} ({overall['image_keep_ratio']:.1%}), KV cache "
                    f"{overall['kv_cache_ratio']:.1%} of dense")
        # lmms-eval puts these in its results file ("throughput", each additional key as avg_<key>)
        generated = overall["output_tokens"]
        log_metrics(total_elapsed_time=seconds, total_gen_tokens=generated,
                    avg_speed=generated / seconds if seconds > 0 else 0.0,
                    additional_metrics={"total_requests": n, "image_keep_ratio": overall["image_keep_ratio"],
                                        "kv_cache_ratio": overall["kv_cache_ratio"],
                                        **{key: overall[key] / n for key in STAT_KEYS}})
        if self.efficiency_dir is None:
            return
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d_%H%M%S")
        summary = {"model": self.pretrained, "sparse_config": describe_sparsity(self._model),
                   "conv_template": self.conv_template, "all": overall,
                   "tasks": {task: _totals([r for r in records if r["task"] == task]) for task in tasks}}
        samples = self.efficiency_dir / f"{stamp}_dynamic_llava_efficiency_samples.jsonl"
        write_text_atomic(samples, "".join(json.dumps(record) + "\n" for record in records))
        totals = self.efficiency_dir / f"{stamp}_dynamic_llava_efficiency.json"
        write_json_atomic(totals, summary, indent=2)
        logger.info(f"dynamic_llava efficiency figures: {totals}, {samples}")


def _totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums of the per-request figures, with the kept fraction of image tokens and KV bytes vs dense."""
    totals: dict[str, Any] = {"requests": len(records)}
    totals.update({key: sum(record[key] for record in records) for key in STAT_KEYS})
    totals["image_keep_ratio"] = totals["image_tokens_kept"] / totals["image_tokens"] if totals["image_tokens"] else 1.0
    totals["kv_cache_ratio"] = (totals["kv_cache_bytes"] / totals["kv_cache_bytes_dense"]
                                if totals["kv_cache_bytes_dense"] else 1.0)
    return totals
