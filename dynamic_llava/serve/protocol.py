"""The controller / worker wire format (LLaVA's, from FastChat) and the errors every server answers with.

Bodies are JSON. A generation streams JSON chunks separated by b"\\0", each `{"text": prompt + text so
far, "error_code": 0}`, the last one with `"stats"`. A failure is a chunk `{"text": message,
"error_code": code}`; the HTTP status is `code // 100` when the failure is known before streaming.
"""

from __future__ import annotations

import json
from enum import IntEnum
from typing import Any, AsyncIterator

from starlette.requests import Request

WORKER_HEART_BEAT_INTERVAL = 15.0  # seconds between a worker's heartbeats (LLaVA's value)
CONTROLLER_HEART_BEAT_EXPIRATION = 90.0  # a worker silent this long is dropped (LLaVA's value)


class ErrorCode(IntEnum):
    BAD_REQUEST = 40001  # malformed JSON, bad field, bad image, prompt too long
    UNAUTHORIZED = 40101
    UNKNOWN_MODEL = 40401
    REQUEST_TOO_LARGE = 41301
    INTERNAL = 50001
    WORKER_LOST = 50201  # the worker went away mid-request
    BUSY = 50301  # the worker's queue is full: retry later

    @property
    def status(self) -> int:
        return int(self) // 100


class ServeError(Exception):
    """A failure with a message fit to show the client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode_chunk(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\0"


def error_chunk(error: ServeError) -> bytes:
    return encode_chunk({"text": error.message, "error_code": int(error.code)})


class ChunkBuffer:
    """Reassembles whole b"\\0"-terminated chunks (without the b"\\0", empty ones skipped) from arbitrary
    network pieces; `rest` holds the incomplete tail."""

    def __init__(self) -> None:
        self.rest = b""

    def feed(self, piece: bytes) -> list[bytes]:
        *complete, self.rest = (self.rest + piece).split(b"\0")
        return [chunk for chunk in complete if chunk.strip()]


async def split_chunks(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Whole chunks from arbitrary network pieces; a trailing incomplete chunk is dropped (the sender
    died mid-chunk)."""
    buffer = ChunkBuffer()
    async for piece in pieces:
        for chunk in buffer.feed(piece):
            yield chunk


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object, read at most `max_bytes` far (a ServeError otherwise)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ServeError(ErrorCode.REQUEST_TOO_LARGE, f"request body is {declared} bytes; the limit is {max_bytes}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise ServeError(ErrorCode.REQUEST_TOO_LARGE, f"request body exceeds the limit of {max_bytes} bytes")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise ServeError(ErrorCode.BAD_REQUEST, f"request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ServeError(ErrorCode.BAD_REQUEST, "request body must be a JSON object")
    return data
