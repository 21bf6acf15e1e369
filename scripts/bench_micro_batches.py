"""Stage-2 step time of the demo chain with each step of 16 random conversations run as 1, 2 or 4
micro-batches sorted by length (`--sort_micro_batches_by_length`, gradient accumulation).

Uses the start model, tower, projector and data of a finished `dynamic-llava demo train --out CHAIN` run.
Each setting trains the chain's stage 2 for --steps steps in its own fresh process, one after the other
on the same machine, from the same start and seed (so the same random batches); the script prints
seconds per step and the ratio to a single batch of 16, and writes OUT/bench_micro_batches.json. With one
micro-batch the sort only reorders the batch, so that row is the chain's old random batches of 16.

    python scripts/bench_micro_batches.py --chain /tmp/G --out /tmp/bench_mb [--steps 30] [--micro-batches 1 2 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
from pathlib import Path

from dynamic_llava.demo.train_chain import FULL, stage2


def _one_setting(chain: Path, out: Path, micro_batches: int, steps: int) -> None:
    recipe = dataclasses.replace(FULL, micro_batches=micro_batches)
    stage2(recipe, chain / "data", chain / "start", chain / "stage0", chain / "stage1" / "mm_projector.bin", out,
           seed=0, extra_flags=["--max_steps", str(steps)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chain", required=True, help="a finished `demo train` folder")
    parser.add_argument("--out", required=True, help="new folder for the runs and the JSON")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    chain, out = Path(args.chain), Path(args.out)
    missing = [p for p in ("data/train/instruct.json", "start", "stage0", "stage1/mm_projector.bin")
               if not (chain / p).exists()]
    if missing:
        print(f"error: {chain} is not a finished chain folder (missing {', '.join(missing)})", file=sys.stderr)
        return 2
    if any(FULL.batch_size % m for m in args.micro_batches):
        print(f"error: --micro-batches must divide the batch of {FULL.batch_size}", file=sys.stderr)
        return 2
    if out.exists():
        print(f"error: {out} exists", file=sys.stderr)
        return 2
    rows = []
    spawn = multiprocessing.get_context("spawn")  # a fresh process per setting: no shared allocator state
    for micro_batches in args.micro_batches:
        run_dir = out / f"micro_batches_{micro_batches}"
        process = spawn.Process(target=_one_setting, args=(chain, run_dir, micro_batches, args.steps))
        process.start()
        process.join()
        if process.exitcode != 0:
            print(f"error: the run with {micro_batches} micro-batches failed", file=sys.stderr)
            return 1
        summary = json.loads((run_dir / "trainer_state.json").read_text(encoding="utf-8"))["log_history"][-1]
        rows.append({"micro_batches": micro_batches, "per_device_batch": FULL.batch_size // micro_batches,
                     "steps": args.steps, "seconds_per_step": summary["train_runtime"] / args.steps})
    base = rows[0]["seconds_per_step"]
    print(f"\n{'micro-batches':>14} {'s / step':>9} {'vs first':>9}")
    for row in rows:
        row["ratio_to_first"] = row["seconds_per_step"] / base
        print(f"{row['micro_batches']:>14} {row['seconds_per_step']:>9.3f} {row['ratio_to_first']:>8.2f}x")
    (out / "bench_micro_batches.json").write_text(json.dumps({"chain": str(chain), "rows": rows}, indent=2) + "\n",
                                                  encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
