"""GPT review through the real `openai` client against a local fake server, and its summary on known numbers."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from dynamic_llava.eval import eval_gpt_review_visual as review
from dynamic_llava.eval import summarize_gpt_review as summary


class FakeOpenAI:
    """`/v1/chat/completions` answering `reply`, after `rate_limits` 429 responses; requests are recorded."""

    def __init__(self) -> None:
        self.reply = "8 6\nexplanation"
        self.rate_limits = 0
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "not found"}})
                elif fake.rate_limits > 0:
                    fake.rate_limits -= 1
                    self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}})
                else:
                    fake.requests.append(body)
                    self._send(200, {
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": fake.reply}}],
                    })

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def fake_openai(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    monkeypatch.setattr(review, "RETRY_DELAY", 0.01)
    fake = FakeOpenAI()
    thread = threading.Thread(target=fake.server.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def bench(tmp_path: Path) -> dict[str, Path]:
    """Three LLaVA-Bench questions (conv, detail, complex) on two images, and two answer files."""
    questions = [
        {"question_id": 0, "image": "a.jpg", "text": "What is on the table?", "category": "conv"},
        {"question_id": 1, "image": "a.jpg", "text": "Describe the image.", "category": "detail"},
        {"question_id": 2, "image": "b.jpg", "text": "Why is the man smiling?", "category": "complex"},
    ]
    contexts = [
        {"id": "a", "image": "a.jpg", "caption": "A red apple on a wooden table."},
        {"id": "b", "image": "b.jpg", "captions": ["A man holds a trophy.", "People cheer."],
         "instances": [{"category": "person", "bbox": [0.1, 0.2, 0.5, 0.9]}]},
    ]
    return {
        "question": _jsonl(tmp_path / "questions.jsonl", questions),
        "context": _jsonl(tmp_path / "context.jsonl", contexts),
        "answer1": _jsonl(tmp_path / "gpt4.jsonl",
                          [{"question_id": i, "answer_id": f"g{i}", "text": f"reference {i}"} for i in range(3)]),
        "answer2": _jsonl(tmp_path / "ours.jsonl", [{"question_id": i, "text": f"ours {i}"} for i in range(3)]),
        "output": tmp_path / "reviews" / "review_ours.jsonl",
    }


def _review_args(bench: dict[str, Path], base_url: str) -> list[str]:
    return ["--question", str(bench["question"]), "--context", str(bench["context"]),
            "--answer-list", str(bench["answer1"]), str(bench["answer2"]),
            "--output", str(bench["output"]), "--api-base", base_url, "--api-key", "sk-test"]


def test_review_end_to_end_with_retry_and_resume(fake_openai: FakeOpenAI, bench: dict[str, Path]) -> None:
    fake_openai.rate_limits = 1
    assert review.main(_review_args(bench, fake_openai.base_url)) == 0
    lines = [json.loads(line) for line in bench["output"].read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [0, 1, 2]
    assert [line["category"] for line in lines] == ["llava_bench_conv", "llava_bench_detail", "llava_bench_complex"]
    first = lines[0]
    assert first == {"id": 1, "question_id": 0, "answer1_id": "g0", "answer2_id": 0, "category": "llava_bench_conv",
                     "content": "8 6\nexplanation", "tuple": [8.0, 6.0]}
    assert len(fake_openai.requests) == 3 and fake_openai.rate_limits == 0

    request = fake_openai.requests[2]
    assert request["model"] == "gpt-4-0314"
    assert request["messages"][0]["role"] == "system"
    prompt = request["messages"][1]["content"]
    assert prompt.startswith("[Context]\nA man holds a trophy.\nPeople cheer.\n\nperson: [0.1, 0.2, 0.5, 0.9]\n\n")
    assert "[Question]\nWhy is the man smiling?" in prompt
    assert "[Assistant 1]\nreference 2\n\n[End of Assistant 1]" in prompt
    assert "[Assistant 2]\nours 2\n\n[End of Assistant 2]" in prompt
    rules = review.load_rules(None)
    assert prompt.endswith(f"[System]\n{rules['llava_bench_complex']['prompt']}\n\n")

    assert review.main(_review_args(bench, fake_openai.base_url)) == 0  # resume: nothing left to do
    assert len(bench["output"].read_text().splitlines()) == 3
    assert len(fake_openai.requests) == 3


def test_review_resumes_partial_output_and_flags_unreadable_scores(
    fake_openai: FakeOpenAI, bench: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bench["output"].parent.mkdir()
    _jsonl(bench["output"], [{"id": 1, "question_id": 0, "category": "llava_bench_conv", "tuple": [7, 7]}])
    fake_openai.reply = "Assistant 1 is better.\nBecause."
    assert review.main(_review_args(bench, fake_openai.base_url)) == 0
    lines = [json.loads(line) for line in bench["output"].read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [0, 1, 2]
    assert [line["tuple"] for line in lines[1:]] == [[-1, -1], [-1, -1]]
    assert "warning" in capsys.readouterr().err


@pytest.mark.parametrize("reply, expected", [("8 7", [8.0, 7.0]), ("8,7\nwhy", [8.0, 7.0]), ("9.5, 6\n", [9.5, 6.0]),
                                             ("8 7 6", [-1, -1]), ("eight seven", [-1, -1]), ("", [-1, -1])])
def test_parse_score(reply: str, expected: list[float]) -> None:
    assert review.parse_score(reply) == expected


def test_review_errors_exit_2(tmp_path: Path, bench: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = _review_args(bench, "http://127.0.0.1:9/v1")
    missing = [a if a != str(bench["context"]) else str(tmp_path / "nope.jsonl") for a in args]
    assert review.main(missing) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err

    _jsonl(bench["question"], [{"question_id": 0, "image": "a.jpg", "text": "?", "category": "poetry"}])
    assert review.main(args) == 2
    assert "llava_bench_poetry not in the rule file" in capsys.readouterr().err


def test_summarize_known_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reviews = [
        {"question_id": 0, "category": "llava_bench_conv", "tuple": [8, 6]},
        {"question_id": 1, "category": "llava_bench_conv", "tuple": [10, 9]},
        {"question_id": 2, "category": "llava_bench_detail", "tuple": [5, 5]},
        {"question_id": 3, "category": "llava_bench_detail", "tuple": [-1, -1]},
    ]
    _jsonl(tmp_path / "review_ours.jsonl", reviews)
    _jsonl(tmp_path / "notes.jsonl", [{"tuple": "ignored: not a review file name"}])
    assert summary.main(["-d", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    # all: means 23/3 = 7.667 and 20/3 = 6.667; conv: 9 and 7.5; detail: 5 and 5.
    assert captured.out.splitlines() == [
        "review_ours", "all 87.0 76.7 66.7", "llava_bench_conv 83.3 90.0 75.0", "llava_bench_detail 100.0 50.0 50.0",
        "=================================",
    ]
    assert "1 review(s) without readable scores" in captured.err

    assert summary.main(["-f", str(tmp_path / "review_ours.jsonl"), "-i", "1"]) == 0
    assert "all 84.6 65.0 55.0" in capsys.readouterr().out.splitlines()


def test_summarize_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert summary.main(["-f", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert summary.main(["-d", str(tmp_path / "absent")]) == 2
    assert "no such directory" in capsys.readouterr().err
