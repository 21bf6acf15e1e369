"""Local MMBench accuracy (circular): `python -m dynamic_llava.eval.eval_mmbench --annotation-file
mmbench_dev.tsv --result-file answers.jsonl [--output scores.json]`.

The annotation TSV must have the `answer` column (the dev split). Each answer line is one round of
`model_vqa_mmbench` (`question_id`, `round_id`, `options`, `option_char`, `text`). The predicted letter
is the whole answer, or the "X." / "X)" it starts with, else the shown option whose text the answer is;
it is mapped back through the round's rotation (`option_char`) to the original option. A question is
correct only if every one of its rounds is (a run without `--all-rounds` has one round per question);
a question without answers is wrong. Prints the overall and per-category (`category`) accuracy.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from typing import Sequence

from ..errors import UserError, run_command
from .io import read_jsonl, read_tsv, require_keys, write_json_atomic
from .model_vqa_mmbench import ALL_OPTIONS, is_none

_LEADING_LETTER = re.compile(r"^([A-Z])[.)]")


def _norm(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def parse_letter(text: str, n_options: int, options: Sequence[str]) -> str | None:
    """The shown letter an answer picks among the first `n_options`, or None if it picks none."""
    shown = ALL_OPTIONS[:n_options]
    text = text.strip()
    match = _LEADING_LETTER.match(text)
    letter = text if len(text) == 1 else match.group(1) if match else None
    if letter in shown:
        return letter
    matches = [char for char, option in zip(shown, options) if _norm(option) == _norm(text)]
    return matches[0] if len(matches) == 1 else None


def original_choice(result: dict) -> str | None:
    """The annotation letter of the option an answer line picks (undoing the round's rotation)."""
    letter = parse_letter(result["text"], len(result["options"]), result["options"])
    return None if letter is None else result["option_char"][ALL_OPTIONS.index(letter)]


def evaluate(rows: list[dict[str, str]], results: list[dict]) -> dict:
    """Circular accuracy overall and per category, with each question's per-round original choices."""
    rounds: dict[str, dict] = defaultdict(dict)
    for result in results:
        rounds[str(result["question_id"])][result.get("round_id", 0)] = original_choice(result)
    known = {row["index"] for row in rows}
    unknown = sorted(set(rounds) - known)
    if unknown:
        raise UserError(f"{len(unknown)} answered question(s) are not in the annotation file, e.g. {unknown[0]}")
    questions, counts = {}, defaultdict(lambda: [0, 0])
    for row in rows:
        picks = [rounds[row["index"]][r] for r in sorted(rounds[row["index"]])] if row["index"] in rounds else []
        correct = bool(picks) and all(pick == row["answer"].strip() for pick in picks)
        questions[row["index"]] = {"answer": row["answer"].strip(), "predictions": picks, "correct": correct}
        category = "" if is_none(row.get("category")) else row["category"]
        for key in ("overall", category):
            counts[key][0] += correct
            counts[key][1] += 1
    n_options = {row["index"]: sum(not is_none(row.get(c)) for c in ALL_OPTIONS) for row in rows}
    return {
        "accuracy": _percent(*counts.pop("overall")),
        "correct": sum(q["correct"] for q in questions.values()),
        "total": len(questions),
        "missing": sum(not q["predictions"] for q in questions.values()),
        "partial_rounds": sum(0 < len(q["predictions"]) < n_options[i] for i, q in questions.items()),
        "categories": {c: {"accuracy": _percent(*n), "correct": n[0], "total": n[1]} for c, n in sorted(counts.items())},
        "questions": questions,
    }


def _percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total else 0.0


def run(args: argparse.Namespace) -> int:
    rows = read_tsv(args.annotation_file, ("index",))
    if "answer" not in rows[0]:
        raise UserError(f"{args.annotation_file}: no `answer` column (only the dev split can be scored locally; "
                        "for the test split use convert_mmbench_for_submission)")
    results = read_jsonl(args.result_file)
    for number, result in enumerate(results, start=1):
        require_keys(result, ("question_id", "text", "options", "option_char"), f"{args.result_file}:{number}")
    scores = evaluate(rows, results)
    print(f"Questions: {scores['total']}, answered: {scores['total'] - scores['missing']}, "
          f"with fewer rounds than options: {scores['partial_rounds']}")
    print(f"Accuracy: {scores['accuracy']:.2f}%")
    for category, score in scores["categories"].items():
        print(f"  {category or '(no category)'}: {score['accuracy']:.2f}% ({score['correct']}/{score['total']})")
    if args.output:
        write_json_atomic(args.output, scores, indent=2)
        print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", "--annotation_file", dest="annotation_file", required=True,
                        help="the MMBench dev TSV (with the answer column) the questions came from")
    parser.add_argument("--result-file", "--result_file", dest="result_file", required=True,
                        help="answers jsonl of model_vqa_mmbench (ideally run with --all-rounds)")
    parser.add_argument("--output", help="also write the scores (and per-question rounds) as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
