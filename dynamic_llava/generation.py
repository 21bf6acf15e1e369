"""The one generation loop: batched prefill and decoding (with or without KV cache), sampling, stop
strings, streaming, and per-sample efficiency stats. CLI, evaluation and servers all call this.

Samples of a batch may each have their own `GenerationConfig` (servers batch requests with different
settings), and a `Session` carries one conversation's KV cache from one turn to the next.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .constants import IMAGE_TOKEN_INDEX
from .errors import UserError
from .model.batch import IMAGE, OUTPUT, TokenBatch
from .model.cache import SparseKVCache
from .model.llava import DynamicLlavaForCausalLM, StepOutput
from .model.policy import TokenPolicy, make_policy


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None
    stop_strings: Sequence[str] = ()
    eos_token_id: int | None = None  # default: the tokenizer's
    use_cache: bool = True  # False: recompute the whole sequence each step (SPEC 2.2, third column)
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "stop" | "length"
    prompt_tokens: int = 0  # after image expansion
    context_tokens: int = 0  # earlier turns of a Session already in the cache (positions before the prompt)
    image_tokens: int = 0
    image_tokens_kept: int = 0
    image_keep: list[list[bool]] = field(default_factory=list)  # per image, per patch (row-major)
    output_tokens: int = 0
    output_tokens_kept: int = 0  # generated tokens whose K/V the cache of layers >= sparse_layer holds at the end
    output_keep: list[bool] = field(default_factory=list)  # per generated token fed back: did its K/V enter
    # that cache (H2O: always, and later evictions make output_tokens_kept smaller than the sum)
    kv_cache_bytes: int = 0
    kv_cache_bytes_dense: int = 0  # what dense LLaVA-1.5 would hold for the same tokens
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def efficiency_stats(self) -> dict[str, int]:
        """Tokens kept and KV-cache bytes (with the dense figure), as reported by the CLI and runners."""
        return {
            "image_tokens": self.image_tokens,
            "image_tokens_kept": self.image_tokens_kept,
            "output_tokens": self.output_tokens,
            "output_tokens_kept": self.output_tokens_kept,
            "kv_cache_bytes": self.kv_cache_bytes,
            "kv_cache_bytes_dense": self.kv_cache_bytes_dense,
        }


@dataclass
class Session:
    """One conversation's KV cache across turns (batch size 1).

    `stream_generate(..., session=s)` prefills the turn's new tokens into the cache after what it holds,
    at their true positions, instead of re-encoding the conversation; it then leaves the cache, the
    position of the next token and the last sampled token (which never entered the cache) for the next
    turn. Earlier decisions stand: dropped image / generated tokens of earlier turns stay dropped.
    """

    cache: SparseKVCache | None = None
    next_position: int = 0
    last_token: int | None = None


def expanded_length(model: DynamicLlavaForCausalLM, input_ids: Sequence[int] | torch.Tensor) -> int:
    """Tokens a prompt takes in the model: each IMAGE_TOKEN_INDEX placeholder becomes its image's tokens."""
    ids = torch.as_tensor(input_ids)
    n_images = int((ids == IMAGE_TOKEN_INDEX).sum())
    if not n_images:
        return len(ids)
    tower = model.model.vision_tower
    if tower is None:
        raise UserError("this model has no vision tower attached; load it with load_pretrained_model")
    per_image = tower.num_patches + (tower.select_feature == "cls_patch")
    return len(ids) + n_images * (per_image - 1)


