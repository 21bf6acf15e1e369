"""The web UI in a real headless Chromium, in front of the real controller and model worker (tiny checkpoint).

Every process runs on a free 127.0.0.1 port in its own session and is killed at the end, also on failure.
The browser may talk to 127.0.0.1 only; the servers get a dead proxy for anything that is not local, so
nothing can leave the machine, and the test asserts the page never tried.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import httpx
import pytest
from PIL import Image, ImageDraw

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT = 120.0  # seconds for one server to come up on a busy machine
ANSWER_TIMEOUT_MS = 90_000

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the playwright package")
try:
    import dynamic_llava.serve.controller  # noqa: F401
    import dynamic_llava.serve.model_worker  # noqa: F401
except ImportError as error:  # pragma: no cover - only while the serving stack is missing
    pytest.skip(f"the controller / model worker cannot be imported ({error}); the web UI needs them",
                allow_module_level=True)
if not os.access(CHROMIUM, os.X_OK):  # pragma: no cover
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian's chromium package)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A `python -m module` process in its own session, its output in a log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")

    def wait_until(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"{self.name}: {what} not ready after {START_TIMEOUT:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the session holds only this server and its children
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    dead_proxy = "http://127.0.0.1:9"  # the discard port: nothing listens, a non-local request fails at once
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp / "gradio"), "PYTHONUNBUFFERED": "1",
        "HTTP_PROXY": dead_proxy, "HTTPS_PROXY": dead_proxy, "ALL_PROXY": dead_proxy,
        "http_proxy": dead_proxy, "https_proxy": dead_proxy, "all_proxy": dead_proxy,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    return env


def _post(url: str, payload: dict | None = None) -> dict:
    return httpx.post(url, json=payload or {}, timeout=5, trust_env=False).json()


@pytest.fixture(scope="module")
def web_ui(tiny_llava_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """The running stack: (web UI URL, model name)."""
    tmp = tmp_path_factory.mktemp("serve_web")
    env = _env(tmp)
    servers: list[_Server] = []
    try:
        port = _free_port()
        controller_url = f"http://127.0.0.1:{port}"
        controller = _Server("controller", ["dynamic_llava.serve.controller", "--host", "127.0.0.1", "--port",
                                            str(port)], tmp, env)
        servers.append(controller)
        controller.wait_until(lambda: "models" in _post(controller_url + "/list_models"), "controller")

        # The web UI first, in reload mode: it starts with no model and must pick the worker up on page load.
        port = _free_port()
        web = _Server("web", ["dynamic_llava.serve.gradio_web_server", "--controller", controller_url,
                              "--host", "127.0.0.1", "--port", str(port), "--concurrency-count", "2",
                              "--model-list-mode", "reload"], tmp, env)
        servers.append(web)
        url = f"http://127.0.0.1:{port}/"
        web.wait_until(lambda: httpx.get(url, timeout=5, trust_env=False).status_code == 200, "web UI")
        assert "has no models yet" in web.log.read_text()

        port = _free_port()
        worker = _Server("worker", ["dynamic_llava.serve.model_worker", "--host", "127.0.0.1", "--port", str(port),
                                    "--controller-address", controller_url,
                                    "--worker-address", f"http://127.0.0.1:{port}",
                                    "--model-path", str(tiny_llava_dir), "--device", "cpu"], tmp, env)
        servers.append(worker)
        worker.wait_until(lambda: _post(controller_url + "/list_models")["models"], "worker registration")
        [model] = _post(controller_url + "/list_models")["models"]
        yield url, model
        for server in servers:
            server.check_alive()  # nothing crashed along the way
    finally:
        for server in reversed(servers):
            server.stop()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[tuple[object, list[str]]]:
    """A page of a fresh headless Chromium profile, and the list of non-local URLs it tried (all refused)."""
    outside: list[str] = []

    def only_local(route) -> None:
        url = urlparse(route.request.url)
        if url.scheme in ("data", "blob") or url.hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900})
        try:
            context.route("**/*", only_local)
            yield context.new_page(), outside
        finally:
            context.close()


def _write_png(path: Path) -> Path:
    image = Image.new("RGB", (96, 64), (30, 90, 200))
    ImageDraw.Draw(image).ellipse([20, 10, 70, 55], fill=(230, 40, 40))
    image.save(path)
    return path


def _set_slider(page, elem_id: str, value: str, attempts: int = 5) -> None:
    """Type a value into a slider's number box until the slider itself shows it.

    Typed while the page is still settling (an accordion opening, a loaded machine in CI), the value is
    sometimes dropped and the slider keeps its default, which would then be sent: type it again.
    """
    number = page.locator(f"#{elem_id} input[type=number]")
    slider = page.locator(f"#{elem_id} input[type=range]")
    for attempt in range(1, attempts + 1):
        sync_api.expect(number).to_be_editable()
        number.fill(value)
        number.press("Enter")
        try:
            sync_api.expect(slider).to_have_value(value, timeout=2000 if attempt < attempts else 5000)
            return
        except AssertionError:
            if attempt == attempts:
                raise


def test_chat_in_the_browser(web_ui: tuple[str, str], page, tmp_path: Path) -> None:
    expect = sync_api.expect
    url, model = web_ui
    page, outside = page
    page.goto(url)
    expect(page.locator("#model input")).to_have_value(model)  # reloaded from the controller on page load

    # Dynamic-LLaVA's per-request keep rate, and a short answer
    _set_slider(page, "keep-rate", "0.5")
    page.locator("#parameters").get_by_text("Parameters").click()
    _set_slider(page, "max-tokens", "16")

    page.locator("#imagebox input[type=file]").set_input_files(str(_write_png(tmp_path / "shapes.png")))
    expect(page.locator("#imagebox img")).to_be_visible()
    page.locator("#textbox textarea").fill("What shapes are in the picture?")
    page.locator("#textbox textarea").press("Enter")

    expect(page.locator("#chatbot .user-row")).to_contain_text(["What shapes are in the picture?"])
    expect(page.locator("#chatbot .user-row img")).to_be_visible()  # the image is shown with the question
    stats = page.locator("#stats")
    expect(stats).to_contain_text("image tokens kept", timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#send")).to_be_enabled()
    answer = page.locator("#chatbot .bot-row").last.inner_text().strip()
    assert answer and "Error" not in answer
    expect(stats).to_contain_text("288 / 576")  # the tiny tower's 24 x 24 patches at the requested rate 0.5
    generated = re.search(r"output tokens kept / generated\s+(\d+) / (\d+)", stats.inner_text())
    assert generated and 0 < int(generated[2]) <= 16  # the max-output-tokens slider reached the worker
    expect(stats).to_contain_text("KV cache / dense")
    overlay = page.locator("#overlay img")
    expect(overlay).to_be_visible()
    assert overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [336, 336]

    # dense: same question regenerated with sparsification off keeps every patch
    page.locator("#sparse input[type=checkbox]").uncheck()
    page.locator("#regenerate").click()
    expect(stats).to_contain_text("576 / 576", timeout=ANSWER_TIMEOUT_MS)
    expect(stats).to_contain_text("dense")
    expect(page.locator("#chatbot .bot-row")).to_have_count(1)

    # a follow-up question without a new image continues the same conversation
    page.locator("#sparse input[type=checkbox]").check()
    page.locator("#textbox textarea").fill("And the colours?")
    page.locator("#send").click()
    expect(page.locator("#chatbot .bot-row")).to_have_count(2)
    expect(stats).to_contain_text("288 / 576", timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#send")).to_be_enabled()

    page.locator("#clear").click()
    expect(page.locator("#chatbot .user-row")).to_have_count(0)
    expect(page.locator("#chatbot .bot-row")).to_have_count(0)
    expect(stats).not_to_contain_text("image tokens")
    expect(page.locator("#overlay img")).to_have_count(0)

    # a request the worker rejects (an <image> placeholder but no image): the error shows in the chat and
    # the page stays usable
    page.locator("#textbox textarea").fill("<image> Where is it?")
    page.locator("#textbox textarea").press("Enter")
    expect(page.locator("#chatbot .bot-row")).to_contain_text(["Error"], timeout=ANSWER_TIMEOUT_MS)
    expect(page.locator("#send")).to_be_enabled()
    page.locator("#textbox textarea").fill("Hello?")
    page.locator("#send").click()
    expect(page.locator("#chatbot .bot-row")).to_have_count(2)
    expect(stats).to_contain_text("output tokens kept", timeout=ANSWER_TIMEOUT_MS)
    assert "Error" not in page.locator("#chatbot .bot-row").last.inner_text()
    assert outside == [], f"the page tried to reach the network: {outside}"
