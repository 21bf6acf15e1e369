"""The LLaVA chat web UI, with Dynamic-LLaVA's per-request sparsity controls and what each answer kept.

    python -m dynamic_llava.serve.gradio_web_server --controller http://127.0.0.1:21001 [--port 7860]

Talks to the controller for the model list and a worker address, then streams each answer from the
worker (`worker_client`). Prompts are built here from the chat so far with the project's templates:
`prompting.infer_conv_mode` picks the template from the model name, `prompting.image_query` places the
`<image>` token, as in `dynamic-llava ask`. As in LLaVA, a conversation holds one image: sending a new
image starts a new conversation. The kept-patch overlay and the efficiency table show the last answer.
Nothing is sent anywhere but the controller and its workers: Gradio's telemetry is off.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import logging
import os
import sys
from types import ModuleType
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

from PIL import Image

from ..errors import require_extra  # before the serve extra's imports: one message if it is missing

require_extra("httpx", run_as_main=__name__ == "__main__")  # gradio: imported when the UI is built

from ..conversation import Conversation, get_conv_template, stop_string
from ..errors import UserError, run_command
from ..prompting import image_query, infer_conv_mode
from ..visualize import kept_patches_overlay
from . import worker_client
from .worker_client import WorkerError

logger = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 1536  # LLaVA's cap on one typed message
MAX_NEW_TOKENS_CAP = 1536
DEFAULT_VISION_KEEP_RATE = 0.2  # SparseConfig's default, the paper's setting
# Gradio puts a "Share" button (an upload to a public hub) on every chat message holding a file; hide it.
CSS = '#chatbot button[aria-label="Share"] { display: none; }'
OVERLAY_ASPECT_RATIO = "pad"  # LLaVA-1.5's image_aspect_ratio, unless the worker reports another
CURSOR = "▌"


# ----------------------------------------------------------------------------- chat state (no gradio)

@dataclasses.dataclass
class Turn:
    question: str
    answer: str | None = None  # None while the answer is being generated
    error: bool = False  # the answer is an error message: shown, never sent back to the model


@dataclasses.dataclass
class ChatState:
    """One browser session's conversation: its image (one per conversation, as in LLaVA) and turns."""

    image_path: str | None = None
    turns: list[Turn] = dataclasses.field(default_factory=list)
    skip_next: bool = False  # the last submit was rejected: the generation step does nothing


def add_turn(state: ChatState, text: str, image_path: str | None) -> tuple[ChatState, str | None]:
    """The state after the user sends `text` (and maybe a new image), and a notice for the user, if any.

    Empty text sets `skip_next`. A new image while the conversation already has one starts a new
    conversation with it (LLaVA's rule: one image per conversation).
    """
    text = (text or "").strip()
    if not text:
        state.skip_next = True
        return state, "Type a question first."
    notice = None
    if len(text) > MAX_QUESTION_CHARS:
        text = text[:MAX_QUESTION_CHARS]
        notice = f"The question was cut to {MAX_QUESTION_CHARS} characters."
    if image_path is not None and image_path != state.image_path:
        if state.image_path is not None or state.turns:
            state = ChatState()
            notice = "New image: a new conversation started."
        state.image_path = image_path
    state.skip_next = False
    state.turns.append(Turn(text))
    return state, notice


def build_conversation(state: ChatState, model_name: str) -> Conversation:
    """The model's template filled with the turns so far; the last turn's answer is left open.

    Failed turns are left out; the image goes with the first question sent (at the user's `<image>` if
    typed, else in front, by `prompting.image_query`), as LLaVA's `(text, image, mode)` message.
    """
    conv = get_conv_template(infer_conv_mode(model_name))
    image_pending = state.image_path is not None
    turns = [turn for turn in state.turns if not turn.error]
    for turn in turns:
        if image_pending:
            # The worker swaps in <im_start>/<im_end> itself when its model uses them.
            message: Any = (image_query(turn.question, 1, False), state.image_path, "Default")
            image_pending = False
        else:
            message = turn.question
        conv.append_message(conv.roles[0], message)
        conv.append_message(conv.roles[1], turn.answer)
    return conv


