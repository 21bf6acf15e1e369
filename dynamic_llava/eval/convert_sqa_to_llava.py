"""ScienceQA to LLaVA's question files: `python -m dynamic_llava.eval.convert_sqa_to_llava convert_to_llava
--base-dir D --prompt-format CQM-A --split test` writes `D/llava_test_CQM-A.json` (a list of
`{id, image?, conversations}`); `convert_to_jsonl` writes `D/scienceqa_test_CQM-A.jsonl`
(`{id, image?, instruction, output}`).

`D` holds ScienceQA's `problems.json` and `pid_splits.json`. The prompt is built like LLaVA's
`scripts/convert_sqa_to_llava.py`: e.g. CQM-A asks "Context: ...\\nQuestion: ...\\nOptions: (A) x (B) y"
(the context is the hint, "N/A" if empty) and answers "The answer is A."; a problem with an image gets
"\\n<image>" after the prompt and `image` = `<id>/<image file>`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError, run_command
from .io import read_json, require_keys, write_json_atomic, write_text_atomic

OPTIONS = ("A", "B", "C", "D", "E")
INPUT_FORMATS = {
    "CQM": "Context: {context}\nQuestion: {question}\nOptions: {choice}\n",
    "QCM": "Question: {question}\nContext: {context}\nOptions: {choice}\n",
    "QCML": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture}\n",
    "QCME": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {solution}\n",
    "QCMLE": "Question: {question}\nContext: {context}\nOptions: {choice}\nBECAUSE: {lecture} {solution}\n",
    "QCLM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture}\nOptions: {choice}\n",
    "QCEM": "Question: {question}\nContext: {context}\nBECAUSE: {solution}\nOptions: {choice}\n",
    "QCLEM": "Question: {question}\nContext: {context}\nBECAUSE: {lecture} {solution}\nOptions: {choice}\n",
}
# LLaVA's table as is, including AL giving the solution and AE the lecture.
OUTPUT_FORMATS = {
    "A": "Answer: The answer is {answer}.",
    "AL": "Answer: The answer is {answer}. BECAUSE: {solution}",
    "AE": "Answer: The answer is {answer}. BECAUSE: {lecture}",
    "ALE": "Answer: The answer is {answer}. BECAUSE: {lecture} {solution}",
    "AEL": "Answer: The answer is {answer}. BECAUSE: {solution} {lecture}",
    "LA": "Answer: {lecture} The answer is {answer}.",
    "EA": "Answer: {solution} The answer is {answer}.",
    "LEA": "Answer: {lecture} {solution} The answer is {answer}.",
    "ELA": "Answer: {solution} {lecture} The answer is {answer}.",
}


def _lepa(fields: dict[str, str]) -> str:
    """The LEPA answer: optional LECTURE / SOLUTION lines, "###", then "ANSWER: X."."""
    text = f"LECTURE: {fields['lecture']}\n" if fields["lecture"].strip() else ""
    text += f"SOLUTION: {fields['solution']}\n" if fields["solution"].strip() else ""
    return text + f"###\nANSWER: {fields['answer']}."


def _tidy(text: str) -> str:
    """LLaVA's clean-up: double spaces collapsed once, stripped, a dangling "BECAUSE:" dropped."""
    text = text.replace("  ", " ").strip()
    return text.replace("BECAUSE:", "").strip() if text.endswith("BECAUSE:") else text


def check_format(prompt_format: str) -> tuple[str, str]:
    """Split "CQM-A" into its input and output parts, or raise a `UserError`."""
    input_format, _, output_format = prompt_format.partition("-")
    if input_format not in INPUT_FORMATS or (output_format not in OUTPUT_FORMATS and output_format != "LEPA"):
        raise UserError(f"unknown prompt format {prompt_format!r}: expected INPUT-OUTPUT with INPUT one of "
                        f"{', '.join(INPUT_FORMATS)} and OUTPUT one of {', '.join(OUTPUT_FORMATS)}, LEPA")
    return input_format, output_format


