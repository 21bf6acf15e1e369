"""HTTP client for the controller / model-worker protocol, as the web UI uses it.

Controller: `POST /refresh_all_workers`, `POST /list_models` -> `{"models": [...]}`,
`POST /get_worker_address {"model"}` -> `{"address": "http://..."}` ("" when no worker serves it).
Worker: `POST {address}/worker_generate_stream` with the request JSON; the body is a stream of JSON
chunks separated by b"\\0", each `{"text": prompt + text so far, "error_code": 0}`, the last one with
`"stats"`; a failure is a chunk with a nonzero `error_code` and the message in `"text"`.

Every failure surfaces as `WorkerError` with a message fit to show a user, so callers never handle
httpx's exception zoo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import httpx

from .protocol import ChunkBuffer

CONNECT_TIMEOUT = 5.0  # seconds to reach a controller or worker
CONTROL_TIMEOUT = 20.0  # seconds for a controller call (refresh pings every worker)
READ_TIMEOUT = 300.0  # seconds between two streamed chunks (a CPU prefill of a big model is slow)


class WorkerError(RuntimeError):
    """The controller or a worker could not be reached or answered with an error."""


@dataclass
class StreamChunk:
    """One streamed chunk: `text` is the prompt plus everything generated so far."""

    text: str
    error_code: int = 0
    stats: dict[str, Any] | None = None

    @property
    def failed(self) -> bool:
        return self.error_code != 0


def _post_json(url: str, payload: dict[str, Any] | None = None, timeout: float = CONTROL_TIMEOUT) -> Any:
    try:
        response = httpx.post(url, json=payload or {}, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT))
    except httpx.HTTPError as error:
        raise WorkerError(f"cannot reach {url}: {error or type(error).__name__}") from error
    if response.status_code >= 400:
        raise WorkerError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")
    try:
        return response.json()
    except ValueError as error:
        raise WorkerError(f"{url} did not answer JSON: {response.text[:300]!r}") from error


def refresh_all_workers(controller: str) -> None:
    """Ask the controller to re-ping its workers (drops dead ones)."""
    _post_json(controller.rstrip("/") + "/refresh_all_workers")


def list_models(controller: str, refresh: bool = True) -> list[str]:
    """The model names the controller's workers serve, sorted; optionally refreshing first (as LLaVA does)."""
    if refresh:
        refresh_all_workers(controller)
    data = _post_json(controller.rstrip("/") + "/list_models")
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise WorkerError(f"unexpected /list_models answer from {controller}: {data!r}")
    return sorted(set(models))


def get_worker_address(controller: str, model: str) -> str:
    """The address of a worker serving `model`, or "" when none does."""
    data = _post_json(controller.rstrip("/") + "/get_worker_address", {"model": model})
    address = data.get("address") if isinstance(data, dict) else None
    if not isinstance(address, str):
        raise WorkerError(f"unexpected /get_worker_address answer from {controller}: {data!r}")
    return address


def split_chunks(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """Reassemble b"\\0"-separated chunks from arbitrary network pieces (empty chunks skipped).

    A last chunk without its b"\\0" is passed on too: whole, it parses; cut off, it fails to parse.
    """
    buffer = ChunkBuffer()
    for piece in pieces:
        yield from buffer.feed(piece)
    if buffer.rest.strip():
        yield buffer.rest


def parse_chunk(raw: bytes) -> StreamChunk:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise WorkerError(f"worker sent a malformed chunk: {raw[:200]!r}") from error
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise WorkerError(f"worker sent a chunk without text: {raw[:200]!r}")
    stats = data.get("stats")
    return StreamChunk(text=data["text"], error_code=int(data.get("error_code") or 0),
                       stats=stats if isinstance(stats, dict) else None)


def stream_generate(address: str, payload: dict[str, Any]) -> Iterator[StreamChunk]:
    """POST the request to a worker and yield its chunks as they arrive.

    An error the worker reports (a nonzero `error_code`, possibly with a 4xx/503 status) is yielded as
    a failed chunk, so the caller can show the worker's own message; an unreachable worker or a broken
    stream raises `WorkerError`.
    """
    url = address.rstrip("/") + "/worker_generate_stream"
    timeout = httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT)
    try:
        with httpx.stream("POST", url, json=payload, timeout=timeout) as response:
            got_any = False
            for raw in split_chunks(response.iter_bytes()):
                got_any = True
                try:
                    chunk = parse_chunk(raw)
                except WorkerError:
                    if response.status_code >= 400:  # e.g. a plain-text 500 page
                        raise WorkerError(f"worker answered HTTP {response.status_code}: "
                                          f"{raw[:300].decode('utf-8', 'replace')}") from None
                    raise
                if response.status_code >= 400 and not chunk.failed:
                    chunk.error_code = response.status_code
                yield chunk
            if not got_any and response.status_code >= 400:
                raise WorkerError(f"worker answered HTTP {response.status_code} with an empty body")
    except httpx.HTTPError as error:
        raise WorkerError(f"lost the worker at {address}: {error or type(error).__name__}") from error


def answer_text(chunk_text: str, prompt: str) -> str:
    """The generated part of a chunk's text (the worker echoes the prompt first)."""
    # LLaVA's rule: drop as many characters as the prompt has (the worker echoes it verbatim).
    return chunk_text[len(prompt):].strip()
