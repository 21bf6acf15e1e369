"""TextVQA accuracy: `python -m dynamic_llava.eval.eval_textvqa --annotation-file A (--result-file R | --result-dir D)`.

As in LLaVA, `--result-dir` scores every `.jsonl` file of D in name order (saying which other files it
skips), after the `--result-file` if both are given.

A result is matched to its annotation by `question_id` when that is an annotation's question id;
otherwise (LLaVA's TextVQA question files put the image id in `question_id`) by (image id, question),
the question being the first line of the prompt (or the text after "Question:" in OCR-token prompts).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ..errors import UserError, run_command
from .io import read_json, read_jsonl, require_keys
from .vqa_answer import vqa_accuracy

_OCR_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def question_from_prompt(prompt: str) -> str:
    """The question text inside a LLaVA TextVQA prompt, lower case."""
    match = _OCR_QUESTION.search(prompt)
    if prompt.startswith("OCR tokens: ") and match:
        return match.group(1).strip().lower()
    lines = [line for line in prompt.split("\n") if line.strip()]
    if lines and lines[0].startswith("Reference OCR token:") and len(lines) > 1:
        return lines[1].strip().lower()
    return lines[0].strip().lower() if lines else ""


def score(annotations: list[dict], results: list[dict]) -> tuple[int, float]:
    """(number of scored results, mean VQA accuracy in [0, 1])."""
    by_qid: dict[str, dict] = {}
    by_image_question: dict[tuple[str, str], dict] = {}
    for index, item in enumerate(annotations):
        require_keys(item, ("question_id", "image_id", "question", "answers"), f"annotation {index}")
        by_qid[str(item["question_id"])] = item
        by_image_question[str(item["image_id"]), item["question"].strip().lower()] = item
    scores = []
    for index, result in enumerate(tqdm(results, desc="textvqa", disable=len(results) < 1000)):
        require_keys(result, ("question_id", "text"), f"result line {index + 1}")
        key = (str(result["question_id"]), question_from_prompt(result.get("prompt", "")))
        annotation = by_image_question.get(key) or by_qid.get(key[0])
        if annotation is None:
            raise UserError(f"result line {index + 1}: no annotation for question_id {key[0]!r}")
        scores.append(vqa_accuracy(result["text"], annotation["answers"]))
    if not scores:
        raise UserError("no results to score")
    return len(scores), sum(scores) / len(scores)


def score_file(annotations: list[dict], result_file: str | Path) -> None:
    """Print the experiment name, sample count and accuracy of one answers file, as LLaVA does."""
    samples, accuracy = score(annotations, read_jsonl(result_file))
    print(Path(result_file).stem)
    print(f"Samples: {samples}")
    print(f"Accuracy: {100 * accuracy:.2f}%\n")


def run(args: argparse.Namespace) -> int:
    if args.result_file is None and args.result_dir is None:
        raise UserError("give --result-file or --result-dir")
    if args.result_dir is not None and not Path(args.result_dir).is_dir():
        raise UserError(f"{args.result_dir}: no such directory")
    annotations = read_json(args.annotation_file)
    if not isinstance(annotations, dict) or not isinstance(annotations.get("data"), list):
        raise UserError(f"{args.annotation_file}: expected a TextVQA json with a 'data' list")
    if args.result_file is not None:
        score_file(annotations["data"], args.result_file)
    if args.result_dir is not None:
        for path in sorted(Path(args.result_dir).iterdir()):
            if path.name.endswith(".jsonl"):
                score_file(annotations["data"], path)
            else:
                print(f"Skipping {path.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1_val.json")
    parser.add_argument("--result-file", help="answers jsonl (question_id, prompt, text)")
    parser.add_argument("--result-dir", help="score every .jsonl answers file in this folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
