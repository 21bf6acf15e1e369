"""The web UI's parts without a browser: the protocol client against a stub HTTP server, prompt and
request building, chat state, stats and overlay rendering, and the command line's bad-input handling."""

from __future__ import annotations

import base64
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from dynamic_llava.serve import gradio_web_server as web
from dynamic_llava.serve import worker_client
from dynamic_llava.serve.worker_client import WorkerError

Route = Callable[[dict], tuple[int, bytes | list[bytes]]]


class _Stub:
    """A tiny HTTP server: `routes[path](json_body) -> (status, body or list of streamed pieces)`."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, dict]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                stub.requests.append((self.path, body))
                status, payload = stub.routes[self.path](body)
                pieces = payload if isinstance(payload, list) else [payload]
                self.send_response(status)
                self.send_header("Content-Length", str(sum(len(p) for p in pieces)))
                self.end_headers()
                for piece in pieces:
                    self.wfile.write(piece)
                    self.wfile.flush()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _json(data: dict, status: int = 200) -> Route:
    return lambda body: (status, json.dumps(data).encode())


def _chunk(data: dict) -> bytes:
    return json.dumps(data).encode() + b"\0"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STATS = {"image_tokens": 16, "image_tokens_kept": 4, "output_tokens": 10, "output_tokens_kept": 5,
         "kv_cache_bytes": 3 * 1024 * 1024, "kv_cache_bytes_dense": 4 * 1024 * 1024,
         "image_keep": [[True, False, False, False] * 4], "finish_reason": "stop"}


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (40, 20), (220, 20, 20)).save(path)
    return path


# ----------------------------------------------------------------------------- client

def test_split_chunks_reassembles_pieces_across_boundaries() -> None:
    pieces = [b'{"a"', b': 1}\0{"b": 2}', b"\0\0", b'{"c": 3}']
    assert list(worker_client.split_chunks(iter(pieces))) == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']


def test_controller_calls() -> None:
    routes = {"/refresh_all_workers": _json({}), "/list_models": _json({"models": ["zeta", "alpha", "zeta"]}),
              "/get_worker_address": lambda body: (200, json.dumps(
                  {"address": "http://w:1" if body["model"] == "alpha" else ""}).encode())}
    with _Stub(routes) as stub:
        assert worker_client.list_models(stub.url) == ["alpha", "zeta"]
        assert [path for path, _ in stub.requests] == ["/refresh_all_workers", "/list_models"]
        assert worker_client.get_worker_address(stub.url + "/", "alpha") == "http://w:1"
        assert worker_client.get_worker_address(stub.url, "beta") == ""
        assert stub.requests[-1] == ("/get_worker_address", {"model": "beta"})


def test_controller_errors_are_worker_errors() -> None:
    with pytest.raises(WorkerError, match="cannot reach"):
        worker_client.list_models(f"http://127.0.0.1:{_closed_port()}")
    with _Stub({"/list_models": _json({"detail": "boom"}, 500), "/get_worker_address": _json({"nope": 1})}) as stub:
        with pytest.raises(WorkerError, match="HTTP 500"):
            worker_client.list_models(stub.url, refresh=False)
        with pytest.raises(WorkerError, match="unexpected"):
            worker_client.get_worker_address(stub.url, "m")


def test_stream_generate_yields_chunks_and_stats() -> None:
    pieces = [_chunk({"text": "P: a", "error_code": 0}), _chunk({"text": "P: a b", "error_code": 0})[:5],
              _chunk({"text": "P: a b", "error_code": 0})[5:], _chunk({"text": "P: a b c", "error_code": 0,
                                                                       "stats": STATS})]
    with _Stub({"/worker_generate_stream": lambda body: (200, pieces)}) as stub:
        chunks = list(worker_client.stream_generate(stub.url, {"prompt": "P:"}))
        assert stub.requests == [("/worker_generate_stream", {"prompt": "P:"})]
    assert [c.text for c in chunks] == ["P: a", "P: a b", "P: a b c"]  # the split chunk arrives whole
    assert [c.stats for c in chunks] == [None, None, STATS]
    assert not any(c.failed for c in chunks)
    assert worker_client.answer_text(chunks[-1].text, "P:") == "a b c"


def test_stream_generate_reports_worker_errors() -> None:
    with _Stub({"/worker_generate_stream": lambda body: (503, _chunk({"text": "busy", "error_code": 2}))}) as stub:
        [chunk] = list(worker_client.stream_generate(stub.url, {}))
        assert chunk.failed and chunk.error_code == 2 and chunk.text == "busy"
    with _Stub({"/worker_generate_stream": lambda body: (500, b"Internal Server Error")}) as stub:
        with pytest.raises(WorkerError, match="HTTP 500: Internal Server Error"):
            list(worker_client.stream_generate(stub.url, {}))
    with _Stub({"/worker_generate_stream": lambda body: (200, b"not json\0")}) as stub:
        with pytest.raises(WorkerError, match="malformed"):
            list(worker_client.stream_generate(stub.url, {}))
    with pytest.raises(WorkerError, match="lost the worker"):
        list(worker_client.stream_generate(f"http://127.0.0.1:{_closed_port()}", {}))


# ----------------------------------------------------------------------------- prompts and state

def test_first_turn_prompt_and_request(image_file: Path) -> None:
    state, notice = web.add_turn(web.ChatState(), "  What is this?  ", str(image_file))
    assert notice is None and not state.skip_next
    request = web.build_request(state, "llava-v1.5-7b", 0.2, 0.7, 5000, 0.3, False)
    assert request["prompt"] == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is this? ASSISTANT:")
    assert request["stop"] == "</s>"
    assert base64.b64decode(request["images"][0]) == image_file.read_bytes()
    assert request["max_new_tokens"] == web.MAX_NEW_TOKENS_CAP
    assert (request["model"], request["temperature"], request["top_p"]) == ("llava-v1.5-7b", 0.2, 0.7)
    assert (request["vision_keep_rate"], request["sparse"]) == (0.3, False)


def test_multi_turn_prompt_template_from_model_name(image_file: Path) -> None:
    state, _ = web.add_turn(web.ChatState(), "Describe <image> please", str(image_file))
    state.turns[0].answer = "A red box."
    state, _ = web.add_turn(state, "bad", None)
    state.turns[-1].answer, state.turns[-1].error = "worker crashed", True  # failed: not sent again
    state, _ = web.add_turn(state, "And its colour?", None)
    v1 = web.build_request(state, "dynamic-llava-7b", 0.0, 1.0, 64, 0.2, True)["prompt"]
    # LLaVA moves a typed <image> of the first message to the front (the double space is LLaVA's too)
    assert v1.endswith(" USER: <image>\nDescribe  please ASSISTANT: A red box.</s>USER: And its colour? ASSISTANT:")
    assert "bad" not in v1 and "crashed" not in v1
    llama2 = web.build_request(state, "llava-llama-2-13b", 0.0, 1.0, 64, 0.2, True)
    assert llama2["prompt"].startswith("[INST] <<SYS>>\n")
    assert llama2["prompt"].endswith("[INST] And its colour? [/INST]")
    assert llama2["stop"] == "</s>"
    v0 = web.build_request(state, "llava-v0-7b", 0.0, 1.0, 64, 0.2, True)
    assert v0["prompt"].endswith("questions.###Human: <image>\nDescribe  please###Assistant: A red box.###"
                                 "Human: And its colour?###Assistant:")
    assert v0["stop"] == "###"


def test_text_only_chat_sends_no_image() -> None:
    state, _ = web.add_turn(web.ChatState(), "hi", None)
    request = web.build_request(state, "m", 0.2, 0.7, 8, 0.2, True)
    assert request["images"] == [] and "<image>" not in request["prompt"]


def test_add_turn_rules(image_file: Path, tmp_path: Path) -> None:
    state, notice = web.add_turn(web.ChatState(), "   ", None)
    assert state.skip_next and notice and not state.turns
    state, _ = web.add_turn(web.ChatState(), "q1", str(image_file))
    state.turns[0].answer = "a1"
    same, notice = web.add_turn(state, "q2", str(image_file))  # same image again: same conversation
    assert notice is None and len(same.turns) == 2
    other = tmp_path / "other.png"
    Image.new("RGB", (8, 8)).save(other)
    fresh, notice = web.add_turn(same, "q3", str(other))
    assert "new conversation" in notice
    assert fresh.image_path == str(other) and [t.question for t in fresh.turns] == ["q3"]
    long, notice = web.add_turn(web.ChatState(), "x" * 5000, None)
    assert len(long.turns[0].question) == web.MAX_QUESTION_CHARS and "cut" in notice


def test_chat_messages(image_file: Path) -> None:
    state, _ = web.add_turn(web.ChatState(), "q1", str(image_file))
    state.turns[0].answer = "a1"
    state, _ = web.add_turn(state, "q2", None)
    messages = web.chat_messages(state)
    assert messages[0] == {"role": "user", "content": [{"path": str(image_file)}, "q1"]}
    assert messages[1:] == [{"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                            {"role": "assistant", "content": web.CURSOR}]
    state.turns[-1].answer, state.turns[-1].error = "boom", True
    assert "Error" in web.chat_messages(state)[-1]["content"] and "boom" in web.chat_messages(state)[-1]["content"]


def test_format_stats() -> None:
    text = web.format_stats(STATS, sparse=True)
    assert "4 / 16 (25.0%)" in text
    assert "5 / 10 (50.0%)" in text
    assert "3.0 MB / 4.0 MB (75.0%)" in text
    assert "stop" in text and "sparse" in text
    assert "dense" in web.format_stats({**STATS, "image_tokens_kept": 16}, sparse=False)
    assert "no image" in web.format_stats({**STATS, "image_tokens": 0, "image_tokens_kept": 0}, sparse=True)


def test_overlay_greys_dropped_patches(tmp_path: Path) -> None:
    path = tmp_path / "square.png"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(path)
    state = web.ChatState(image_path=str(path))
    keep = [True, False, False, True]  # 2x2 grid: top-left and bottom-right kept
    overlay = np.asarray(web.overlay_for(state, {"image_keep": [keep]}), dtype=np.int16)
    assert overlay.shape == (336, 336, 3)
    red = np.array([220, 20, 20])
    assert np.abs(overlay[80, 80] - red).max() < 5 and np.abs(overlay[250, 250] - red).max() < 5
    assert np.abs(overlay[80, 250] - red).max() > 60 and np.abs(overlay[250, 80] - red).max() > 60
    assert web.overlay_for(state, {"image_keep": [[True] * 3]}) is None  # not a square grid
    assert web.overlay_for(web.ChatState(), {"image_keep": [keep]}) is None


# ----------------------------------------------------------------------------- a whole answer

def _run(routes: dict[str, Route], image_file: Path) -> tuple[web.ChatState, list[web.Update], list, list]:
    """One answer against a stub controller+worker: final state, updates, requests, answer after each update."""
    state, _ = web.add_turn(web.ChatState(), "What?", str(image_file))
    with _Stub(routes) as stub:
        routes.setdefault("/get_worker_address", _json({"address": stub.url}))
        updates, answers = [], []
        for update in web.stream_answer(stub.url, state, "tiny-model", 0.2, 0.7, 16, 0.25, True):
            updates.append(update)
            answers.append(update.state.turns[-1].answer)
        return state, updates, stub.requests, answers


def test_stream_answer_success(image_file: Path) -> None:
    prompt = web.build_request(web.add_turn(web.ChatState(), "What?", str(image_file))[0], "tiny-model",
                               0.2, 0.7, 16, 0.25, True)["prompt"]
    stats = {**STATS, "image_keep": [[True] * 16]}
    chunks = [_chunk({"text": prompt + " red", "error_code": 0}),
              _chunk({"text": prompt + " red box", "error_code": 0, "stats": stats})]
    state, updates, requests, answers = _run({"/worker_generate_stream": lambda body: (200, chunks)}, image_file)
    sent = requests[-1][1]
    assert sent["prompt"] == prompt and sent["vision_keep_rate"] == 0.25 and len(sent["images"]) == 1
    assert state.turns[0].answer == "red box" and not state.turns[0].error
    assert updates[-1].done and "4 / 16" in updates[-1].stats
    assert updates[-1].overlay is not None and updates[-1].overlay.size == (336, 336)
    assert answers == [None, "red" + web.CURSOR, "red box" + web.CURSOR, "red box"]  # streamed, then final


def test_stream_answer_errors_become_the_answer(image_file: Path) -> None:
    state, updates, _, _ = _run({"/worker_generate_stream": lambda body: (
        503, _chunk({"text": "Model worker is overloaded", "error_code": 1}))}, image_file)
    assert state.turns[0].error and "overloaded" in state.turns[0].answer
    assert updates[-1].done and updates[-1].overlay is None
    state, _, _, _ = _run({"/get_worker_address": _json({"address": ""})}, image_file)
    assert state.turns[0].error and "No worker serves" in state.turns[0].answer
    dead = f"http://127.0.0.1:{_closed_port()}"
    state, _, _, _ = _run({"/get_worker_address": _json({"address": dead})}, image_file)
    assert state.turns[0].error and "lost the worker" in state.turns[0].answer
    empty = web.add_turn(web.ChatState(), "q", None)[0]
    [update] = web.stream_answer("http://127.0.0.1:1", empty, None, 0.2, 0.7, 8, 0.2, True)
    assert update.done and "No model" in empty.turns[0].answer


# ----------------------------------------------------------------------------- command line

def _main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = web.main(list(argv))
    return code, capsys.readouterr().err


def test_cli_bad_input(capsys: pytest.CaptureFixture) -> None:
    code, err = _main(capsys, "--controller", "localhost:21001")
    assert code == 2 and err.startswith("error: --controller must be an http")
    code, err = _main(capsys, "--controller", "http://127.0.0.1:1", "--concurrency-count", "0")
    assert code == 2 and "--concurrency-count" in err
    code, err = _main(capsys, "--controller", "http://127.0.0.1:1", "--port", "70000")
    assert code == 2 and "--port" in err
    code, err = _main(capsys, "--controller", f"http://127.0.0.1:{_closed_port()}", "--share")
    assert code == 2
    assert "--share is not available offline" in err
    assert "error: cannot get the model list from the controller" in err
    with pytest.raises(SystemExit) as exit_info:
        web.main(["--model-list-mode", "sometimes"])
    assert exit_info.value.code == 2
