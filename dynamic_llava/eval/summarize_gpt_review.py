"""Summarise GPT reviews: `python -m dynamic_llava.eval.summarize_gpt_review (-d DIR | -f FILE...)`.

Per review file, one line per category and one for `all`, as in LLaVA:
`<category> <relative score> <answer-1 mean x10> <answer-2 mean x10>`, the relative score being
mean(answer 2) / mean(answer 1) * 100. Reviews whose scores could not be read ([-1, -1]) are left out.
With `-d`, the directory's `.jsonl` files whose names start with `gpt4_text`, `reviews_` or `review_`
(all of its `.jsonl` files if the directory's own name contains "review") are read.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..cli import run_command
from ..errors import UserError
from .io import read_jsonl, require_keys


def summarize(reviews: list[dict], where: str, ignore: Sequence = ()) -> dict[str, tuple[float, float, float]]:
    """Per category (and `all`): (relative score, mean 1 x10, mean 2 x10), rounded as LLaVA does."""
    scores: dict[str, list[list[float]]] = defaultdict(list)
    skipped = 0
    for number, review in enumerate(reviews, start=1):
        require_keys(review, ["tuple"], f"{where}: review {number}")
        if review.get("question_id") in ignore:
            continue
        pair = [float(x) for x in review["tuple"]]
        if len(pair) != 2:
            raise UserError(f"{where}: review {number}: expected two scores, got {review['tuple']}")
        if pair == [-1.0, -1.0]:
            skipped += 1
            continue
        if "category" in review:
            scores[review["category"]].append(pair)
        scores["all"].append(pair)
    if skipped:
        print(f"warning: {where}: {skipped} review(s) without readable scores left out", file=sys.stderr)
    summary = {}
    for category, pairs in sorted(scores.items()):
        mean1 = round(sum(p[0] for p in pairs) / len(pairs), 3)
        mean2 = round(sum(p[1] for p in pairs) / len(pairs), 3)
        relative = round(mean2 / mean1 * 100, 1) if mean1 else float("nan")
        summary[category] = (relative, round(mean1 * 10, 1), round(mean2 * 10, 1))
    return summary


def review_files(args: argparse.Namespace) -> list[Path]:
    """The files named with `-f`, or the review files found in `-d`."""
    if args.files:
        return [Path(f) for f in args.files]
    directory = Path(args.dir)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory")
    files = sorted(
        path for path in directory.iterdir()
        if path.suffix == ".jsonl"
        and (path.name.startswith(("gpt4_text", "reviews_", "review_")) or "review" in directory.name)
    )
    if not files:
        raise UserError(f"{directory}: no review files")
    return files


def run(args: argparse.Namespace) -> int:
    for path in review_files(args):
        config = path.name.replace("gpt4_text_", "").replace(".jsonl", "")
        if args.select and any(word not in config for word in args.select):
            continue
        summary = summarize(read_jsonl(path), str(path), args.ignore)
        print(config)
        for category, (relative, mean1, mean2) in summary.items():
            print(category, relative, mean1, mean2)
        print("=================================")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", "--dir")
    source.add_argument("-f", "--files", nargs="+")
    parser.add_argument("-s", "--select", nargs="*", default=None, help="only files whose name contains all of these")
    parser.add_argument("-i", "--ignore", nargs="*", type=int, default=[], help="question ids to leave out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
