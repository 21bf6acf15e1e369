"""`python -m dynamic_llava.serve.controller`: LLaVA's controller. Keeps the registry of model workers, drops
those whose heartbeats stop, and hands out (or proxies to) a worker per request.

Dispatch among the workers serving a model: `shortest_queue` picks the smallest queue_length / speed (and
counts the request against that worker until its next heartbeat), `lottery` draws a worker with
probability proportional to its speed. A worker that refuses connections is dropped at once and the
request goes to another one.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ..errors import require_extra  # before the serve extra's imports: one message if it is missing

require_extra("fastapi", "uvicorn", "httpx", run_as_main=__name__ == "__main__")

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import UserError, run_command
from .protocol import (
    CONTROLLER_HEART_BEAT_EXPIRATION, ErrorCode, ServeError, error_chunk, read_json, split_chunks,
)

logger = logging.getLogger(__name__)

DISPATCH_METHODS = ("shortest_queue", "lottery")
_BODY_LIMIT = 100_000_000  # generation requests carry base64 images; workers apply their own limits
_REQUEST_LIMIT = 1_000_000  # bytes of any other request's JSON


@dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float


def _parse_status(status: Any) -> tuple[list[str], float, int]:
    if not isinstance(status, dict):
        raise ServeError(ErrorCode.BAD_REQUEST, "worker_status must be an object")
    names, speed, queue = status.get("model_names"), status.get("speed", 1), status.get("queue_length", 0)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ServeError(ErrorCode.BAD_REQUEST, "worker_status.model_names must be a list of strings")
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not speed > 0:
        raise ServeError(ErrorCode.BAD_REQUEST, "worker_status.speed must be a positive number")
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
        raise ServeError(ErrorCode.BAD_REQUEST, "worker_status.queue_length must be a non-negative integer")
    return names, float(speed), queue


class Controller:
    """The registry. Runs on one event loop, so it needs no locks."""

    def __init__(self, dispatch_method: str = "shortest_queue",
                 heart_beat_expiration: float = CONTROLLER_HEART_BEAT_EXPIRATION,
                 client: httpx.AsyncClient | None = None, rng: random.Random | None = None) -> None:
        if dispatch_method not in DISPATCH_METHODS:
            raise UserError(f"unknown dispatch method {dispatch_method!r} ({', '.join(DISPATCH_METHODS)})")
        self.dispatch_method = dispatch_method
        self.heart_beat_expiration = heart_beat_expiration
        self.client = client or httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=5.0))
        self.rng = rng or random.Random()
        self.workers: dict[str, WorkerInfo] = {}

    # ------------------------------------------------------------------ registry
    async def register_worker(self, worker_name: str, check_heart_beat: bool, worker_status: Any = None) -> bool:
        """Add or refresh a worker; without a status, ask the worker for it (False if it does not answer)."""
        if worker_status is None:
            worker_status = await self._fetch_status(worker_name)
            if worker_status is None:
                return False
        names, speed, queue = _parse_status(worker_status)
        self.workers[worker_name] = WorkerInfo(names, speed, queue, bool(check_heart_beat), time.monotonic())
        logger.info("registered worker %s for %s", worker_name, names)
        return True

    async def _fetch_status(self, worker_name: str) -> Any:
        try:
            response = await self.client.post(worker_name.rstrip("/") + "/worker_get_status", timeout=5.0)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as error:
            logger.warning("no status from worker %s: %s", worker_name, error or type(error).__name__)
            return None

    def remove_worker(self, worker_name: str) -> None:
        if self.workers.pop(worker_name, None) is not None:
            logger.info("removed worker %s", worker_name)

    async def refresh_all_workers(self) -> None:
        """Re-read every worker's status; those that do not answer are removed."""
        for name, info in list(self.workers.items()):
            if not await self.register_worker(name, info.check_heart_beat):
                self.remove_worker(name)

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        info = self.live_workers().get(worker_name)
        if info is None:
            return False
        info.queue_length, info.last_heart_beat = queue_length, time.monotonic()
        return True

    def live_workers(self) -> dict[str, WorkerInfo]:
        """The workers, after dropping those whose last heartbeat is older than the expiration."""
        deadline = time.monotonic() - self.heart_beat_expiration
        for name, info in list(self.workers.items()):
            if info.check_heart_beat and info.last_heart_beat < deadline:
                logger.info("worker %s missed its heartbeats", name)
                self.remove_worker(name)
        return self.workers

    def list_models(self) -> list[str]:
        return sorted({name for info in self.live_workers().values() for name in info.model_names})

    def get_worker_address(self, model: str) -> str:
        """A worker serving `model` by the dispatch method, or "" when none does."""
        candidates = [(name, info) for name, info in self.live_workers().items() if model in info.model_names]
        if not candidates:
            return ""
        if self.dispatch_method == "lottery":
            return self.rng.choices([n for n, _ in candidates], weights=[i.speed for _, i in candidates])[0]
        name, info = min(candidates, key=lambda c: c[1].queue_length / c[1].speed)
        info.queue_length += 1  # until its next heartbeat tells the truth
        return name

    async def worker_get_status(self) -> dict[str, Any]:
        """The sum over the workers that answer: model names, speed, queue length."""
        names: set[str] = set()
        speed, queue = 0.0, 0
        for worker in list(self.live_workers()):
            status = await self._fetch_status(worker)
            if status is None:
                continue
            try:
                worker_names, worker_speed, worker_queue = _parse_status(status)
            except ServeError:
                continue
            names.update(worker_names)
            speed += worker_speed
            queue += worker_queue
        return {"model_names": sorted(names), "speed": speed, "queue_length": queue}

    # ------------------------------------------------------------------ proxying
    async def open_stream(self, params: dict[str, Any]) -> httpx.Response:
        """Send a generation request to a worker and return its (streaming) response."""
        model = params.get("model")
        if not isinstance(model, str):
            raise ServeError(ErrorCode.BAD_REQUEST, "model must be a string")
        while True:
            address = self.get_worker_address(model)
            if not address:
                available = ", ".join(self.list_models()) or "none"
                raise ServeError(ErrorCode.UNKNOWN_MODEL, f"no worker serves model {model!r} (available: {available})")
            request = self.client.build_request("POST", address.rstrip("/") + "/worker_generate_stream", json=params)
            try:
                return await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                logger.warning("worker %s unreachable (%s): removed", address, error or type(error).__name__)
                self.remove_worker(address)
            except httpx.HTTPError as error:
                # connected, but the worker died (or stalled) before answering: it may have started the
                # request, so it is not sent again
                raise ServeError(ErrorCode.WORKER_LOST, f"the worker was lost before answering: "
                                 f"{error or type(error).__name__}") from None


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """The worker's chunks, whole; a worker lost mid-stream ends the stream with an error chunk."""
    try:
        async for chunk in split_chunks(response.aiter_raw()):
            yield chunk + b"\0"
    except httpx.HTTPError as error:
        yield error_chunk(ServeError(ErrorCode.WORKER_LOST, f"the worker was lost mid-request: "
                                     f"{error or type(error).__name__}"))
    finally:
        await response.aclose()


