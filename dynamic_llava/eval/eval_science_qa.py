"""ScienceQA accuracy: `python -m dynamic_llava.eval.eval_science_qa --base-dir D --result-file R
--output-file O --output-result S [--split test] [--options ABCDE]`.

`D` holds `problems.json` and `pid_splits.json`. The option letter is read LLaVA's way: the whole
answer is a letter, or it starts with "X. ", or it contains exactly one "The answer is X."; anything
else (and a problem without a result) is a failure, counted wrong, as in current LLaVA (no random
guess). `--options` gives the option letters run together, as LLaVA's `type=list` flag reads them.
Prints the overall accuracy, LLaVA's IMG-Accuracy (problems whose prompt has `<image>`) and the
accuracy by subject, context modality and grade band.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

from ..errors import UserError, run_command
from .io import read_json, read_jsonl, require_keys, write_json_atomic

OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}


def parse_letter(text: str, options: Sequence[str] = OPTIONS) -> str:
    """The option letter in a model answer, or "FAILED"."""
    if text in options:
        return text
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else "FAILED"


def predicted_index(letter: str, n_choices: int, options: Sequence[str] = OPTIONS) -> int:
    """Index of `letter` among the problem's first `n_choices` options, -1 if it is not one."""
    return options.index(letter) if letter in options[:n_choices] else -1


def categories(problem: dict) -> list[str]:
    """ScienceQA's breakdown: subject, context modality (TXT / IMG / NO) and grade band."""
    found = [_SUBJECTS.get(problem.get("subject", ""), "OTHER")]
    if problem.get("hint"):
        found.append("TXT")
    if problem.get("image"):
        found.append("IMG")
    if not problem.get("hint") and not problem.get("image"):
        found.append("NO")
    grade = int(re.sub(r"\D", "", str(problem.get("grade", ""))) or 0)
    found.append("G1-6" if grade <= 6 else "G7-12")
    return found


def option_letters(value: str) -> list[str]:
    """`--options ABCDE` -> ["A", ..., "E"]: each character is one option letter, as with LLaVA's `type=list`."""
    if not value or len(set(value)) != len(value):
        raise argparse.ArgumentTypeError(f"expected distinct option letters run together, e.g. ABCDE, got {value!r}")
    return list(value)


def evaluate(problems: dict[str, dict], predictions: dict[str, dict],
             options: Sequence[str] = OPTIONS) -> tuple[dict, dict]:
    """(per-problem analysis split into correct / incorrect, LLaVA's summary with per-category accuracy)."""
    results: dict[str, list] = {"correct": [], "incorrect": []}
    summary: dict = {"acc": None, "correct": None, "count": None, "results": {}, "outputs": {}}
    per_category: dict[str, list[int]] = {}
    for pid, problem in problems.items():
        require_keys(problem, ("choices", "answer"), f"problem {pid}")
        if not isinstance(problem["answer"], int) or not 0 <= problem["answer"] < len(options):
            raise UserError(f"problem {pid}: answer {problem['answer']} has no letter among the options {options}")
        pred = predictions.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        letter = parse_letter(pred["text"], options)
        index = predicted_index(letter, len(problem["choices"]), options)
        is_correct = index == problem["answer"]
        results["correct" if is_correct else "incorrect"].append({
            "question_id": pid,
            "parsed_ans": letter,
            "ground_truth": options[problem["answer"]],
            "question": pred.get("prompt", ""),
            "pred": pred["text"],
            "is_multimodal": "<image>" in pred.get("prompt", ""),
        })
        summary["results"][pid] = index
        summary["outputs"][pid] = pred["text"]
        for category in categories(problem):
            counts = per_category.setdefault(category, [0, 0])
            counts[0] += is_correct
            counts[1] += 1
    correct, total = len(results["correct"]), len(problems)
    summary.update(acc=100 * correct / total, correct=correct, count=total)
    summary["categories"] = {name: 100 * c / n for name, (c, n) in sorted(per_category.items())}
    return results, summary


def run(args: argparse.Namespace) -> int:
    splits = read_json(f"{args.base_dir}/pid_splits.json")
    problems = read_json(f"{args.base_dir}/problems.json")
    if not isinstance(splits, dict) or args.split not in splits:
        raise UserError(f"{args.base_dir}/pid_splits.json: no split {args.split!r}")
    missing = [pid for pid in splits[args.split] if pid not in problems]
    if missing:
        raise UserError(f"problems.json lacks {len(missing)} problem(s) of split {args.split}, e.g. {missing[0]}")
    if not splits[args.split]:
        raise UserError(f"split {args.split!r} is empty")
    predictions = {}
    for index, line in enumerate(read_jsonl(args.result_file)):
        require_keys(line, ("question_id", "text"), f"{args.result_file}:{index + 1}")
        predictions[str(line["question_id"])] = line
    results, summary = evaluate({pid: problems[pid] for pid in splits[args.split]}, predictions, args.options)
    img_correct = sum(r["is_multimodal"] for r in results["correct"])
    img_total = img_correct + sum(r["is_multimodal"] for r in results["incorrect"])
    img = f"{100 * img_correct / img_total:.2f}%" if img_total else "n/a"  # LLaVA divides by zero here
    print(f"Total: {summary['count']}, Correct: {summary['correct']}, Accuracy: {summary['acc']:.2f}%, "
          f"IMG-Accuracy: {img}")
    print("  ".join(f"{name}: {acc:.2f}%" for name, acc in summary["categories"].items()))
    write_json_atomic(args.output_file, results, indent=2)
    write_json_atomic(args.output_result, summary, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--result-file", required=True, help="answers jsonl (question_id, prompt, text)")
    parser.add_argument("--output-file", required=True, help="per-problem analysis json to write")
    parser.add_argument("--output-result", required=True, help="summary json to write")
    parser.add_argument("--split", default="test")
    parser.add_argument("--options", type=option_letters, default=list(OPTIONS),
                        help="option letters run together (default ABCDE)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
