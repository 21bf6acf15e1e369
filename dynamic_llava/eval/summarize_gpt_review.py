"""Summarise GPT reviews: `python -m dynamic_llava.eval.summarize_gpt_review [-d DIR] [-f FILE...]`.

Per review file, one line per category and one for `all`, as in LLaVA:
`<category> <relative score> <answer-1 mean x10> <answer-2 mean x10>`, the relative score being
mean(answer 2) / mean(answer 1) * 100. Reviews whose scores could not be read ([-1, -1]) are left out.
With `-f`, those files (relative to `-d` if it is given too); with only `-d`, the directory's `.jsonl`
files whose names start with `gpt4_text`, `reviews_` or `review_` (all of its `.jsonl` files if the
directory's path contains "review"). Files are read in name order. `-s WORD...` keeps the files whose
name contains every word; `-v 0613` keeps those whose name contains "0613", `-v 0314` the others
(LLaVA's GPT-4 versions). A review without `category` may carry its pair in `score` instead of `tuple`.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..errors import UserError, run_command
from .io import read_jsonl, require_keys


def summarize(reviews: list[dict], where: str, ignore: Sequence = ()) -> dict[str, tuple[float, float, float]]:
    """Per category (and `all`): (relative score, mean 1 x10, mean 2 x10), rounded as LLaVA does."""
    scores: dict[str, list[list[float]]] = defaultdict(list)
    skipped = 0
    for number, review in enumerate(reviews, start=1):
        key = "score" if "tuple" not in review and "category" not in review else "tuple"
        require_keys(review, [key], f"{where}: review {number}")
        if review.get("question_id") in ignore:
            continue
        if not isinstance(review[key], list) or len(review[key]) != 2:
            raise UserError(f"{where}: review {number}: expected two scores, got {review[key]!r}")
        pair = [float(x) for x in review[key]]
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
    """The files named with `-f` (under `-d` if given), else the review files found in `-d`, sorted."""
    if args.files:
        return [Path(args.dir or "", name) for name in sorted(args.files)]
    if args.dir is None:
        raise UserError("give -d DIR or -f FILE...")
    directory = Path(args.dir)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory")
    files = sorted(
        path for path in directory.iterdir()
        if path.name.endswith(".jsonl")
        and (path.name.startswith(("gpt4_text", "reviews_", "review_")) or "review" in args.dir)
    )
    if not files:
        raise UserError(f"{directory}: no review files")
    return files


def gpt4_version(config: str) -> str:
    """LLaVA's reading of which GPT-4 wrote the reviews: "0613" if the name says so, else "0314"."""
    return "0613" if "0613" in config else "0314"


def run(args: argparse.Namespace) -> int:
    for path in review_files(args):
        config = path.name.replace("gpt4_text_", "").replace(".jsonl", "")
        if args.select is not None and any(word not in config for word in args.select):
            continue
        if args.version is not None and args.version != gpt4_version(config):
            continue
        summary = summarize(read_jsonl(path), str(path), args.ignore)
        print(config)
        for category, (relative, mean1, mean2) in summary.items():
            print(category, relative, mean1, mean2)
        print("=================================")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--dir", help="folder of review files (with -f: the folder the files are in)")
    parser.add_argument("-f", "--files", nargs="*", default=[], help="review files")
    parser.add_argument("-v", "--version", help="only files of this GPT-4 version: 0613 or 0314")
    parser.add_argument("-s", "--select", nargs="*", default=None, help="only files whose name contains all of these")
    parser.add_argument("-i", "--ignore", nargs="*", type=int, default=[], help="question ids to leave out")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
