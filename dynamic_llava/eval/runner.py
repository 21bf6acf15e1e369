"""The shared benchmark runner behind `model_vqa_loader`, `model_vqa` and `model_vqa_science`.

Questions -> chunk `--chunk-idx` of `--num-chunks` -> skip those already answered (resume) -> batches
through `prepare_request` and `generate` -> one answer line per question, appended and flushed after
every batch, so an interrupted run keeps what it finished and a rerun picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from tqdm import tqdm

from ..errors import UserError, run_command
from ..generation import GenerationConfig, GenerationResult, generate
from ..mm_utils import get_model_name_from_path
from ..model.policy import make_policy
from ..model_options import add_device_arguments, load_model
from ..prompting import prepare_request

T = TypeVar("T")


@dataclass
class Question:
    question_id: Any  # int or str, as in the question file
    text: str  # the query given to the model (and recorded as the answer's `prompt`)
    image: str | None = None  # file name under --image-folder; None: a text-only request
    image_data: str | None = None  # base64 image (MMBench's TSV), used instead of `image`
    extra: dict[str, Any] = field(default_factory=dict)  # answer fields added or replaced (MMBench's round_id)

    @property
    def key(self) -> tuple[Any, Any]:
        """What identifies one answer line: the question id and, for MMBench's rounds, the round."""
        return self.question_id, self.extra.get("round_id")


def add_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """LLaVA's evaluation flags (underscore and dash spellings), plus sparsity, device and batching."""
    from ..sparsity_options import add_sparsity_arguments

    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--image-folder", default="")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--conv-mode", default="llava_v1")
    parser.add_argument("--num-chunks", "--num_chunks", dest="num_chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", "--chunk_idx", dest="chunk_idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1,
                        help="only 1 (greedy / sampling) is supported")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int,
                        default=max_new_tokens)
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1)
    add_sparsity_arguments(parser)
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")


def get_chunk(items: Sequence[T], num_chunks: int, chunk_idx: int) -> list[T]:
    """Part `chunk_idx` of `items` split into `num_chunks` contiguous parts whose sizes differ by at most 1."""
    if num_chunks < 1:
        raise UserError(f"--num-chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise UserError(f"--chunk-idx must be in [0, {num_chunks}), got {chunk_idx}")
    size, extra = divmod(len(items), num_chunks)
    start = chunk_idx * size + min(chunk_idx, extra)
    return list(items[start:start + size + (chunk_idx < extra)])


def chunk_questions(questions: Sequence[Question], num_chunks: int, chunk_idx: int) -> list[Question]:
    """`get_chunk` over question ids: consecutive questions sharing an id (MMBench's rounds) stay together."""
    groups: list[list[Question]] = []
    for question in questions:
        if groups and groups[-1][0].question_id == question.question_id:
            groups[-1].append(question)
        else:
            groups.append([question])
    return [question for group in get_chunk(groups, num_chunks, chunk_idx) for question in group]


def read_question_jsonl(path: str) -> list[Question]:
    """LLaVA's question jsonl: one `{question_id, image, text[, category]}` per line."""
    questions = []
    for number, line in enumerate(read_text(path, "question file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            questions.append(Question(row["question_id"], row["text"], row.get("image") or None))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: expected a JSON object with question_id and text") from None
    return questions


def read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def answered_keys(path: Path) -> set[tuple[Any, Any]]:
    """`Question.key`s already in the answers file; a trailing partial line (interrupted write) is removed."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    keys = set()
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            keys.add((row["question_id"], row.get("round_id")))
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number} is not an answer line; fix or move the answers file") from None
    return keys


def run(args: argparse.Namespace, read_questions: Callable[[argparse.Namespace], list[Question]]) -> int:
    """Answer the questions of this chunk not yet in the answers file."""
    if args.num_beams != 1:
        raise UserError("beam search is not supported: use --num-beams 1")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    questions = chunk_questions(read_questions(args), args.num_chunks, args.chunk_idx)
    answers_file = Path(args.answers_file)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    done = answered_keys(answers_file)
    todo = [q for q in questions if q.key not in done]
    for question in todo:  # fail on a missing image before loading the model
        if question.image_data is None and question.image is not None and not (Path(args.image_folder) / question.image).is_file():
            raise UserError(f"image file not found: {Path(args.image_folder) / question.image} "
                            f"(question {question.question_id})")
    if len(todo) < len(questions):
        print(f"resuming: {len(questions) - len(todo)} of {len(questions)} questions already answered",
              file=sys.stderr)
    if not todo:
        return 0

    tokenizer, model, image_processor = load_model(args)
    model_id = get_model_name_from_path(args.model_path)
    with answers_file.open("a", encoding="utf-8") as out, tqdm(total=len(todo), desc="questions") as progress:
        for start in range(0, len(todo), args.batch_size):
            batch = todo[start:start + args.batch_size]
            requests = [prepare_request(q.text, image_sources(q, args.image_folder), tokenizer, image_processor,
                                        model.config, args.conv_mode) for q in batch]
            config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, stop_strings=[requests[0].stop], seed=args.seed)
            # a fresh policy per batch: random rules draw from policy_seed for every batch, as one call alone would
            results = generate(model, tokenizer, [r.input_ids for r in requests],
                               [r.pixel_values for r in requests], config, make_policy(model))
            out.write("".join(answer_line(q, r, model_id) for q, r in zip(batch, results)))
            out.flush()
            progress.update(len(batch))
    return 0


def main(argv: Sequence[str] | None, prog: str, description: str | None, max_new_tokens: int,
         read_questions: Callable[[argparse.Namespace], list[Question]],
         extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """A runner entry point: parse LLaVA's flags (plus `extra_arguments`) and run; bad input exits 2."""

    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, max_new_tokens)
    if extra_arguments is not None:
        extra_arguments(parser)
    return run_command(lambda args: run(args, read_questions), parser.parse_args(argv))


def image_sources(question: Question, image_folder: str) -> list[str | Path]:
    """The question's image as `load_image` takes it: base64 text, a file under `image_folder`, or none."""
    if question.image_data is not None:
        return [question.image_data]
    return [Path(image_folder) / question.image] if question.image else []


def answer_line(question: Question, result: GenerationResult, model_id: str) -> str:
    """One answers-jsonl line in LLaVA's format, with the efficiency stats in `metadata`."""
    return json.dumps({
        "question_id": question.question_id,
        "prompt": question.text,
        **question.extra,
        "text": result.text.strip(),
        "answer_id": uuid.uuid4().hex,
        "model_id": model_id,
        "metadata": result.efficiency_stats(),
    }, ensure_ascii=False) + "\n"
