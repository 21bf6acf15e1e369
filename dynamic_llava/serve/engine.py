"""The batching engine behind the model worker and the OpenAI API.

Requests are prepared (images checked, prompt tokenised, limits applied) into `Job`s and queued; an
engine thread takes the oldest job plus every waiting job with the same sparsity setting (up to
`max_batch_size`) and runs them as one batch through `stream_generate`, each with its own sampling
settings. Each request reads its text as it is generated from a `Ticket`, on the server's event loop.
The model itself is never changed: sparsity is a policy object built per batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Sequence

import torch
from PIL import Image

from ..generation import GenerationConfig, GenerationResult, expanded_length, stream_generate
from ..mm_utils import count_image_placeholders, process_images, tokenizer_image_token
from ..model.llava import DynamicLlavaForCausalLM
from ..model.policy import TokenPolicy, make_policy
from ..prompting import wrap_image_tokens
from .protocol import ErrorCode, ServeError

logger = logging.getLogger(__name__)


def _bad(message: str) -> ServeError:
    return ServeError(ErrorCode.BAD_REQUEST, message)


def number(value: Any, name: str, low: float, high: float, integer: bool = False) -> float:
    """A request field as a number in [low, high] (an int if `integer`), or a 400."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        raise _bad(f"{name} must be in [{low}, {high}], got {value}")
    return value


@dataclass
class Sampling:
    """Per-request decoding settings, checked."""

    temperature: float = 0.2
    top_p: float | None = None
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()

    @classmethod
    def parse(cls, temperature: Any = 0.2, top_p: Any = None, max_new_tokens: Any = 256, stop: Any = None,
              ) -> "Sampling":
        if top_p is not None:
            top_p = number(top_p, "top_p", 0.0, 1.0)
            if top_p == 0:
                raise _bad("top_p must be > 0")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
            raise _bad("stop must be a string or a list of at most 16 strings")
        return cls(number(temperature, "temperature", 0.0, 100.0), top_p,
                   int(number(max_new_tokens, "max_new_tokens", 1, 2 ** 63, integer=True)), tuple(stop))


@dataclass(frozen=True)
class RequestSparsity:
    """One request's settings over the server's `SparsityOptions`: `sparse=False` is dense LLaVA-1.5;
    `vision_keep_rate` None = the server's."""

    sparse: bool = True
    vision_keep_rate: float | None = None

    @classmethod
    def parse(cls, sparse: Any = None, vision_keep_rate: Any = None) -> "RequestSparsity":
        if sparse is not None and not isinstance(sparse, bool):
            raise _bad(f"sparse must be true or false, got {sparse!r}")
        if vision_keep_rate is not None:
            vision_keep_rate = number(vision_keep_rate, "vision_keep_rate", 0.0, 1.0)
            if vision_keep_rate == 0:
                raise _bad("vision_keep_rate must be in (0, 1], got 0")
        return cls(True if sparse is None else sparse, vision_keep_rate)


