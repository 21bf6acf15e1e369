"""`python -m dynamic_llava.serve.load_test --controller URL --model NAME`: concurrent streaming requests with an
image, counted as completed, busy (the server's queue was full) or failed, with latency percentiles.

`--controller` may also be a model worker's address (both serve `/worker_generate_stream`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import require_extra  # before the serve extra's imports: one message if it is missing

require_extra("httpx", run_as_main=__name__ == "__main__")

import httpx

from ..conversation import get_conv_template, stop_string
from ..errors import UserError, run_command
from .protocol import ErrorCode

SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "sample.png"


@dataclass
class Outcome:
    status: str  # "completed" | "busy" | "failed"
    latency: float  # seconds to the last chunk
    first_chunk: float | None = None  # seconds to the first chunk
    error: str = ""


@dataclass
class Report:
    requests: int
    concurrency: int
    completed: int
    busy: int
    failures: int
    p50_latency_s: float | None
    p95_latency_s: float | None
    p50_first_chunk_s: float | None
    wall_s: float
    errors: list[str] = field(default_factory=list)  # the first few failure messages


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in (0, 100])."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def one_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any]) -> Outcome:
    start = time.perf_counter()
    first: float | None = None
    last: dict[str, Any] = {}
    try:
        async with client.stream("POST", url, json=payload) as response:
            buffer = b""
            async for piece in response.aiter_bytes():
                first = first if first is not None else time.perf_counter() - start
                buffer += piece
                *chunks, buffer = buffer.split(b"\0")
                for chunk in chunks:
                    if chunk.strip():
                        last = json.loads(chunk)
    except (httpx.HTTPError, ValueError) as error:
        return Outcome("failed", time.perf_counter() - start, first, f"{type(error).__name__}: {error}")
    latency = time.perf_counter() - start
    code = last.get("error_code")
    if code == ErrorCode.BUSY:
        return Outcome("busy", latency, first)
    if response.status_code != 200 or code != 0 or "stats" not in last:
        return Outcome("failed", latency, first, f"HTTP {response.status_code}: {str(last.get('text'))[:200]}")
    return Outcome("completed", latency, first)


async def run_load(address: str, payload: dict[str, Any], requests: int, concurrency: int,
                   timeout: float) -> Report:
    url = address.rstrip("/") + "/worker_generate_stream"
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), limits=limits) as client:
        async def gated() -> Outcome:
            async with gate:
                return await one_request(client, url, payload)

        start = time.perf_counter()
        outcomes = await asyncio.gather(*(gated() for _ in range(requests)))
        wall = time.perf_counter() - start
    done = [o for o in outcomes if o.status == "completed"]
    failed = [o for o in outcomes if o.status == "failed"]
    return Report(requests, concurrency, len(done), sum(o.status == "busy" for o in outcomes), len(failed),
                  percentile([o.latency for o in done], 50), percentile([o.latency for o in done], 95),
                  percentile([o.first_chunk for o in done if o.first_chunk is not None], 50), wall,
                  [o.error for o in failed[:5]])


def format_table(report: Report) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    header = ["requests", "concurrency", "completed", "busy", "failures", "p50 latency s", "p95 latency s",
              "p50 first chunk s", "wall s"]
    row = [str(report.requests), str(report.concurrency), str(report.completed), str(report.busy),
           str(report.failures), seconds(report.p50_latency_s), seconds(report.p95_latency_s),
           seconds(report.p50_first_chunk_s), seconds(report.wall_s)]
    widths = [max(len(h), len(v)) for h, v in zip(header, row)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)), "  ".join(v.rjust(w) for v, w in zip(row, widths))]
    return "\n".join(lines + [f"error: {e}" for e in report.errors])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.serve.load_test", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controller", default="http://127.0.0.1:21001", help="controller (or worker) address")
    parser.add_argument("--model", required=True, help="model name as the workers register it")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight at once")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--image-file", default=str(SAMPLE_IMAGE), help="image sent with every request")
    parser.add_argument("--question", default="What is shown in the image?")
    parser.add_argument("--conv-mode", default="llava_v1")
    parser.add_argument("--vision-keep-rate", type=float, default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    parser.add_argument("--json", default=None, help="also write the report here")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.concurrency < 1 or args.max_new_tokens < 1:
        raise UserError("--requests, --concurrency and --max-new-tokens must be >= 1")
    try:
        image = base64.b64encode(Path(args.image_file).read_bytes()).decode()
    except OSError as error:
        raise UserError(f"cannot read --image-file {args.image_file}: {error.strerror or error}") from None
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"folder for --json does not exist: {Path(args.json).parent}")
    conv = get_conv_template(args.conv_mode)
    conv.append_message(conv.roles[0], "<image>\n" + args.question)
    conv.append_message(conv.roles[1], None)
    payload = {"model": args.model, "prompt": conv.get_prompt(), "images": [image], "temperature": args.temperature,
               "max_new_tokens": args.max_new_tokens, "stop": stop_string(conv)}
    if args.vision_keep_rate is not None:
        payload["vision_keep_rate"] = args.vision_keep_rate
    report = asyncio.run(run_load(args.controller, payload, args.requests, args.concurrency, args.timeout))
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 1 if report.failures else 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
