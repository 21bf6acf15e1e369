"""Controller + two model workers as real processes on 127.0.0.1, on the tiny checkpoint.

Routing, streaming, per-request sparsity, batching, bad input, the bounded queue, the load-test command and
a worker killed mid-run. The module shares one cluster; the last test kills worker B.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from dynamic_llava.conversation import get_conv_template
from dynamic_llava.serve.protocol import ErrorCode
from serve_helpers import REPO, ServerProcess, free_port, png_base64, read_chunks, wait_until

EXPIRATION = 2.0  # controller --heart-beat-expiration (workers beat every 0.5 s)
MODEL = "tiny"


@dataclass
class Cluster:
    controller: str
    a: str
    b: str
    worker_b: ServerProcess


@pytest.fixture(scope="module")
def cluster(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("cluster_logs")
    ports = [free_port() for _ in range(3)]
    controller_url, a_url, b_url = (f"http://127.0.0.1:{p}" for p in ports)
    processes = [ServerProcess("dynamic_llava.serve.controller",
                               ["--port", str(ports[0]), "--heart-beat-expiration", str(EXPIRATION)],
                               logs / "controller.log")]
    common = ["--controller", controller_url, "--model-path", str(tiny_llava_dir), "--model-name", MODEL,
              "--heart-beat-interval", "0.5", "--max-new-tokens-limit", "32", "--max-image-bytes", "200000",
              "--max-image-pixels", "1000000"]
    try:
        processes.append(ServerProcess("dynamic_llava.serve.model_worker",
                                       ["--port", str(ports[1]), "--worker", a_url, *common], logs / "a.log"))
        processes.append(ServerProcess("dynamic_llava.serve.model_worker",
                                       ["--port", str(ports[2]), "--worker", b_url, *common, "--max-queue", "4",
                                        "--max-new-tokens-limit", "512"],
                                       logs / "b.log"))
        processes[0].wait_ready(controller_url + "/list_models")
        processes[1].wait_ready(a_url + "/worker_get_status")
        processes[2].wait_ready(b_url + "/worker_get_status")
        wait_until(lambda: len(_workers(controller_url)) == 2, 20, "both workers to register")
        yield Cluster(controller_url, a_url, b_url, processes[2])
    finally:
        for process in processes:
            process.stop()


def _workers(controller: str) -> list[str]:
    return [w["name"] for w in httpx.post(controller + "/list_workers", timeout=5).json()["workers"]]


def _prompt(question: str = "What is in the image?", images: int = 1) -> str:
    conv = get_conv_template("llava_v1")
    conv.append_message(conv.roles[0], "<image>\n" * images + question)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def _payload(**overrides) -> dict:
    return {"model": MODEL, "prompt": _prompt(), "images": [png_base64()], "temperature": 0, "max_new_tokens": 6,
            "stop": "</s>", **overrides}


def _generate(url: str, payload: dict) -> tuple[int, list[dict]]:
    response = httpx.post(url + "/worker_generate_stream", json=payload, timeout=120)
    return response.status_code, read_chunks(response)


def _batches(worker: str) -> Counter:
    sizes = httpx.post(worker + "/model_details", timeout=5).json()["batch_sizes"]
    return Counter({int(size): count for size, count in sizes.items()})


def _parallel(calls: list) -> list:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def test_workers_register_and_requests_are_spread_over_both(cluster: Cluster) -> None:
    assert httpx.post(cluster.controller + "/list_models", timeout=5).json() == {"models": [MODEL]}
    assert sorted(_workers(cluster.controller)) == sorted([cluster.a, cluster.b])
    status = httpx.post(cluster.controller + "/worker_get_status", timeout=5).json()
    assert status["model_names"] == [MODEL] and status["speed"] == 2
    before = {w: sum(_batches(w).values()) for w in (cluster.a, cluster.b)}
    results = _parallel([lambda: _generate(cluster.controller, _payload(max_new_tokens=2))] * 4)
    assert all(code == 200 and "stats" in chunks[-1] for code, chunks in results)
    assert all(sum(_batches(w).values()) > before[w] for w in (cluster.a, cluster.b)), "both workers served"


def test_streaming_through_the_controller(cluster: Cluster) -> None:
    payload = _payload(max_new_tokens=8)
    with httpx.stream("POST", cluster.controller + "/worker_generate_stream", json=payload, timeout=120) as response:
        assert response.status_code == 200
        pieces = list(response.iter_raw())
    chunks = [json.loads(c) for c in b"".join(pieces).split(b"\0") if c]
    assert len(chunks) >= 2 and all(c["error_code"] == 0 and c["text"].startswith(payload["prompt"]) for c in chunks)
    stats = chunks[-1]["stats"]
    assert stats["image_tokens"] == 576 and stats["image_tokens_kept"] == 115  # the checkpoint's rate, 0.2
    assert len(stats["image_keep"]) == 1 and sum(stats["image_keep"][0]) == 115
    assert 1 <= stats["output_tokens"] <= 8 and stats["finish_reason"] in ("eos", "stop", "length")
    assert stats["kv_cache_bytes"] < stats["kv_cache_bytes_dense"]
    assert "stats" not in chunks[0]
    _, direct = _generate(cluster.a, payload)  # greedy: the same answer straight from a worker
    assert direct[-1]["text"] == chunks[-1]["text"]


def test_sparsity_is_set_per_request(cluster: Cluster) -> None:
    calls = [lambda: _generate(cluster.a, _payload()), lambda: _generate(cluster.a, _payload(vision_keep_rate=0.5)),
             lambda: _generate(cluster.a, _payload(sparse=False)), lambda: _generate(cluster.a, _payload())]
    stats = [chunks[-1]["stats"] for _, chunks in _parallel(calls)]
    assert [s["image_tokens_kept"] for s in stats] == [115, 288, 576, 115]
    dense = stats[2]
    assert dense["kv_cache_bytes"] == dense["kv_cache_bytes_dense"]
    assert dense["output_tokens_kept"] == dense["output_tokens"] - 1


def test_concurrent_requests_are_batched_without_changing_answers(cluster: Cluster) -> None:
    _, solo = _generate(cluster.a, _payload(max_new_tokens=8))
    before = _batches(cluster.a)
    same = [lambda: _generate(cluster.a, _payload(max_new_tokens=8))] * 5
    other = [lambda: _generate(cluster.a, _payload(max_new_tokens=3, temperature=0.9)),
             lambda: _generate(cluster.a, _payload(max_new_tokens=5, stop=["zz"])),
             lambda: _generate(cluster.a, _payload(max_new_tokens=4, top_p=0.5))]
    results = _parallel(same + other)
    assert all(code == 200 for code, _ in results)
    assert [chunks[-1]["text"] for _, chunks in results[:5]] == [solo[-1]["text"]] * 5
    assert [chunks[-1]["stats"]["max_new_tokens"] for _, chunks in results[5:]] == [3, 5, 4]
    new = _batches(cluster.a) - before
    assert sum(size * count for size, count in new.items()) == 8  # every request ran in exactly one batch
    assert max(new) > 1, f"no batching happened: {dict(new)}"


def _png(size: tuple[int, int], noise: bool = False) -> str:
    """A PNG: random pixels (incompressible: ~3 bytes a pixel) or one flat colour (tiny file)."""
    w, h = size
    image = Image.frombytes("RGB", size, os.urandom(w * h * 3)) if noise else Image.new("RGB", size, (9, 9, 9))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BAD_INPUTS = [
    # (description, body, status, message part)
    ("malformed JSON", b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    ("a JSON array", b"[1, 2]", 400, "JSON object"),
    ("bad base64", {"images": ["@@not base64@@"]}, 400, "not valid base64"),
    ("non-image bytes", {"images": [base64.b64encode(b"just some text, no image").decode()]}, 400,
     "not a recognised image format"),
    ("too many bytes", {"images": [_png((300, 300), noise=True)]}, 400, "limit of 200000 bytes"),
    ("too many pixels", {"images": [_png((1200, 1000))]}, 400, "1200x1000 pixels"),
    ("more images than placeholders", {"images": [png_base64(), png_base64()]}, 400, "1 <image> placeholder(s)"),
    ("images not a list", {"images": png_base64()}, 400, "images must be a list"),
    ("no prompt", {"prompt": None}, 400, "prompt must be"),
    ("prompt beyond the context", {"prompt": _prompt(images=8), "images": [png_base64()] * 8}, 400,
     "context length is 4096"),
    ("max_new_tokens 0", {"max_new_tokens": 0}, 400, "max_new_tokens"),
    ("max_new_tokens not a number", {"max_new_tokens": "ten"}, 400, "max_new_tokens must be an integer"),
    ("max_new_tokens beyond 2**63", {"max_new_tokens": 2 ** 70}, 400, "max_new_tokens must be in"),
    ("negative temperature", {"temperature": -1}, 400, "temperature"),
    ("vision_keep_rate above 1", {"vision_keep_rate": 1.5}, 400, "vision_keep_rate"),
    ("sparse not a boolean", {"sparse": "yes"}, 400, "sparse must be"),
    ("stop not strings", {"stop": [1]}, 400, "stop must be"),
    ("unknown model", {"model": "gpt-17"}, 404, "serves 'tiny'"),
    ("a body over the limit", b"x" * 1_700_000, 413, "limit"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_4xx_with_a_clear_message(cluster: Cluster, case) -> None:
    _, body, status, message = case
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": _payload(**body)}
    response = httpx.post(cluster.a + "/worker_generate_stream", timeout=60, **kwargs)
    assert response.status_code == status
    (chunk,) = read_chunks(response)
    assert chunk["error_code"] // 100 == status and message in chunk["text"]


def test_after_bad_input_the_worker_still_serves_and_absurd_lengths_are_clamped(cluster: Cluster) -> None:
    code, chunks = _generate(cluster.a, _payload(max_new_tokens=10 ** 9, stop=None))
    assert code == 200 and chunks[-1]["stats"]["max_new_tokens"] == 32  # --max-new-tokens-limit
    code, chunks = _generate(cluster.controller, _payload(model="gpt-17"))
    assert code == 404 and chunks[0]["error_code"] == ErrorCode.UNKNOWN_MODEL


def test_a_full_queue_answers_busy(cluster: Cluster) -> None:
    """Worker B admits 4 requests (--max-queue 4); the fifth gets 503 while they run (long ones: 400 tokens)."""
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(_generate(cluster.b, _payload(max_new_tokens=400,
                                                                                               stop=None))))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: httpx.post(cluster.b + "/worker_get_status", timeout=5).json()["queue_length"] == 4, 30,
               "worker B's queue to fill")
    code, chunks = _generate(cluster.b, _payload())
    for thread in threads:
        thread.join(120)
    assert code == 503 and chunks[0]["error_code"] == ErrorCode.BUSY and "busy" in chunks[0]["text"]
    assert len(results) == 4 and all(code == 200 and "stats" in c[-1] for code, c in results)


def test_load_test_command(cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, "-m", "dynamic_llava.serve.load_test", "--controller", cluster.controller,
                          "--model", MODEL, "--requests", "50", "--concurrency", "50", "--max-new-tokens", "4",
                          "--timeout", "120", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["failures"] == 0 and report["completed"] + report["busy"] == 50 and report["completed"] >= 4
    assert report["p50_latency_s"] is not None and report["p95_latency_s"] >= report["p50_latency_s"]
    assert "p95 latency s" in run.stdout and "busy" in run.stdout


def test_a_worker_killed_mid_run_is_dropped_and_the_other_takes_over(cluster: Cluster) -> None:
    """Runs last: kills worker B. Its in-flight requests end with an error chunk (no hang); the controller drops
    it once its heartbeats stop; requests then all go to A."""
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(
        _generate(cluster.controller, _payload(max_new_tokens=400, stop=None)))) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: httpx.post(cluster.b + "/worker_get_status", timeout=5).json()["queue_length"] > 0, 30,
               "a request on worker B")
    cluster.worker_b.kill()
    for thread in threads:
        thread.join(120)
    assert len(results) == 4
    lost = [chunks[-1] for _, chunks in results if chunks[-1]["error_code"] == ErrorCode.WORKER_LOST]
    done = [chunks[-1] for _, chunks in results if "stats" in chunks[-1]]
    assert lost and len(lost) + len(done) == 4

    wait_until(lambda: _workers(cluster.controller) == [cluster.a], EXPIRATION + 3, "B to be dropped")
    assert [httpx.post(cluster.controller + "/get_worker_address", json={"model": MODEL}, timeout=5).json()["address"]
            for _ in range(3)] == [cluster.a] * 3
    after = _parallel([lambda: _generate(cluster.controller, _payload(max_new_tokens=2))] * 3)
    assert all(code == 200 and "stats" in chunks[-1] for code, chunks in after)
