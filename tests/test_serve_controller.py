"""The controller: dispatch, heartbeat expiry, and its HTTP API against fake workers (no model)."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from dynamic_llava.serve import controller as controller_module
from dynamic_llava.serve.controller import Controller, create_app
from dynamic_llava.serve.protocol import ErrorCode, encode_chunk
from serve_helpers import ThreadServer, free_port, read_chunks

STATUS = {"model_names": ["m"], "speed": 1, "queue_length": 0}


def _register(controller: Controller, name: str, status: dict, check_heart_beat: bool = True) -> None:
    assert asyncio.run(controller.register_worker(name, check_heart_beat, status))


def test_shortest_queue_alternates_and_prefers_short_queues() -> None:
    controller = Controller("shortest_queue")
    _register(controller, "http://a", STATUS)
    _register(controller, "http://b", STATUS)
    picks = [controller.get_worker_address("m") for _ in range(4)]
    assert picks == ["http://a", "http://b", "http://a", "http://b"]  # each pick counts against its worker
    assert controller.receive_heart_beat("http://a", 10)
    assert controller.receive_heart_beat("http://b", 0)
    assert [controller.get_worker_address("m") for _ in range(10)] == ["http://b"] * 10
    # queue / speed: a worker twice as fast may hold twice the queue
    _register(controller, "http://fast", {**STATUS, "speed": 4.0, "queue_length": 40})
    assert controller.get_worker_address("m") == "http://a"  # a, b and fast all at 10: the first registered
    assert controller.get_worker_address("nope") == ""


def test_lottery_draws_in_proportion_to_speed() -> None:
    controller = Controller("lottery", rng=random.Random(0))
    _register(controller, "http://slow", {**STATUS, "speed": 1})
    _register(controller, "http://fast", {**STATUS, "speed": 3})
    counts = Counter(controller.get_worker_address("m") for _ in range(2000))
    assert set(counts) == {"http://slow", "http://fast"}
    assert 0.7 < counts["http://fast"] / 2000 < 0.8


def test_workers_without_heartbeats_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(controller_module.time, "monotonic", lambda: now[0])
    controller = Controller(heart_beat_expiration=2.0)
    _register(controller, "http://beating", STATUS)
    _register(controller, "http://silent", {**STATUS, "model_names": ["s"]})
    _register(controller, "http://unchecked", {**STATUS, "model_names": ["u"]}, check_heart_beat=False)
    now[0] += 1.5
    assert controller.receive_heart_beat("http://beating", 0)
    now[0] += 1.5  # silent: 3 s since registration; beating: 1.5 s since its heartbeat
    assert controller.list_models() == ["m", "u"]
    assert not controller.receive_heart_beat("http://silent", 0)  # the worker then re-registers
    assert set(controller.workers) == {"http://beating", "http://unchecked"}


def test_bad_registrations_are_rejected() -> None:
    controller = Controller()
    for status in ({"model_names": "m"}, {"model_names": ["m"], "speed": 0}, {"model_names": ["m"], "queue_length": -1}):
        with pytest.raises(controller_module.ServeError):
            asyncio.run(controller.register_worker("http://x", True, status))
    with pytest.raises(Exception, match="dispatch"):
        Controller("round_robin")


def _fake_worker(name: str, die_mid_stream: bool = False) -> FastAPI:
    app = FastAPI()

    @app.post("/worker_get_status")
    async def status() -> dict:
        return {"model_names": [name], "speed": 1, "queue_length": 0}

    @app.post("/worker_generate_stream")
    async def generate(request: dict) -> StreamingResponse:
        async def chunks():
            yield encode_chunk({"text": request["prompt"] + " one", "error_code": 0})
            if die_mid_stream:
                yield b'{"text": "half a chu'
                raise RuntimeError("worker died")
            yield encode_chunk({"text": request["prompt"] + " one two", "error_code": 0, "stats": {"worker": name}})

        return StreamingResponse(chunks())

    return app


def test_http_api_proxies_retries_and_reports_lost_workers() -> None:
    with ThreadServer(create_app(Controller("shortest_queue", heart_beat_expiration=60))) as ctl, \
            ThreadServer(_fake_worker("m")) as good, ThreadServer(_fake_worker("dying", die_mid_stream=True)) as dying:
        post = lambda path, **kw: httpx.post(ctl.url + path, timeout=10, **kw)  # noqa: E731
        # registration without a status: the controller asks the worker
        assert post("/register_worker", json={"worker_name": good.url, "check_heart_beat": True}).status_code == 200
        assert post("/register_worker", json={"worker_name": dying.url, "check_heart_beat": True}).status_code == 200
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        assert post("/register_worker", json={"worker_name": dead, "check_heart_beat": True}).status_code == 502
        assert post("/register_worker", json={"worker_name": dead, "check_heart_beat": False,
                                              "worker_status": STATUS}).status_code == 200
        assert post("/list_models").json() == {"models": ["dying", "m"]}
        assert post("/receive_heart_beat", json={"worker_name": good.url, "queue_length": 3}).json() == {"exist": True}
        assert post("/receive_heart_beat", json={"worker_name": "http://x", "queue_length": 0}).json() == {"exist": False}
        assert post("/worker_get_status").json() == {"model_names": ["dying", "m"], "speed": 2.0, "queue_length": 0}

        # `dead` is picked first (queue 0 < 3), refuses the connection, is dropped; `good` answers
        response = post("/worker_generate_stream", json={"model": "m", "prompt": "P"})
        assert response.status_code == 200
        chunks = read_chunks(response)
        assert [c["text"] for c in chunks] == ["P one", "P one two"] and chunks[-1]["stats"] == {"worker": "m"}
        assert dead not in [w["name"] for w in post("/list_workers").json()["workers"]]

        lost = read_chunks(post("/worker_generate_stream", json={"model": "dying", "prompt": "P"}))
        assert lost[0] == {"text": "P one", "error_code": 0}
        assert lost[-1]["error_code"] == ErrorCode.WORKER_LOST and "lost" in lost[-1]["text"]
        assert len(lost) == 2  # the half chunk is not relayed

        unknown = post("/worker_generate_stream", json={"model": "nope", "prompt": "P"})
        assert unknown.status_code == 404 and read_chunks(unknown)[0]["error_code"] == ErrorCode.UNKNOWN_MODEL
        assert "available: dying, m" in read_chunks(unknown)[0]["text"]
        malformed = post("/worker_generate_stream", content=b"{not json")
        assert malformed.status_code == 400 and "not valid JSON" in read_chunks(malformed)[0]["text"]
        assert post("/get_worker_address", json={"model": "m"}).json() == {"address": good.url}
        assert post("/get_worker_address", json={"model": "nope"}).json() == {"address": ""}
        assert post("/get_worker_address", content=b"[]").status_code == 400
        assert post("/receive_heart_beat", json={"worker_name": 3}).status_code == 400
        assert post("/register_worker", json={"worker_name": "/etc/passwd"}).status_code == 400

    # refresh drops workers that stopped answering (both fake workers are down now)
    controller = Controller()
    with ThreadServer(create_app(controller)) as ctl:
        asyncio.run(controller.register_worker(f"http://127.0.0.1:{free_port()}", True, STATUS))
        assert httpx.post(ctl.url + "/refresh_all_workers", timeout=10).json() == {"workers": 0}
        assert json.loads(httpx.post(ctl.url + "/list_models", timeout=10).content) == {"models": []}


def test_a_worker_that_dies_before_answering_gives_a_lost_worker_error() -> None:
    """The worker accepts the connection, then closes it without a response (killed while the request was
    queued): a 502 with a WORKER_LOST chunk, not a bare 500, and the controller keeps serving."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = f"http://127.0.0.1:{listener.getsockname()[1]}"

    def accept_and_hang_up() -> None:
        for _ in range(2):
            connection, _ = listener.accept()
            connection.recv(65536)
            connection.close()

    threading.Thread(target=accept_and_hang_up, daemon=True).start()
    controller = Controller()
    asyncio.run(controller.register_worker(address, False, STATUS))
    with ThreadServer(create_app(controller)) as ctl:
        for _ in range(2):
            response = httpx.post(ctl.url + "/worker_generate_stream", json={"model": "m", "prompt": "P"}, timeout=10)
            assert response.status_code == 502
            chunk = read_chunks(response)[0]
            assert chunk["error_code"] == ErrorCode.WORKER_LOST and "before answering" in chunk["text"]
    listener.close()