def _error_response(error: ServeError) -> Response:
    return JSONResponse({"text": error.message, "error_code": int(error.code)}, status_code=error.code.status)


def _registering_worker(data: dict[str, Any]) -> str:
    """The worker address a `register_worker` request names."""
    name = data.get("worker_name")
    if not isinstance(name, str) or not name.startswith(("http://", "https://")):
        raise ServeError(ErrorCode.BAD_REQUEST, "worker_name must be the worker's http(s) address")
    return name


def _requested_model(data: dict[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str):
        raise ServeError(ErrorCode.BAD_REQUEST, "model must be a string")
    return model


def _heart_beat(data: dict[str, Any]) -> tuple[str, int]:
    """The worker and its queue length in a `receive_heart_beat` request."""
    name, queue = data.get("worker_name"), data.get("queue_length", 0)
    if not isinstance(name, str) or isinstance(queue, bool) or not isinstance(queue, int):
        raise ServeError(ErrorCode.BAD_REQUEST, "expected worker_name (string) and queue_length (integer)")
    return name, queue


def _worker_rows(controller: Controller) -> list[dict[str, Any]]:
    """`list_workers`: each live worker, with the seconds since its last heartbeat."""
    now = time.monotonic()
    return [{"name": name, "model_names": info.model_names, "speed": info.speed, "queue_length": info.queue_length,
             "heart_beat_age": round(now - info.last_heart_beat, 3)}
            for name, info in controller.live_workers().items()]


def _add_registry_routes(app: FastAPI, controller: Controller) -> None:
    """Workers register and send heartbeats; clients list the models and workers and ask for an address."""
    @app.post("/register_worker")
    async def register_worker(request: Request) -> Response:
        try:
            data = await read_json(request, _REQUEST_LIMIT)
            name = _registering_worker(data)
            ok = await controller.register_worker(name, data.get("check_heart_beat", True), data.get("worker_status"))
        except ServeError as error:
            return _error_response(error)
        if not ok:
            return _error_response(ServeError(ErrorCode.WORKER_LOST, f"worker {name} did not answer its status"))
        return JSONResponse({"registered": True})

    @app.post("/refresh_all_workers")
    async def refresh_all_workers() -> dict[str, Any]:
        await controller.refresh_all_workers()
        return {"workers": len(controller.workers)}

    @app.post("/list_models")
    async def list_models() -> dict[str, Any]:
        return {"models": controller.list_models()}

    @app.post("/list_workers")
    async def list_workers() -> dict[str, Any]:
        return {"workers": _worker_rows(controller)}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request) -> Response:
        try:
            model = _requested_model(await read_json(request, _REQUEST_LIMIT))
        except ServeError as error:
            return _error_response(error)
        return JSONResponse({"address": controller.get_worker_address(model)})

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request) -> Response:
        try:
            name, queue = _heart_beat(await read_json(request, _REQUEST_LIMIT))
        except ServeError as error:
            return _error_response(error)
        return JSONResponse({"exist": controller.receive_heart_beat(name, queue)})


