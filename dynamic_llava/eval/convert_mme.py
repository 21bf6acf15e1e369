"""MME answer files: `python -m dynamic_llava.eval.convert_mme --experiment NAME` (run in the MME folder).

Reads `answers/NAME.jsonl` (question_id `<category>/<image>`, prompt, text) and the ground truth in
`MME_Benchmark_release_version/<category>[/questions_answers_YN]/<image>.txt` (lines
`question<TAB>answer`), writes `eval_tool/answers/NAME/<category>.txt` with lines
`image<TAB>question<TAB>ground truth<TAB>answer`, the input of `eval_mme`.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..errors import UserError, run_command
from .io import read_jsonl, require_keys, write_text_atomic

_SHORT_ANSWER = "Answer the question using a single word or phrase."
_YES_NO = "Please answer yes or no."


def load_ground_truth(data_path: Path) -> dict[tuple[str, str, str], str]:
    """(category, question file name, question) -> "Yes" / "No" over the MME release folder."""
    if not data_path.is_dir():
        raise UserError(f"{data_path}: no such directory")
    truth = {}
    for category_dir in sorted(p for p in data_path.iterdir() if p.is_dir()):
        qa_dir = category_dir / "questions_answers_YN"
        for path in sorted((qa_dir if qa_dir.is_dir() else category_dir).glob("*.txt")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    question, _, answer = line.strip().partition("\t")
                    truth[category_dir.name, path.name, question] = answer
    return truth


def mme_question(prompt: str, category: str, file: str, truth: dict) -> str:
    """The MME question as written in the ground-truth file, recovered from the model prompt."""
    question = prompt.replace(_SHORT_ANSWER, "").strip()
    if _YES_NO not in question:
        question = f"{question} {_YES_NO}"
        if (category, file, question) not in truth:  # some MME questions have two spaces before it
            question = question.replace(f" {_YES_NO}", f"  {_YES_NO}")
    return question


def convert(answers: list[dict], truth: dict) -> dict[str, list[str]]:
    """Category -> lines `image file<TAB>question<TAB>ground truth<TAB>answer`."""
    lines: dict[str, list[str]] = defaultdict(list)
    for index, answer in enumerate(answers):
        require_keys(answer, ("question_id", "prompt", "text"), f"answer line {index + 1}")
        category = str(answer["question_id"]).split("/")[0]
        file = Path(str(answer["question_id"])).stem + ".txt"
        question = mme_question(answer["prompt"], category, file, truth)
        if (category, file, question) not in truth:
            raise UserError(f"answer line {index + 1}: no ground truth for {category}/{file}: {question!r}")
        text = answer["text"].replace("\t", " ").replace("\n", " ")
        lines[category].append("\t".join((file, question, truth[category, file, question], text)))
    return lines


def run(args: argparse.Namespace) -> int:
    truth = load_ground_truth(Path(args.data_path))
    answers = read_jsonl(Path(args.answers_dir) / f"{args.experiment}.jsonl")
    out_dir = Path(args.output_dir) / args.experiment
    for category, lines in convert(answers, truth).items():
        write_text_atomic(out_dir / f"{category}.txt", "".join(line + "\n" for line in lines))
    print(f"wrote {len(answers)} answers to {out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", required=True, help="answers/<experiment>.jsonl")
    parser.add_argument("--data-path", default="MME_Benchmark_release_version")
    parser.add_argument("--answers-dir", default="answers")
    parser.add_argument("--output-dir", default="eval_tool/answers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