def build_example(problem: dict, prompt_format: str) -> tuple[str, str]:
    """(prompt, answer) of one problem, without LLaVA's "Question: " / "Answer: " prefixes."""
    input_format, output_format = check_format(prompt_format)
    if len(problem["choices"]) > len(OPTIONS) or not 0 <= problem["answer"] < len(problem["choices"]):
        raise UserError(f"answer {problem['answer']} is not one of {len(problem['choices'])} choices")
    fields = {
        "question": problem["question"],
        "context": (problem.get("hint") or "").strip() or "N/A",
        "choice": " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(problem["choices"])),
        "answer": OPTIONS[problem["answer"]],
        "lecture": problem.get("lecture") or "",
        "solution": problem.get("solution") or "",
    }
    prompt = _tidy(INPUT_FORMATS[input_format].format(**fields))
    answer = _tidy(_lepa(fields) if output_format == "LEPA" else OUTPUT_FORMATS[output_format].format(**fields))
    return prompt.removeprefix("Question: "), answer.removeprefix("Answer: ")


def split_problems(base_dir: str, split: str) -> list[tuple[str, dict]]:
    """The (id, problem) pairs of `split`, in `pid_splits.json` order."""
    splits = read_json(Path(base_dir) / "pid_splits.json")
    problems = read_json(Path(base_dir) / "problems.json")
    if split not in splits:
        raise UserError(f"pid_splits.json has no split {split!r} (it has {', '.join(sorted(splits))})")
    missing = [pid for pid in splits[split] if pid not in problems]
    if missing:
        raise UserError(f"problems.json lacks {len(missing)} problem(s) of split {split!r}, e.g. {missing[0]}")
    for pid in splits[split]:
        require_keys(problems[pid], ("question", "choices", "answer"), f"problem {pid}")
    return [(pid, problems[pid]) for pid in splits[split]]


def _records(args: argparse.Namespace, make: Callable[[str, str | None, str, str], dict]) -> list[dict]:
    check_format(args.prompt_format)
    records = []
    for pid, problem in split_problems(args.base_dir, args.split):
        prompt, answer = build_example(problem, args.prompt_format)
        image = os.path.join(pid, problem["image"]) if problem.get("image") else None
        records.append(make(pid, image, prompt, answer))
    print(f"Number of samples: {len(records)}")
    return records


def _conversation(pid: str, image: str | None, prompt: str, answer: str) -> dict:
    record: dict = {"id": pid}
    if image:
        record["image"] = image
        prompt += "\n<image>"
    record["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return record


def _instruction(pid: str, image: str | None, prompt: str, answer: str) -> dict:
    record: dict = {"id": pid}
    if image:
        record["image"] = image
        prompt += "\n<image>"
    record.update(instruction=prompt, output=answer)
    return record


def convert_to_llava(args: argparse.Namespace) -> int:
    dst = Path(args.base_dir) / f"llava_{args.split}_{args.prompt_format}.json"
    write_json_atomic(dst, _records(args, _conversation), indent=2)
    print(f"wrote {dst}")
    return 0


def convert_to_jsonl(args: argparse.Namespace) -> int:
    dst = Path(args.base_dir) / f"scienceqa_{args.split}_{args.prompt_format}.jsonl"
    write_text_atomic(dst, "".join(json.dumps(r) + "\n" for r in _records(args, _instruction)))
    print(f"wrote {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    # LLaVA's defaults differ per task: QCM-LEA for convert_to_llava, QCM-LEPA for convert_to_jsonl.
    for name, handler, default_format in (("convert_to_llava", convert_to_llava, "QCM-LEA"),
                                          ("convert_to_jsonl", convert_to_jsonl, "QCM-LEPA")):
        p = tasks.add_parser(name)
        p.add_argument("--base-dir", "--base_dir", dest="base_dir", required=True,
                       help="folder with problems.json and pid_splits.json; the output is written there")
        p.add_argument("--split", required=True, help="a split of pid_splits.json: train, val, test, ...")
        p.add_argument("--prompt-format", "--prompt_format", dest="prompt_format", default=default_format,
                       help=f"INPUT-OUTPUT, e.g. CQM-A (LLaVA's evaluation file); default {default_format}")
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