def as_prompt_list(input_ids: Sequence[Sequence[int]] | torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Prompts as a list of 1-D id tensors; a padded [B, T] tensor is unpadded with its attention mask."""
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        if attention_mask is None:
            return list(input_ids)
        return [row[mask.bool()] for row, mask in zip(input_ids, attention_mask)]
    return [torch.as_tensor(x, dtype=torch.long).flatten() for x in input_ids]


def _sample(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    logits = logits.float()
    if config.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p is not None and config.top_p < 1:
        sorted_probs, order = probs.sort(-1, descending=True)
        # drop tokens once the mass before them reaches top_p (the top token always stays)
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= config.top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sample_rows(logits: torch.Tensor, configs: Sequence[GenerationConfig],
                 generator: torch.Generator | None) -> torch.Tensor:
    """`_sample` with each row's own temperature / top_p (one call when the rows share them)."""
    settings = [(c.temperature, c.top_p) for c in configs]
    if len(set(settings)) == 1:
        return _sample(logits, configs[0], generator)
    tokens = torch.empty(len(configs), dtype=torch.long, device=logits.device)
    for setting in dict.fromkeys(settings):
        rows = [r for r, s in enumerate(settings) if s == setting]
        tokens[rows] = _sample(logits[rows], configs[rows[0]], generator)
    return tokens


def _per_sample_configs(config: GenerationConfig | Sequence[GenerationConfig] | None,
                        b: int) -> list[GenerationConfig]:
    if config is None or isinstance(config, GenerationConfig):
        configs = [config or GenerationConfig()] * b
    else:
        configs = list(config)
        if len(configs) != b:
            raise UserError(f"got {len(configs)} generation configs for {b} prompts")
        if len({(c.use_cache, c.seed) for c in configs}) > 1:
            raise UserError("use_cache and seed must be the same for every sample of a batch")
    for c in configs:
        c.validate()
    return configs


def append_token(batch: TokenBatch, embeds: torch.Tensor, positions: torch.Tensor) -> TokenBatch:
    """The batch with one more generated token per sample ([B, 1, C] at positions [B])."""
    b, t, c = batch.embeds.shape
    slot = batch.lengths[:, None]
    grow = lambda x, fill: torch.cat([x, x.new_full((b, 1, *x.shape[2:]), fill)], dim=1)
    new_embeds = grow(batch.embeds, 0.0).scatter(1, slot[..., None].expand(-1, -1, c), embeds)
    return TokenBatch(
        embeds=new_embeds,
        positions=grow(batch.positions, 0).scatter(1, slot, positions[:, None]),
        lengths=batch.lengths + 1,
        kinds=grow(batch.kinds, 0).scatter(1, slot, OUTPUT),
        image_ids=grow(batch.image_ids, -1),
    )


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte fallback (LLaMA-family tokenizers)


class _StopTracker:
    """Decodes one sample's output, finds EOS and stop strings, and releases text safe to stream."""

    def __init__(self, tokenizer, stop_strings: Sequence[str], eos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.eos_token_id = eos_token_id
        self.ids: list[int] = []
        self.text = ""
        self.stable = 0  # length of the text that later tokens cannot change
        self.emitted = 0
        self.finish_reason: str | None = None
        self.done = False  # no more tokens: release everything

    def add(self, token_id: int) -> None:
        if token_id == self.eos_token_id:
            self.finish_reason = "eos"
            return
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        # A run of byte tokens decodes as one unit (an invalid run turns every byte of it into U+FFFD), so
        # the text of a trailing run may still change: only what precedes it is stable.
        run = 0
        while run < len(self.ids) and _BYTE_TOKEN.fullmatch(self.tokenizer.convert_ids_to_tokens(self.ids[-1 - run])):
            run += 1
        self.stable = len(self.tokenizer.decode(self.ids[:-run], skip_special_tokens=True)) if run else len(self.text)
        cut = min((self.text.find(s) for s in self.stop_strings if s in self.text), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.finish_reason = "stop"

    def release(self) -> str:
        """New text since the last release, holding back a possible stop-string prefix or partial character."""
        end = len(self.text)
        if self.finish_reason is None and not self.done:
            end = min(len(self.text.rstrip("\ufffd")), self.stable)
            for stop in self.stop_strings:
                for n in range(min(len(stop) - 1, end), 0, -1):
                    if self.text[:end].endswith(stop[:n]):
                        end -= n
                        break
        delta = self.text[self.emitted:max(end, self.emitted)]
        self.emitted = max(end, self.emitted)
        return delta


@dataclass
class DecodeState:
    """What decoding carries from one step to the next: made by `prefill`, advanced by `decode_step`."""

    model: DynamicLlavaForCausalLM
    policy: TokenPolicy
    configs: list[GenerationConfig]
    generator: torch.Generator | None
    trackers: list[_StopTracker]
    results: list[GenerationResult]
    batch: TokenBatch  # the whole sequences (decoding without the cache recomputes them each step)
    cache: SparseKVCache
    out: StepOutput  # the last forward: each running row's next-token logits
    active: torch.Tensor  # running row -> sample index; finished samples leave the batch (and the cache)
    positions: torch.Tensor  # each running row's position of its next token
    decode_start: float
    session: Session | None = None
    on_finish: Callable[[int, GenerationResult], None] | None = None
    tokens: torch.Tensor | None = None  # each row's last sampled token (fed to the model at the next step)
    running: list[int] | None = None  # rows still running after the last step; None before the first
    steps: int = 0

    @property
    def done(self) -> bool:
        return self.running == []


@torch.inference_mode()
def prefill(model: DynamicLlavaForCausalLM, tokenizer, input_ids: Sequence[Sequence[int]] | torch.Tensor,
            images: Sequence[torch.Tensor | None] | None = None,
            config: GenerationConfig | Sequence[GenerationConfig] | None = None,
            policy: TokenPolicy | None = None, attention_mask: torch.Tensor | None = None,
            *, session: Session | None = None,
            on_finish: Callable[[int, GenerationResult], None] | None = None) -> DecodeState:
    """Check the requests and run the prompts through the model (see `stream_generate` for the arguments)."""
    prompts = as_prompt_list(input_ids, attention_mask)
    b = len(prompts)
    configs = _per_sample_configs(config, b)
    use_cache = configs[0].use_cache
    offset = 0
    if session is not None:
        if b != 1 or not use_cache:
            raise UserError("a Session continues one conversation: one prompt, decoding with the cache")
        offset = session.next_position
    policy = policy or make_policy(model)
    seed = configs[0].seed
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    trackers = [_StopTracker(tokenizer, c.stop_strings,
                             c.eos_token_id if c.eos_token_id is not None else tokenizer.eos_token_id)
                for c in configs]
    results = [GenerationResult(context_tokens=offset) for _ in range(b)]

    start = time.perf_counter()
    batch = model.embed(prompts, images)
    if offset:
        batch = dataclasses.replace(
            batch, positions=torch.where(batch.valid, batch.positions + offset, batch.positions))
    context = model.config.max_position_embeddings
    for i, (n, c) in enumerate(zip(batch.lengths.tolist(), configs)):
        if offset + n + c.max_new_tokens > context:
            earlier = f" after {offset} tokens of conversation" if offset else ""
            raise UserError(f"prompt {i} is {n} tokens (images expanded){earlier}; with max_new_tokens "
                            f"{c.max_new_tokens} it exceeds the context length {context}")
    cache = session.cache if session is not None and session.cache is not None else model.new_cache(b)
    out = model.step(batch, cache, policy)
    _record_prefill(results, batch, out.keep, time.perf_counter() - start)
    return DecodeState(model, policy, configs, generator, trackers, results, batch, cache, out,
                       active=torch.arange(b), positions=batch.lengths + offset, decode_start=time.perf_counter(),
                       session=session, on_finish=on_finish)


@torch.inference_mode()
def decode_step(state: DecodeState) -> list[str]:
    """One token for every running sample; returns every sample's new text ('' when nothing new).

    From the second step on, the tokens sampled by the previous step are fed to the model first.
    `on_finish(i, result)` is called for each sample completed by this step.
    """
    if state.running is not None:
        _feed(state)
    configs, use_cache = state.configs, state.configs[0].use_cache
    state.tokens = _sample_rows(state.out.logits, [configs[i] for i in state.active.tolist()], state.generator)
    state.running = []
    for row, (i, token) in enumerate(zip(state.active.tolist(), state.tokens.tolist())):
        tracker, result = state.trackers[i], state.results[i]
        tracker.add(token)
        result.output_tokens += 1
        if tracker.finish_reason is None and state.steps < configs[i].max_new_tokens - 1:
            state.running.append(row)
            continue
        result.decode_seconds = time.perf_counter() - state.decode_start
        if not use_cache:
            # The recomputed sequence re-decides every earlier output token (same predictor, same
            # inputs): its last step's view covers all fed tokens.
            fed = slice(result.prompt_tokens, result.prompt_tokens + result.output_tokens - 1)
            result.output_keep = state.out.keep[row, fed].tolist()
        _record_cache(result, state.cache, row, state.model.config.num_hidden_layers)
        tracker.done = True
        result.text = tracker.text
        result.token_ids = list(tracker.ids)
        result.finish_reason = tracker.finish_reason or "length"
        if state.on_finish is not None:
            state.on_finish(i, result)
    state.steps += 1
    return [t.release() for t in state.trackers]


def _feed(state: DecodeState) -> None:
    """Drop the finished rows, then run the last sampled tokens through the model."""
    model, use_cache = state.model, state.configs[0].use_cache
    if len(state.running) < len(state.active):
        rows = torch.tensor(state.running, device=state.tokens.device)
        state.active = state.active[state.running]
        state.tokens, state.positions = state.tokens[rows], state.positions[rows]
        state.cache.select(rows)
        if not use_cache:
            state.batch = state.batch.select(rows)
    if use_cache:
        state.out = model.step(model.embed_generated(state.tokens, state.positions), state.cache, state.policy)
        decisions = state.out.keep[:, 0]
    else:
        state.batch = append_token(state.batch, model.model.embed_tokens(state.tokens[:, None]), state.positions)
        state.cache = model.new_cache(len(state.active))
        state.out = model.step(state.batch, state.cache, state.policy)
        decisions = state.out.keep.gather(1, state.positions[:, None])[:, 0]
    state.positions = state.positions + 1
    for i, decision in zip(state.active.tolist(), decisions.tolist()):
        state.results[i].output_keep.append(bool(decision))


def finish(state: DecodeState) -> list[GenerationResult]:
    """The results, once every sample is done; a Session keeps the cache for the next turn."""
    if not state.done:
        raise RuntimeError("finish() before the last decode_step")
    if state.session is not None:
        # the last sampled token never entered the cache: the next turn starts at its position
        state.session.cache, state.session.next_position = state.cache, int(state.positions[0])
        state.session.last_token = int(state.tokens[0])
    return state.results


class GenerationStream:
    """Iterating runs the generation: prefill, then after each decoding step every sample's new text
    ('' when nothing new); once the iteration has ended, `results` holds the GenerationResults. It runs once
    (as the generator it replaces: a second run would, e.g., advance a Session twice)."""

    def __init__(self, start: Callable[[], DecodeState]) -> None:
        self._start: Callable[[], DecodeState] | None = start
        self._results: list[GenerationResult] | None = None

    def __iter__(self) -> Iterator[list[str]]:
        if self._start is None:
            raise RuntimeError("a generation stream can be iterated only once")
        start, self._start = self._start, None
        state = start()
        while not state.done:
            yield decode_step(state)
        self._results = finish(state)

    @property
    def results(self) -> list[GenerationResult]:
        if self._results is None:
            raise RuntimeError("the stream has not been iterated to its end")
        return self._results


def stream_generate(model: DynamicLlavaForCausalLM, tokenizer, input_ids: Sequence[Sequence[int]] | torch.Tensor,
                    images: Sequence[torch.Tensor | None] | None = None,
                    config: GenerationConfig | Sequence[GenerationConfig] | None = None,
                    policy: TokenPolicy | None = None, attention_mask: torch.Tensor | None = None,
                    *, session: Session | None = None,
                    on_finish: Callable[[int, GenerationResult], None] | None = None,
                    ) -> GenerationStream:
    """The generation as a stream of text (nothing runs until it is iterated); `.results` at its end.

    `config` is one GenerationConfig for all samples or one per sample (`use_cache` and `seed` shared).
    `on_finish(i, result)` is called as soon as sample i is complete, before the step's text is yielded.
    `session` (one prompt: the turn's new tokens) continues a conversation in its KV cache.
    """
    return GenerationStream(lambda: prefill(model, tokenizer, input_ids, images, config, policy, attention_mask,
                                            session=session, on_finish=on_finish))


def generate(model: DynamicLlavaForCausalLM, tokenizer, input_ids: Sequence[Sequence[int]] | torch.Tensor,
             images: Sequence[torch.Tensor | None] | None = None,
             config: GenerationConfig | Sequence[GenerationConfig] | None = None,
             policy: TokenPolicy | None = None, attention_mask: torch.Tensor | None = None,
             *, session: Session | None = None) -> list[GenerationResult]:
    """Generate for a batch of prompts; each sample's output equals what it gives alone (greedy)."""
    state = prefill(model, tokenizer, input_ids, images, config, policy, attention_mask, session=session)
    while not state.done:
        decode_step(state)
    return finish(state)


def _record_prefill(results: list[GenerationResult], batch: TokenBatch, keep: torch.Tensor, seconds: float) -> None:
    for i, result in enumerate(results):
        n = int(batch.lengths[i])
        is_image = batch.kinds[i, :n] == IMAGE
        result.prompt_tokens = n
        result.image_tokens = int(is_image.sum())
        result.image_tokens_kept = int((keep[i, :n] & is_image).sum())
        ids = batch.image_ids[i, :n]
        result.image_keep = [keep[i, :n][ids == img].tolist() for img in ids[is_image].unique().tolist()]
        result.prefill_seconds = seconds


def _record_cache(result: GenerationResult, cache, sample: int, num_layers: int) -> None:
    """KV bytes and output tokens kept, when the sample finishes (its row still in the cache)."""
    held = cache.generated_entries(sample)  # None unless entries could have been evicted (H2O)
    result.output_tokens_kept = sum(result.output_keep) if held is None else held
    per_entry = cache.bytes_per_entry()
    result.kv_cache_bytes = int(cache.lengths()[:, sample].sum()) * per_entry
    # dense holds every token of earlier turns, every prompt token and every generated token fed back, in every layer
    fed = result.context_tokens + result.prompt_tokens + result.output_tokens - 1
    result.kv_cache_bytes_dense = num_layers * fed * per_entry
