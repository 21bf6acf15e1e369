"""The OpenAI-compatible API in-process (uvicorn in a thread) on the tiny checkpoint, driven by the official
`openai` client and by raw HTTP for the bad inputs."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import httpx
import openai
import pytest
from PIL import Image

from dynamic_llava.generation import GenerationConfig, expanded_length, generate
from dynamic_llava.mm_utils import tokenizer_image_token
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.prompting import prepare_request
from dynamic_llava.serve.engine import Engine
from dynamic_llava.serve.images import ImageLimits
from dynamic_llava.serve.openai_api import ApiSettings, create_app
from serve_helpers import ThreadServer, png_base64

MODEL = "tiny"
KEY = "s3cret"
IMAGE = Image.new("RGB", (48, 32), (30, 120, 200))
LIMITS = ImageLimits(max_bytes=200_000, max_pixels=1_000_000, fetch_timeout=5.0)


def _data_url(b64: str) -> str:
    return "data:image/png;base64," + b64


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    files = {"/ok.png": _png_bytes(IMAGE), "/big.png": b"\x89PNG" + b"0" * 300_000}

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = self.files.get(self.path)
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def api(tiny_llava_dir):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_llava_dir)
    engine = Engine(model, tokenizer, processor, MODEL, max_batch_size=8, max_queue=32, max_new_tokens_limit=16)
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    open_app = create_app(engine, ApiSettings("llava_v1", limits=LIMITS))
    locked_app = create_app(engine, ApiSettings("llava_v1", api_key=KEY, allow_http_images=True, limits=LIMITS))
    try:
        with ThreadServer(open_app) as open_server, ThreadServer(locked_app) as locked_server:
            yield {"engine": engine, "open": open_server.url, "locked": locked_server.url,
                   "images": f"http://127.0.0.1:{images.server_address[1]}", "tokenizer": tokenizer, "model": model,
                   "processor": processor}
    finally:
        images.shutdown()
        engine.close()


def _user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def _expected(api, question: str, max_new_tokens: int) -> str:
    """The answer `ask` would give (prepare_request + generate): the API must build the same prompt."""
    request = prepare_request(question, [IMAGE], api["tokenizer"], api["processor"], api["model"].config, "llava_v1")
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_strings=[request.stop])
    return generate(api["model"], api["tokenizer"], [request.input_ids], [request.pixel_values], config)[0].text


def test_models_and_a_round_trip_with_the_openai_client(api) -> None:
    client = openai.OpenAI(base_url=api["open"] + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    completion = client.chat.completions.create(model=MODEL, messages=_user("What is it?", _data_url(png_base64())),
                                                max_tokens=6, temperature=0)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == _expected(api, "What is it?", 6)
    assert choice.finish_reason in ("stop", "length")
    stats = completion.model_extra["dynamic_llava"]
    assert stats["image_tokens"] == 576 and stats["image_tokens_kept"] == 115
    usage = completion.usage
    assert usage.prompt_tokens == stats["prompt_tokens"] > 576  # image tokens counted expanded
    assert usage.completion_tokens == stats["output_tokens"] and usage.total_tokens == usage.prompt_tokens + \
        usage.completion_tokens


def test_streaming_with_the_openai_client_and_sparsity_in_extra_body(api) -> None:
    client = openai.OpenAI(base_url=api["open"] + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=_user("Describe it.", _data_url(png_base64())),
                                            max_tokens=10, temperature=0, stream=True,
                                            extra_body={"vision_keep_rate": 0.5})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(model=MODEL, messages=_user("Describe it.", _data_url(png_base64())),
                                           max_tokens=10, temperature=0, extra_body={"vision_keep_rate": 0.5})
    assert text == whole.choices[0].message.content
    final = chunks[-1]
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.model_extra["dynamic_llava"]["image_tokens_kept"] == 288
    assert final.usage.completion_tokens == final.model_extra["dynamic_llava"]["output_tokens"]
    dense = client.chat.completions.create(model=MODEL, messages=_user("Describe it.", _data_url(png_base64())),
                                           max_tokens=3, temperature=0, extra_body={"sparse": False})
    stats = dense.model_extra["dynamic_llava"]
    assert stats["image_tokens_kept"] == 576 and stats["kv_cache_bytes"] == stats["kv_cache_bytes_dense"]


def test_multi_turn_messages_and_system_prompt_build_the_llava_prompt(api) -> None:
    response = httpx.post(api["open"] + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 2, "temperature": 0, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(png_base64())}},
                                         {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "And its colour?"}]})
    assert response.status_code == 200
    # the system text, "<image>\n" before the question, the earlier answer, the new question: llava_v1 renders
    prompt = "Be brief. USER: <image>\nWhat is it? ASSISTANT: A square.</s>USER: And its colour? ASSISTANT:"
    ids = tokenizer_image_token(prompt, api["tokenizer"])
    assert response.json()["usage"]["prompt_tokens"] == expanded_length(api["model"], ids) == len(ids) + 575


def test_api_key_is_required_when_set(api) -> None:
    no_key = openai.OpenAI(base_url=api["locked"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.models.list()
    assert httpx.get(api["locked"] + "/v1/models").status_code == 401
    client = openai.OpenAI(base_url=api["locked"] + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]


def test_http_image_urls_only_when_allowed_and_within_limits(api) -> None:
    ok, big, missing = (api["images"] + p for p in ("/ok.png", "/big.png", "/nope.png"))
    body = {"model": MODEL, "max_tokens": 2, "temperature": 0}
    refused = httpx.post(api["open"] + "/v1/chat/completions", json={**body, "messages": _user("Hi?", ok)}, timeout=60)
    assert refused.status_code == 400 and "not fetched" in refused.json()["error"]["message"]
    auth = {"Authorization": f"Bearer {KEY}"}
    fetched = httpx.post(api["locked"] + "/v1/chat/completions", json={**body, "messages": _user("Hi?", ok)},
                         headers=auth, timeout=60)
    assert fetched.status_code == 200 and fetched.json()["dynamic_llava"]["image_tokens"] == 576
    for url, message in ((big, "limit of 200000 bytes"), (missing, "HTTP 404")):
        response = httpx.post(api["locked"] + "/v1/chat/completions", json={**body, "messages": _user("Hi?", url)},
                              headers=auth, timeout=60)
        assert response.status_code == 400 and message in response.json()["error"]["message"]


def _noise_png(size: tuple[int, int]) -> str:
    import os

    return base64.b64encode(_png_bytes(Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)))).decode()


BAD = [
    ("malformed JSON", b'{"model": ', 400, "not valid JSON"),
    ("unknown model", {"model": "gpt-17"}, 404, "not served here"),
    ("no messages", {"messages": []}, 400, "messages must be"),
    ("bad role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "role"),
    ("ends with the assistant", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "end with a user message"),
    ("bad base64", {"messages": _user("x", "data:image/png;base64,@@@")}, 400, "not valid base64"),
    ("non-image bytes", {"messages": _user("x", _data_url(base64.b64encode(b"plain text").decode()))}, 400,
     "not a recognised image format"),
    ("too many pixels", {"messages": _user("x", _data_url(base64.b64encode(
        _png_bytes(Image.new("RGB", (1200, 1000)))).decode()))}, 400, "1200x1000 pixels"),
    ("too many bytes", {"messages": _user("x", _data_url(_noise_png((300, 300))))}, 400, "limit of 200000 bytes"),
    ("a file path as URL", {"messages": _user("x", "/etc/passwd")}, 400, "data:image"),
    ("more images than placeholders", {"messages": _user("<image> x", *[_data_url(png_base64())] * 2)}, 400,
     "1 <image> placeholder(s) but 2"),
    ("beyond the context", {"messages": _user("x", *[_data_url(png_base64())] * 8)}, 400, "context length is 4096"),
    ("max_tokens 0", {"max_tokens": 0}, 400, "max_new_tokens"),
    ("max_tokens text", {"max_tokens": "many"}, 400, "integer"),
    ("n = 2", {"n": 2}, 400, "n = 1"),
    ("vision_keep_rate 0", {"vision_keep_rate": 0}, 400, "vision_keep_rate"),
    ("body too large", b"x" * 1_700_000, 413, "limit"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_a_4xx_in_openai_error_format(api, case) -> None:
    _, body, status, message = case
    if isinstance(body, bytes):
        kwargs = {"content": body}
    else:
        kwargs = {"json": {"model": MODEL, "messages": _user("What?"), "max_tokens": 2, **body}}
    response = httpx.post(api["open"] + "/v1/chat/completions", timeout=60, **kwargs)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]


def test_absurd_max_tokens_are_clamped_and_the_server_still_serves(api) -> None:
    client = openai.OpenAI(base_url=api["open"] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=-5)
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=10 ** 12, temperature=0)
    assert completion.model_extra["dynamic_llava"]["max_new_tokens"] == 16  # the engine's limit
    assert completion.usage.completion_tokens <= 16 and completion.usage.prompt_tokens > 0


def test_stream_of_server_sent_events_ends_with_done(api) -> None:
    with httpx.stream("POST", api["open"] + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": _user("Hi"), "max_tokens": 3, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][6:])
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in final