def _add_worker_api_routes(app: FastAPI, controller: Controller) -> None:
    """A model worker's own API, answered for all of them: generation proxied to one, status summed."""
    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        try:
            response = await controller.open_stream(await read_json(request, _BODY_LIMIT))
        except ServeError as error:
            return Response(error_chunk(error), status_code=error.code.status)
        return StreamingResponse(_relay(response), status_code=response.status_code,
                                 media_type="application/octet-stream")

    @app.api_route("/worker_get_status", methods=["GET", "POST"])
    async def worker_get_status() -> dict[str, Any]:
        return await controller.worker_get_status()


def create_app(controller: Controller) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await controller.client.aclose()  # the connections to the workers, at shutdown

    app = FastAPI(title="Dynamic-LLaVA controller", lifespan=lifespan)
    _add_registry_routes(app, controller)
    _add_worker_api_routes(app, controller)
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.serve.controller", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=21001)
    parser.add_argument("--dispatch-method", choices=DISPATCH_METHODS, default="shortest_queue")
    parser.add_argument("--heart-beat-expiration", type=float, default=CONTROLLER_HEART_BEAT_EXPIRATION,
                        help="seconds without a heartbeat after which a worker is dropped")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.heart_beat_expiration <= 0:
        raise UserError("--heart-beat-expiration must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    controller = Controller(args.dispatch_method, args.heart_beat_expiration)
    uvicorn.run(create_app(controller), host=args.host, port=args.port, log_level="info")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