class Ticket:
    """One request's output: deltas of text, then the result (or a ServeError), in the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[str | GenerationResult | ServeError] = asyncio.Queue()
        self._closed = False  # engine side: result or error sent
        self.result: GenerationResult | None = None

    def put(self, item: str | GenerationResult | ServeError) -> None:
        """Called from an engine thread."""
        if self._closed:
            return
        self._closed = not isinstance(item, str)
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the server's loop has shut down
            pass

    async def stream(self) -> AsyncIterator[str]:
        """The text as it is generated; afterwards `result` is set. A failure raises ServeError."""
        while True:
            item = await self._queue.get()
            if isinstance(item, str):
                yield item
            elif isinstance(item, ServeError):
                raise item
            else:
                self.result = item
                return


@dataclass(eq=False)  # compared by identity (it holds tensors)
class Job:
    prompt: str  # the request's prompt text, as sent
    input_ids: torch.Tensor
    pixel_values: torch.Tensor | None
    config: GenerationConfig
    sparsity: RequestSparsity
    ticket: Ticket | None = None

    def stats(self, result: GenerationResult) -> dict[str, Any]:
        """The efficiency stats of the final chunk / the `dynamic_llava` field."""
        return {**result.efficiency_stats(), "image_keep": result.image_keep, "finish_reason": result.finish_reason,
                "prompt_tokens": result.prompt_tokens, "max_new_tokens": self.config.max_new_tokens}


class Engine:
    def __init__(self, model: DynamicLlavaForCausalLM, tokenizer, image_processor, model_name: str, *,
                 max_batch_size: int = 8, max_queue: int = 64, max_new_tokens_limit: int = 1024,
                 concurrency: int = 1) -> None:
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.model_name = model_name
        self.context_length = int(model.config.max_position_embeddings)
        self.max_batch_size, self.max_queue, self.max_new_tokens_limit = max_batch_size, max_queue, max_new_tokens_limit
        self._batch_sizes: Counter[int] = Counter()  # batches run, by size
        self._waiting: deque[Job] = deque()
        self._running = 0
        self._closed = False
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._serve, name=f"engine-{i}", daemon=True)
                         for i in range(concurrency)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ requests
    def prepare(self, prompt: str, images: Sequence[Image.Image], sampling: Sampling, sparsity: RequestSparsity) -> Job:
        """A job for `prompt` (with one `<image>` per image); CPU work, call it off the event loop."""
        if not isinstance(prompt, str) or not prompt:
            raise _bad("prompt must be a non-empty string")
        n = count_image_placeholders(prompt)
        if n != len(images):
            raise _bad(f"the prompt has {n} <image> placeholder(s) but {len(images)} image(s) were sent")
        text = wrap_image_tokens(prompt, self.model.config.mm_use_im_start_end)
        input_ids = tokenizer_image_token(text, self.tokenizer, return_tensors="pt")
        prompt_tokens = expanded_length(self.model, input_ids)
        room = self.context_length - prompt_tokens
        if room < 1:
            raise _bad(f"the prompt is {prompt_tokens} tokens (images expanded); the context length is "
                       f"{self.context_length}: shorten the conversation")
        # Rule: ask for at most what fits; more is clamped to the server's limit and the room left.
        max_new_tokens = min(sampling.max_new_tokens, self.max_new_tokens_limit, room)
        pixels = process_images(images, self.image_processor, self.model.config.image_aspect_ratio) if images else None
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=sampling.temperature,
                                  top_p=sampling.top_p, stop_strings=sampling.stop)
        return Job(prompt, input_ids, pixels, config, sparsity)

    def submit(self, job: Job) -> Ticket:
        """Queue `job` (from the server's event loop); a full queue is a BUSY ServeError."""
        job.ticket = Ticket(asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise ServeError(ErrorCode.INTERNAL, "the server is shutting down")
            if len(self._waiting) + self._running >= self.max_queue:
                raise ServeError(ErrorCode.BUSY, f"server busy: {self.max_queue} requests are queued or running "
                                 "(the limit); retry later")
            self._waiting.append(job)
            self._cond.notify()
        return job.ticket

    def cancel(self, job: Job) -> None:
        """Drop a job whose client went away, if it has not started yet."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)

    @property
    def queue_length(self) -> int:
        """Requests waiting or running."""
        with self._cond:
            return len(self._waiting) + self._running

    def batch_sizes(self) -> dict[int, int]:
        """How many batches of each size have run."""
        with self._cond:
            return dict(sorted(self._batch_sizes.items()))

    def close(self) -> None:
        """Stop taking jobs; those still waiting are told so."""
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.ticket.put(ServeError(ErrorCode.INTERNAL, "the server is shutting down"))
            self._waiting.clear()
            self._cond.notify_all()

    # ------------------------------------------------------------------ engine threads
    def _serve(self) -> None:
        while (jobs := self._take()) is not None:
            pending = set(range(len(jobs)))
            try:
                self._generate(jobs, pending)
            except Exception as error:  # a bug or out of memory: fail these requests, keep serving
                logger.exception("generation failed")
                for i in pending:
                    jobs[i].ticket.put(ServeError(ErrorCode.INTERNAL, f"generation failed: {error}"))
            finally:
                self._leave(len(pending))

    def _leave(self, n: int) -> None:
        with self._cond:
            self._running -= n

    def _take(self) -> list[Job] | None:
        """The oldest waiting job and the next ones with the same sparsity, up to max_batch_size."""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            sparsity = self._waiting[0].sparsity
            jobs = [job for job in self._waiting if job.sparsity == sparsity][: self.max_batch_size]
            for job in jobs:
                self._waiting.remove(job)
            self._running += len(jobs)
            self._batch_sizes[len(jobs)] += 1
            return jobs

    def _generate(self, jobs: list[Job], pending: set[int]) -> None:
        """Run the batch; a request leaves `pending` (and the queue count) as it finishes."""
        finished: dict[int, GenerationResult] = {}
        stream = stream_generate(self.model, self.tokenizer, [j.input_ids for j in jobs],
                                 [j.pixel_values for j in jobs], [j.config for j in jobs],
                                 self._policy(jobs[0].sparsity), on_finish=finished.__setitem__)
        for deltas in stream:
            for i, (job, delta) in enumerate(zip(jobs, deltas)):
                if delta:
                    job.ticket.put(delta)
                if i in finished:
                    pending.discard(i)
                    self._leave(1)  # before the result goes out: its slot is free once the client has it
                    job.ticket.put(finished.pop(i))

    def _policy(self, sparsity: RequestSparsity) -> TokenPolicy:
        """The server's sparsity options (the model's load options) with this request's settings over them."""
        base = self.model.sparsity_options
        rate = base.vision_keep_rate if sparsity.vision_keep_rate is None else sparsity.vision_keep_rate
        return make_policy(self.model, replace(base, sparse=base.sparse and sparsity.sparse, vision_keep_rate=rate))