def encode_image_file(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")


def build_request(state: ChatState, model_name: str, temperature: float, top_p: float, max_new_tokens: int,
                  vision_keep_rate: float, sparse: bool) -> dict[str, Any]:
    """The JSON body of `worker_generate_stream` for the open last turn."""
    conv = build_conversation(state, model_name)
    images = [encode_image_file(state.image_path)] if state.image_path is not None else []
    return {
        "model": model_name,
        "prompt": conv.get_prompt(),
        "images": images,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "max_new_tokens": min(int(max_new_tokens), MAX_NEW_TOKENS_CAP),
        "stop": stop_string(conv),
        "vision_keep_rate": float(vision_keep_rate),
        "sparse": bool(sparse),
    }


def chat_messages(state: ChatState) -> list[dict[str, Any]]:
    """The chat as Gradio `messages`: the image shown with the first question, a cursor while an answer
    streams, failed answers marked."""
    messages: list[dict[str, Any]] = []
    for index, turn in enumerate(state.turns):
        content: Any = turn.question
        if index == 0 and state.image_path is not None:
            content = [{"path": state.image_path}, turn.question]
        messages.append({"role": "user", "content": content})
        answer = CURSOR if turn.answer is None else turn.answer
        if turn.error:
            answer = f"**Error:** {answer}"
        messages.append({"role": "assistant", "content": answer or "(empty answer)"})
    return messages


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _ratio(kept: float, total: float) -> str:
    return f"{100 * kept / total:.1f}%" if total else "–"


def format_stats(stats: dict[str, Any], sparse: bool) -> str:
    """Markdown table of one answer's efficiency stats."""
    rows = []
    image_total, image_kept = stats.get("image_tokens"), stats.get("image_tokens_kept")
    if image_total == 0:
        rows.append("| image tokens kept | no image |")
    elif image_total is not None and image_kept is not None:
        rows.append(f"| image tokens kept | {image_kept} / {image_total} ({_ratio(image_kept, image_total)}) |")
    output_total, output_kept = stats.get("output_tokens"), stats.get("output_tokens_kept")
    if output_total is not None and output_kept is not None:
        rows.append(f"| output tokens kept / generated | {output_kept} / {output_total} "
                    f"({_ratio(output_kept, output_total)}) |")
    kv, kv_dense = stats.get("kv_cache_bytes"), stats.get("kv_cache_bytes_dense")
    if kv is not None and kv_dense is not None:
        rows.append(f"| KV cache / dense | {_bytes(kv)} / {_bytes(kv_dense)} ({_ratio(kv, kv_dense)}) |")
    mode = "sparse (Dynamic-LLaVA)" if sparse else "dense (LLaVA-1.5)"
    lines = [f"**Last answer** · {mode}", "", "| | kept / total |", "|---|---|", *rows]
    if stats.get("finish_reason"):
        lines += ["", f"finish reason: `{stats['finish_reason']}`"]
    return "\n".join(lines)


def overlay_for(state: ChatState, stats: dict[str, Any]) -> Image.Image | None:
    """The conversation's image with the patches the last answer dropped greyed out (None without one)."""
    keeps = stats.get("image_keep") or []
    if state.image_path is None or not keeps or not keeps[0]:
        return None
    aspect = stats.get("image_aspect_ratio") or OVERLAY_ASPECT_RATIO
    with Image.open(state.image_path) as image:
        try:
            return kept_patches_overlay(image.convert("RGB"), [bool(k) for k in keeps[0]], aspect)
        except ValueError:  # not a square patch grid: nothing sensible to draw
            return None


@dataclasses.dataclass
class Update:
    """What one step of an answer changes on the page."""

    state: ChatState
    overlay: Image.Image | None = None
    stats: str | None = None  # None: leave as it is
    done: bool = False


def stream_answer(controller: str, state: ChatState, model_name: str | None, temperature: float, top_p: float,
                  max_new_tokens: int, vision_keep_rate: float, sparse: bool) -> Iterator[Update]:
    """Generate the open last turn's answer, yielding as it grows; errors end up as the answer text."""
    turn = state.turns[-1]

    def fail(message: str) -> Update:
        turn.answer, turn.error = message, True
        return Update(state, stats="", done=True)

    if not model_name:
        yield fail("No model is available: start a model worker, then refresh the model list.")
        return
    try:
        address = worker_client.get_worker_address(controller, model_name)
        if not address:
            yield fail(f"No worker serves {model_name!r} any more: refresh the model list.")
            return
        payload = build_request(state, model_name, temperature, top_p, max_new_tokens, vision_keep_rate, sparse)
        yield Update(state, overlay=None, stats="")
        last = None
        for chunk in worker_client.stream_generate(address, payload):
            if chunk.failed:
                yield fail(f"{chunk.text} (error code {chunk.error_code})")
                return
            turn.answer = worker_client.answer_text(chunk.text, payload["prompt"]) + CURSOR
            last = chunk
            yield Update(state)
    except WorkerError as error:
        yield fail(str(error))
        return
    except OSError as error:  # the uploaded image went missing
        yield fail(f"cannot read the image: {error}")
        return
    if last is None:
        yield fail("The worker sent no answer.")
        return
    turn.answer = worker_client.answer_text(last.text, payload["prompt"])
    if not last.stats:
        yield Update(state, stats="_The worker sent no stats for this answer._", done=True)
        return
    yield Update(state, overlay=overlay_for(state, last.stats), stats=format_stats(last.stats, sparse), done=True)


# ----------------------------------------------------------------------------- the page

def get_model_list(controller: str) -> list[str]:
    return worker_client.list_models(controller, refresh=True)


def _quiet_gradio() -> None:
    """Before gradio is imported: no telemetry, no version check, no hub calls."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Handlers:
    """The page's event handlers. gradio is imported only once the page is built, so it is handed in."""

    def __init__(self, gr: ModuleType, controller: str, models: Sequence[str], model_list_mode: str) -> None:
        self.gr, self.controller, self.models, self.model_list_mode = gr, controller, models, model_list_mode

    def _choose(self, choices: Sequence[str], current: str | None = None) -> Any:
        value = current if current in choices else (choices[0] if choices else None)
        return self.gr.Dropdown(choices=list(choices), value=value)

    def _buttons(self, interactive: bool) -> tuple[Any, ...]:
        """Send, Regenerate and Clear: disabled while an answer streams."""
        return (self.gr.Button(interactive=interactive),) * 3

    def load_demo(self) -> Any:
        if self.model_list_mode == "reload":
            try:
                return self._choose(get_model_list(self.controller))
            except WorkerError as error:
                self.gr.Warning(f"Cannot refresh the model list: {error}")
        return self._choose(self.models)

    def refresh_models(self, current: str | None) -> Any:
        try:
            return self._choose(get_model_list(self.controller), current)
        except WorkerError as error:
            self.gr.Warning(f"Cannot refresh the model list: {error}")
            return self.gr.Dropdown()

    def add_text(self, state: ChatState, text: str, image_path: str | None) -> tuple[Any, ...]:
        state, notice = add_turn(state, text, image_path)
        if state.skip_next:
            self.gr.Warning(notice)
            return (state, chat_messages(state), text, self.gr.Image()) + self._buttons(True)
        if notice:
            self.gr.Info(notice)
        return (state, chat_messages(state), "", None) + self._buttons(False)

    def regenerate(self, state: ChatState) -> tuple[Any, ...]:
        if not state.turns:
            state.skip_next = True
            return (state, chat_messages(state)) + self._buttons(True)
        state.turns[-1].answer, state.turns[-1].error = None, False
        state.skip_next = False
        return (state, chat_messages(state)) + self._buttons(False)

    def clear(self) -> tuple[Any, ...]:
        return (ChatState(), [], "", None, None, "") + self._buttons(True)

    def http_bot(self, state: ChatState, model_name: str | None, temperature: float, top_p: float,
                 max_new_tokens: int, keep_rate: float, sparse: bool) -> Iterator[tuple[Any, ...]]:
        gr = self.gr
        if state.skip_next:
            state.skip_next = False
            yield (state, chat_messages(state), gr.Image(), gr.Markdown()) + self._buttons(True)
            return
        try:
            for update in stream_answer(self.controller, state, model_name, temperature, top_p, max_new_tokens,
                                        keep_rate, sparse):
                overlay = update.overlay if update.done or update.stats is not None else gr.Image()
                stats = gr.Markdown() if update.stats is None else update.stats
                yield (update.state, chat_messages(update.state), overlay, stats) + self._buttons(update.done)
        except Exception as error:  # a bug here must not leave the page with its buttons disabled
            logger.exception("answer failed")
            state.turns[-1].answer, state.turns[-1].error = f"internal error in the web server: {error!r}", True
            yield (state, chat_messages(state), None, "") + self._buttons(True)


@dataclasses.dataclass
class _Page:
    """The page's components that events read or write (gradio components, hence `Any`)."""

    state: Any
    model_selector: Any
    refresh_btn: Any
    imagebox: Any
    sparse: Any
    keep_rate: Any
    temperature: Any
    top_p: Any
    max_output_tokens: Any
    chatbot: Any
    textbox: Any
    submit_btn: Any
    regenerate_btn: Any
    clear_btn: Any
    overlay: Any
    stats: Any

    @property
    def controls(self) -> list[Any]:
        return [self.submit_btn, self.regenerate_btn, self.clear_btn]


def _settings_column(gr: ModuleType, models: Sequence[str]) -> dict[str, Any]:
    """Left: the model, the image, Dynamic-LLaVA's sparsity and the sampling parameters."""
    with gr.Column(scale=3):
        with gr.Row():
            model_selector = gr.Dropdown(choices=list(models), value=models[0] if models else None,
                                         label="Model", interactive=True, scale=4, elem_id="model")
            refresh_btn = gr.Button("Refresh", scale=1, min_width=60, elem_id="refresh-models")
        imagebox = gr.Image(type="filepath", sources=["upload"], label="Image", elem_id="imagebox")
        with gr.Accordion("Dynamic-LLaVA", open=True):
            sparse = gr.Checkbox(value=True, label="sparse (drop tokens)", elem_id="sparse")
            keep_rate = gr.Slider(0.05, 1.0, value=DEFAULT_VISION_KEEP_RATE, step=0.05,
                                  label="vision keep rate", elem_id="keep-rate")
        with gr.Accordion("Parameters", open=False, elem_id="parameters"):
            temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.1, label="Temperature")
            top_p = gr.Slider(0.1, 1.0, value=0.7, step=0.1, label="Top P")
            max_output_tokens = gr.Slider(16, 1024, value=512, step=16, label="Max output tokens",
                                          elem_id="max-tokens")
    return {"model_selector": model_selector, "refresh_btn": refresh_btn, "imagebox": imagebox, "sparse": sparse,
            "keep_rate": keep_rate, "temperature": temperature, "top_p": top_p,
            "max_output_tokens": max_output_tokens}


