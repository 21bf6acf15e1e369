"""LLaVA-Bench GPT review: `python -m dynamic_llava.eval.eval_gpt_review_visual --question Q --context C
--answer-list A1 A2 --rule R --output O [--max-tokens N] [--model M] [--api-base URL] [--api-key KEY]`.

For each question, LLaVA's review prompt (the image's caption(s) and object boxes from the context file,
the question, both answers, and the rule of the question's `llava_bench_<category>`) goes to an
OpenAI-compatible chat completions API; the judge's first line holds the two scores. One jsonl line per
question is appended (and flushed) to the output; questions already reviewed there are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError, run_command
from .io import read_json, read_jsonl, require_keys

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
MAX_ATTEMPTS = 6
RETRY_DELAY = 2.0  # seconds before the first retry; doubled after each failed attempt


def parse_score(review: str) -> list[float]:
    """The two scores on the reply's first line ("8 7" or "8,7"); [-1, -1] (with a warning) if unreadable."""
    fields = review.split("\n")[0].replace(",", " ").split()
    try:
        if len(fields) == 2:
            return [float(fields[0]), float(fields[1])]
    except ValueError:
        pass
    print(f"warning: cannot read two scores from the review: {review[:200]!r}", file=sys.stderr)
    return [-1, -1]


def context_text(context: dict) -> str:
    """The image description: its caption(s), then one `category: bbox` line per object if any are given."""
    captions = context.get("caption", context.get("captions", ""))
    text = "\n".join(captions) if isinstance(captions, list) else str(captions)
    boxes = [f"{obj['category']}: {obj['bbox']}" for obj in context.get("instances", [])]
    return text + ("\n\n" + "\n".join(boxes) if boxes else "")


def review_prompt(context: str, question: str, answer1: str, answer2: str, rule: dict) -> str:
    """LLaVA's review prompt layout."""
    role = rule["role"]
    return (f"[Context]\n{context}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule['prompt']}\n\n")


def request_review(client: Any, model: str, content: str, max_tokens: int) -> str:
    """One chat completion, retried with exponential backoff on rate limits and transient failures."""
    import openai

    transient = (openai.RateLimitError, openai.APIConnectionError, openai.InternalServerError)
    attempt, delay = 1, RETRY_DELAY
    while True:
        try:
            response = client.chat.completions.create(
                model=model,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
                temperature=0.2,
                max_tokens=max_tokens,
            )
            return response.choices[0].message.content or ""
        except transient as error:
            if attempt >= MAX_ATTEMPTS:
                raise UserError(f"review request failed after {MAX_ATTEMPTS} attempts: {error}") from None
            print(f"warning: {type(error).__name__}, retrying in {delay:g}s", file=sys.stderr)
            time.sleep(delay)
            attempt, delay = attempt + 1, delay * 2
        except openai.APIStatusError as error:
            raise UserError(f"review request rejected ({error.status_code}): {error.message}") from None


def load_rules(path: str | None) -> dict:
    """The rule json given, or the packaged `table/rule.json`."""
    if path is not None:
        return read_json(path)
    return json.loads(resources.files(__package__).joinpath("table/rule.json").read_text(encoding="utf-8"))


def _answers_by_id(path: str) -> dict:
    answers = {}
    for record in read_jsonl(path):
        require_keys(record, ["question_id", "text"], path)
        answers[record["question_id"]] = record
    return answers


def run(args: argparse.Namespace) -> int:
    if len(args.answer_list) != 2:
        raise UserError("--answer-list takes exactly two answer files")
    questions = read_jsonl(args.question)
    contexts = {}
    for record in read_jsonl(args.context):
        require_keys(record, ["image"], args.context)
        contexts[record["image"]] = record
    answers1, answers2 = (_answers_by_id(path) for path in args.answer_list)
    rules = load_rules(args.rule)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    if not api_key:
        raise UserError("no API key: pass --api-key or set OPENAI_API_KEY")

    output = Path(args.output)
    done = {review.get("question_id") for review in read_jsonl(output)} if output.is_file() else set()

    from openai import OpenAI

    client = OpenAI(base_url=args.api_base or os.environ.get("OPENAI_BASE_URL"), api_key=api_key, max_retries=0)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with output.open("a", encoding="utf-8") as out:
        for index, question in enumerate(questions, start=1):
            where = f"{args.question}: question {index}"
            require_keys(question, ["question_id", "image", "text", "category"], where)
            qid = question["question_id"]
            if qid in done:
                continue
            category = f"llava_bench_{question['category']}"
            if category not in rules:
                raise UserError(f"{where}: category {category} not in the rule file")
            if question["image"] not in contexts:
                raise UserError(f"{where}: no context for image {question['image']}")
            for answers, path in zip((answers1, answers2), args.answer_list):
                if qid not in answers:
                    raise UserError(f"{path}: no answer for question_id {qid}")
            answer1, answer2 = answers1[qid], answers2[qid]
            content = review_prompt(context_text(contexts[question["image"]]), question["text"],
                                    answer1["text"], answer2["text"], rules[category])
            review = request_review(client, args.model, content, args.max_tokens)
            record = {
                "id": index,
                "question_id": qid,
                "answer1_id": answer1.get("answer_id", qid),
                "answer2_id": answer2.get("answer_id", qid),
                "category": category,
                "content": review,
                "tuple": parse_score(review),
            }
            out.write(json.dumps(record) + "\n")
            out.flush()
            written += 1
    print(f"{written} review(s) written to {output} ({len(done)} already there)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-q", "--question", required=True)
    parser.add_argument("-c", "--context", required=True)
    parser.add_argument("-a", "--answer-list", nargs="+", required=True)
    parser.add_argument("-r", "--rule", default=None, help="rule json (default: the packaged table/rule.json)")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--model", default="gpt-4-0314")
    parser.add_argument("--api-base", default=None, help="default: $OPENAI_BASE_URL, else OpenAI's")
    parser.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
