"""`python -m dynamic_llava.serve.openai_api`: an OpenAI-compatible chat API over one model, in-process.

`GET /v1/models`, `POST /v1/chat/completions` (streaming as server-sent events, or not). Message content
is a string or a list of `{"type": "text"}` / `{"type": "image_url"}` parts; images are data URLs (http(s)
URLs only with --allow-http-images). The prompt is built with the LLaVA conversation template, images
placed by the `<image>` rule of prompting.py. Extra body fields `vision_keep_rate` and `sparse` set the
sparsification; every response carries the efficiency stats as `dynamic_llava`. Requests go through the
same batching engine as the model worker.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ..errors import require_extra  # before the serve extra's imports: one message if it is missing

require_extra("fastapi", "uvicorn", "httpx", run_as_main=__name__ == "__main__")

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..conversation import get_conv_template, stop_string
from ..errors import UserError, run_command
from ..mm_utils import count_image_placeholders
from ..prompting import ASSISTANT, USER, Turn, image_query, infer_conv_mode, render_conversation
from .engine import Engine, Job, RequestSparsity, Sampling
from .images import ImageLimits, decode_base64_image, fetch_image
from .options import add_model_arguments, image_limits, load_engine
from .protocol import ErrorCode, ServeError, read_json

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 503: "server_busy"}


@dataclass
class ApiSettings:
    conv_mode: str
    api_key: str | None = None
    allow_http_images: bool = False
    limits: ImageLimits = ImageLimits()
    default_max_tokens: int = 512


def _bad(message: str) -> ServeError:
    return ServeError(ErrorCode.BAD_REQUEST, message)


def _field(body: dict[str, Any], name: str, default: Any) -> Any:
    value = body.get(name)
    return default if value is None else value


def error_body(error: ServeError) -> dict[str, Any]:
    status = error.code.status
    return {"error": {"message": error.message, "type": _ERROR_TYPES.get(status, "server_error"), "param": None,
                      "code": int(error.code)}}


# ---------------------------------------------------------------------- messages -> prompt
async def _content(content: Any, settings: ApiSettings, client: httpx.AsyncClient, first_image: int
                   ) -> tuple[str, list[Image.Image]]:
    """A message's text (parts joined by newlines) and its images, in order."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _bad("message content must be a string or a list of parts")
    texts, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            label = f"image {first_image + len(images)}"
            if not isinstance(url, str):
                raise _bad(f"{label}: image_url must be {{'url': 'data:image/...;base64,...'}}")
            if url.startswith("data:"):
                images.append(await run_in_threadpool(decode_base64_image, url, settings.limits, label))
            elif url.lower().startswith(("http://", "https://")):
                if not settings.allow_http_images:
                    raise _bad(f"{label}: image URLs are not fetched by this server; send a data URL "
                               "(data:image/png;base64,...)")
                images.append(await fetch_image(url, settings.limits, client, label))
            else:
                raise _bad(f"{label}: the URL must be a data:image/...;base64 URL")
        else:
            raise _bad("each content part must be {'type': 'text', 'text': ...} or {'type': 'image_url', ...}")
    return "\n".join(texts), images