def _chat_column(gr: ModuleType) -> dict[str, Any]:
    """Middle: the chat, the question box and the buttons."""
    with gr.Column(scale=7):
        chatbot = gr.Chatbot(label="Chat", height=520, elem_id="chatbot", buttons=["copy"], feedback_options=None)
        with gr.Row():
            textbox = gr.Textbox(show_label=False, placeholder="Ask about the image and press Enter",
                                 container=False, scale=8, elem_id="textbox")
            submit_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
        with gr.Row():
            regenerate_btn = gr.Button("Regenerate", elem_id="regenerate")
            clear_btn = gr.Button("Clear", elem_id="clear")
    return {"chatbot": chatbot, "textbox": textbox, "submit_btn": submit_btn, "regenerate_btn": regenerate_btn,
            "clear_btn": clear_btn}


def _answer_column(gr: ModuleType) -> dict[str, Any]:
    """Right: what the last answer kept (the patch overlay) and its efficiency table."""
    with gr.Column(scale=3):
        overlay = gr.Image(label="Kept image patches (dropped: grey)", type="pil", interactive=False,
                           elem_id="overlay", format="png", buttons=["download", "fullscreen"])
        stats = gr.Markdown(elem_id="stats")
    return {"overlay": overlay, "stats": stats}


def _layout(gr: ModuleType, models: Sequence[str]) -> _Page:
    """The page's components, inside the open `gr.Blocks`."""
    state = gr.State(ChatState())
    gr.Markdown("# Dynamic-LLaVA\nLLaVA-1.5 chat with vision and output-token sparsification.")
    with gr.Row():
        settings = _settings_column(gr, models)
        chat = _chat_column(gr)
        answer = _answer_column(gr)
    return _Page(state=state, **settings, **chat, **answer)


