"""`python -m dynamic_llava.serve.model_worker`: one model behind LLaVA's worker protocol, batched and sparsified.

Registers with the controller and keeps sending heartbeats; `POST /worker_generate_stream` takes LLaVA's
request JSON (`model`, `prompt` with `<image>` placeholders, `images` as base64, `temperature`, `top_p`,
`max_new_tokens`, `stop`, and here also `vision_keep_rate`, `sparse`) and streams b"\\0"-separated chunks
whose last one carries the efficiency stats (see protocol.py and docs/SERVING.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import Any, AsyncIterator

from ..errors import require_extra  # before the serve extra's imports: one message if it is missing

require_extra("fastapi", "uvicorn", "httpx", run_as_main=__name__ == "__main__")

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import UserError, run_command
from ..model.policy import describe_sparsity
from .engine import Engine, Job, RequestSparsity, Sampling
from .images import ImageLimits, decode_base64_image
from .options import add_model_arguments, gpu_devices, image_limits, load_engine
from .protocol import WORKER_HEART_BEAT_INTERVAL, ErrorCode, ServeError, encode_chunk, error_chunk, read_json

logger = logging.getLogger(__name__)


def _field(params: dict[str, Any], name: str, default: Any) -> Any:
    value = params.get(name)
    return default if value is None else value


def make_job(engine: Engine, params: dict[str, Any], limits: ImageLimits) -> Job:
    """The job for one worker request (LLaVA's defaults for missing fields)."""
    model = params.get("model")
    if model is not None and model != engine.model_name:
        raise ServeError(ErrorCode.UNKNOWN_MODEL, f"this worker serves {engine.model_name!r}, not {model!r}")
    images = _field(params, "images", [])
    if not isinstance(images, list):
        raise ServeError(ErrorCode.BAD_REQUEST, "images must be a list of base64 strings")
    decoded = [decode_base64_image(image, limits, f"image {i}") for i, image in enumerate(images)]
    sampling = Sampling.parse(_field(params, "temperature", 1.0), _field(params, "top_p", 1.0),
                              _field(params, "max_new_tokens", 256), params.get("stop"))
    sparsity = RequestSparsity.parse(params.get("sparse"), params.get("vision_keep_rate"))
    return engine.prepare(params.get("prompt"), decoded, sampling, sparsity)


def worker_status(engine: Engine) -> dict[str, Any]:
    return {"model_names": [engine.model_name], "speed": 1, "queue_length": engine.queue_length}


async def _chunks(engine: Engine, job: Job) -> AsyncIterator[bytes]:
    text = job.prompt
    try:
        async for delta in job.ticket.stream():
            text += delta
            yield encode_chunk({"text": text, "error_code": 0})
        result = job.ticket.result
        yield encode_chunk({"text": job.prompt + result.text, "error_code": 0, "stats": job.stats(result)})
    except ServeError as error:
        yield error_chunk(error)
    finally:
        engine.cancel(job)  # the client left before the job started


def create_app(engine: Engine, limits: ImageLimits) -> FastAPI:
    app = FastAPI(title="Dynamic-LLaVA model worker")
    body_limit = 8 * limits.max_bytes  # a few base64 images plus the prompt

    @app.post("/worker_generate_stream")
    async def generate_stream(request: Request) -> Response:
        try:
            params = await read_json(request, body_limit)
            job = await run_in_threadpool(make_job, engine, params, limits)
            engine.submit(job)
        except ServeError as error:
            return Response(error_chunk(error), status_code=error.code.status)
        return StreamingResponse(_chunks(engine, job), media_type="application/octet-stream")

    @app.api_route("/worker_get_status", methods=["GET", "POST"])
    async def get_status() -> dict[str, Any]:
        return worker_status(engine)

    @app.api_route("/model_details", methods=["GET", "POST"])
    async def model_details() -> dict[str, Any]:
        return {"model_name": engine.model_name, "context_length": engine.context_length,
                "sparse_config": describe_sparsity(engine.model), "max_batch_size": engine.max_batch_size,
                "max_queue": engine.max_queue, "max_new_tokens_limit": engine.max_new_tokens_limit,
                "batch_sizes": {str(size): count for size, count in engine.batch_sizes().items()}}

    return app


class Heartbeat:
    """Registers the worker once its server is up, then sends heartbeats; re-registers when the controller
    has forgotten it (restarted, or expired us) and retries while it is unreachable."""

    def __init__(self, controller: str, worker_address: str, engine: Engine, interval: float) -> None:
        self.controller, self.worker_address = controller.rstrip("/"), worker_address
        self.engine, self.interval = engine, interval

    def start(self, server: uvicorn.Server) -> None:
        threading.Thread(target=self._run, args=(server,), name="heartbeat", daemon=True).start()

    def _run(self, server: uvicorn.Server) -> None:
        while not server.started:  # register only once requests can be served
            if server.should_exit:
                return
            time.sleep(0.05)
        registered = False
        with httpx.Client(timeout=5.0) as client:
            while not server.should_exit:
                try:
                    if registered:
                        answer = client.post(f"{self.controller}/receive_heart_beat", json={
                            "worker_name": self.worker_address, "queue_length": self.engine.queue_length})
                        registered = bool(answer.json().get("exist"))
                        if not registered:
                            continue  # re-register now
                    else:
                        client.post(f"{self.controller}/register_worker", json={
                            "worker_name": self.worker_address, "check_heart_beat": True,
                            "worker_status": worker_status(self.engine)}).raise_for_status()
                        registered = True
                        logger.info("registered with the controller at %s", self.controller)
                except (httpx.HTTPError, ValueError, AttributeError) as error:
                    logger.warning("controller %s unreachable: %s", self.controller, error or type(error).__name__)
                    registered = False
                time.sleep(self.interval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.serve.model_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=21002)
    parser.add_argument("--worker-address", "--worker", default=None,
                        help="URL the controller and clients reach this worker at (default http://127.0.0.1:PORT; "
                             "required with --host 0.0.0.0)")
    parser.add_argument("--controller-address", "--controller", default="http://127.0.0.1:21001")
    parser.add_argument("--heart-beat-interval", type=float, default=WORKER_HEART_BEAT_INTERVAL,
                        help="seconds between heartbeats (keep it well below the controller's expiration)")
    parser.add_argument("--no-register", action="store_true", help="do not register with a controller")
    parser.add_argument("--num-gpus", type=int, default=1,
                        help="split the model's layers over cuda:0 .. cuda:N-1 (a model larger than one GPU); "
                             "1: the whole model on --device")
    parser.add_argument("--multi-modal", action="store_true",
                        help="accepted for LLaVA's older commands; every model here is multimodal")
    add_model_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    gpu_devices(args.num_gpus, args.device)  # flag errors before anything else
    if args.heart_beat_interval <= 0:
        raise UserError("--heart-beat-interval must be > 0")
    if args.worker_address is None:
        if args.host not in ("127.0.0.1", "localhost"):
            raise UserError(f"with --host {args.host}, give the address others reach this worker at: "
                            f"--worker http://<this machine's address>:{args.port}")
        args.worker_address = f"http://127.0.0.1:{args.port}"
    limits = image_limits(args)
    engine = load_engine(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat
    server = uvicorn.Server(uvicorn.Config(create_app(engine, limits), host=args.host, port=args.port,
                                           log_level="info"))
    if not args.no_register:
        Heartbeat(args.controller_address, args.worker_address, engine, args.heart_beat_interval).start(server)
    try:
        server.run()
    finally:
        engine.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