async def build_prompt(messages: Any, settings: ApiSettings, client: httpx.AsyncClient
                       ) -> tuple[str, list[Image.Image], str]:
    """(prompt, images, the template's stop string) for OpenAI chat messages."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list")
    system: str | None = None  # the template's unless a system message replaces it
    turns: list[Turn] = []  # consecutive messages of one role are joined
    images: list[Image.Image] = []
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise _bad("each message needs a role: system, user or assistant")
        text, message_images = await _content(message.get("content") or "", settings, client, len(images))
        if role == "system":
            if message_images:
                raise _bad("system messages cannot hold images")
            system = text
            continue
        if message_images and role != "user":
            raise _bad("only user messages can hold images")
        if message_images:
            placeholders = count_image_placeholders(text)
            if placeholders and placeholders != len(message_images):
                raise _bad(f"a message has {placeholders} <image> placeholder(s) but {len(message_images)} image(s)")
            text = image_query(text, len(message_images), mm_use_im_start_end=False)  # the engine adds start/end
        images += message_images
        speaker = USER if role == "user" else ASSISTANT
        if turns and turns[-1][0] == speaker:
            turns[-1] = (speaker, f"{turns[-1][1]}\n{text}")
        else:
            turns.append((speaker, text))
    if not turns or turns[0][0] != USER or turns[-1][0] != USER:
        raise _bad("the conversation must start and end with a user message")
    conv = render_conversation(settings.conv_mode, [*turns, (ASSISTANT, None)], system)
    return conv.get_prompt(), images, stop_string(conv)


# ---------------------------------------------------------------------- responses
def _usage(job: Job) -> dict[str, int]:
    result = job.ticket.result
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.output_tokens,
            "total_tokens": result.prompt_tokens + result.output_tokens}


async def _events(engine: Engine, job: Job, model: str, completion_id: str, created: int) -> AsyncIterator[bytes]:
    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    try:
        yield event({"role": "assistant", "content": ""})
        async for delta in job.ticket.stream():
            yield event({"content": delta})
        result = job.ticket.result
        yield event({}, _FINISH[result.finish_reason], usage=_usage(job), dynamic_llava=job.stats(result))
    except ServeError as error:
        yield f"data: {json.dumps(error_body(error))}\n\n".encode()
    finally:
        engine.cancel(job)
    yield b"data: [DONE]\n\n"


def create_app(engine: Engine, settings: ApiSettings) -> FastAPI:
    get_conv_template(settings.conv_mode)  # an unknown template fails at start, not per request
    client = httpx.AsyncClient(timeout=settings.limits.fetch_timeout, limits=httpx.Limits(max_connections=8))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="Dynamic-LLaVA OpenAI-compatible API", lifespan=lifespan)
    body_limit = 8 * settings.limits.max_bytes

    def fail(error: ServeError) -> Response:
        return JSONResponse(error_body(error), status_code=error.code.status)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise ServeError(ErrorCode.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer <key>)")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            check_key(request)
        except ServeError as error:
            return fail(error)
        return JSONResponse({"object": "list", "data": [
            {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "dynamic_llava"}]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            check_key(request)
            body = await read_json(request, body_limit)
            if body.get("model") != engine.model_name:
                raise ServeError(ErrorCode.UNKNOWN_MODEL, f"model {body.get('model')!r} is not served here "
                                 f"(available: {engine.model_name})")
            if _field(body, "n", 1) != 1:
                raise _bad("only n = 1 is supported")
            prompt, images, template_stop = await build_prompt(body.get("messages"), settings, client)
            max_tokens = _field(body, "max_completion_tokens", _field(body, "max_tokens", settings.default_max_tokens))
            sampling = Sampling.parse(_field(body, "temperature", 1.0), body.get("top_p"), max_tokens, body.get("stop"))
            sampling.stop += (template_stop,)
            sparsity = RequestSparsity.parse(body.get("sparse"), body.get("vision_keep_rate"))
            job = await run_in_threadpool(engine.prepare, prompt, images, sampling, sparsity)
            engine.submit(job)
        except ServeError as error:
            return fail(error)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            return StreamingResponse(_events(engine, job, engine.model_name, completion_id, created),
                                     media_type="text/event-stream")
        try:
            async for _ in job.ticket.stream():
                pass
        except ServeError as error:
            return fail(error)
        finally:
            engine.cancel(job)
        result = job.ticket.result
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": engine.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": _FINISH[result.finish_reason]}],
            "usage": _usage(job), "dynamic_llava": job.stats(result)})

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.serve.openai_api", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: the "
                        "DYNAMIC_LLAVA_API_KEY environment variable; unset: no key needed)")
    parser.add_argument("--allow-http-images", action="store_true",
                        help="fetch http(s) image URLs (the server then makes requests on clients' behalf)")
    parser.add_argument("--conv-mode", default=None, help="template (default: inferred from the model name)")
    parser.add_argument("--default-max-tokens", type=int, default=512, help="when a request gives no max_tokens")
    add_model_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.default_max_tokens < 1:
        raise UserError("--default-max-tokens must be >= 1")
    api_key = args.api_key or os.environ.get("DYNAMIC_LLAVA_API_KEY") or None
    limits = image_limits(args)
    if args.conv_mode is not None:
        get_conv_template(args.conv_mode)  # fail before loading the model
    engine = load_engine(args)
    settings = ApiSettings(args.conv_mode or infer_conv_mode(engine.model_name), api_key, args.allow_http_images,
                           limits, args.default_max_tokens)
    try:
        uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="info")
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