def _connect(gr: ModuleType, demo: Any, page: _Page, handlers: _Handlers, concurrency_count: int) -> None:
    """Wire the events: a question (Enter or Send) or Regenerate, then the streamed answer; Clear; settings."""
    controls = page.controls
    bot_inputs = [page.state, page.model_selector, page.temperature, page.top_p, page.max_output_tokens,
                  page.keep_rate, page.sparse]
    bot_outputs = [page.state, page.chatbot, page.overlay, page.stats, *controls]
    for trigger in (page.textbox.submit, page.submit_btn.click):
        trigger(handlers.add_text, [page.state, page.textbox, page.imagebox],
                [page.state, page.chatbot, page.textbox, page.imagebox, *controls], queue=False
                ).then(handlers.http_bot, bot_inputs, bot_outputs, concurrency_limit=concurrency_count)
    page.regenerate_btn.click(handlers.regenerate, [page.state], [page.state, page.chatbot, *controls],
                              queue=False).then(handlers.http_bot, bot_inputs, bot_outputs,
                                                concurrency_limit=concurrency_count)
    clear_outputs = [page.state, page.chatbot, page.textbox, page.imagebox, page.overlay, page.stats, *controls]
    page.clear_btn.click(handlers.clear, None, clear_outputs, queue=False)
    page.chatbot.clear(handlers.clear, None, clear_outputs, queue=False)  # the chat's own trash button
    page.sparse.change(lambda on: gr.Slider(interactive=on), [page.sparse], [page.keep_rate], queue=False)
    page.refresh_btn.click(handlers.refresh_models, [page.model_selector], [page.model_selector], queue=False)
    demo.load(handlers.load_demo, None, [page.model_selector], queue=False)


def build_demo(controller: str, models: Sequence[str], model_list_mode: str, concurrency_count: int) -> Any:
    """The chat page (a `gr.Blocks`), talking to `controller`."""
    _quiet_gradio()
    import gradio as gr

    handlers = _Handlers(gr, controller, models, model_list_mode)
    with gr.Blocks(title="Dynamic-LLaVA", analytics_enabled=False) as demo:
        _connect(gr, demo, _layout(gr, models), handlers, concurrency_count)
    return demo


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.serve.gradio_web_server",
                                     description="Chat web UI in front of a controller and its model workers.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--controller", "--controller-url", dest="controller", default="http://127.0.0.1:21001",
                        help="controller address")
    parser.add_argument("--model-list-mode", choices=["once", "reload"], default="once",
                        help="once: ask the controller at start-up; reload: on every page load")
    parser.add_argument("--concurrency-count", type=int, default=16, help="answers generated at the same time")
    parser.add_argument("--share", action="store_true",
                        help="LLaVA's public-link flag; not available here (it needs the internet)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    url = urlparse(args.controller)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise UserError(f"--controller must be an http:// or https:// address, got {args.controller!r}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.concurrency_count < 1:
        raise UserError(f"--concurrency-count must be at least 1, got {args.concurrency_count}")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    if args.share:
        print("warning: --share is not available offline (it tunnels through a public server); "
              "serving on the local address only", file=sys.stderr)
    try:
        models = get_model_list(args.controller)
    except WorkerError as error:
        raise UserError(f"cannot get the model list from the controller: {error}") from None
    if not models:
        print(f"warning: the controller at {args.controller} has no models yet; start a model worker and "
              "press the refresh button next to the model list", file=sys.stderr)
    else:
        print(f"models: {', '.join(models)}", file=sys.stderr)
    demo = build_demo(args.controller, models, args.model_list_mode, args.concurrency_count)
    demo.queue(api_open=False, default_concurrency_limit=args.concurrency_count)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=False, show_error=True, quiet=True,
                    ssr_mode=False, mcp_server=False, pwa=False, run_history=False, prevent_thread_lock=True,
                    css=CSS)
    except OSError as error:  # port taken / address not available
        reason = str(error).split(". ")[0]  # gradio's advice after that names its own parameters
        raise UserError(f"cannot listen on {args.host}:{args.port} ({reason}); choose another --port / --host") \
            from None
    print(f"web UI running on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    demo.block_thread()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
