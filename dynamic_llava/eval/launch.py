"""Data-parallel evaluation: `python -m dynamic_llava.eval.launch --runner model_vqa_loader --num-chunks N
[--devices cuda:0,cuda:1] --answers-file OUT -- <runner args>`.

Starts one runner process per chunk (`--chunk-idx i --num-chunks N --device <d> --answers-file
<OUT stem>.chunk<i>.jsonl`, devices used round-robin), waits for all, and if every chunk succeeded
writes their concatenation, i.e. the answers in question order, to OUT (atomically). The chunk files
are kept: rerunning after a failure resumes each chunk where it stopped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from ..errors import UserError, run_command
from .io import write_text_atomic

RUNNERS = ("model_vqa_loader", "model_vqa", "model_vqa_science", "model_vqa_mmbench")
OWN_FLAGS = ("--answers-file", "--num-chunks", "--num_chunks", "--chunk-idx", "--chunk_idx", "--device")


def chunk_file(answers_file: Path, chunk_idx: int) -> Path:
    """Where chunk `chunk_idx` writes its answers: next to the merged file."""
    return answers_file.with_name(f"{answers_file.stem}.chunk{chunk_idx}.jsonl")


def default_devices() -> list[str]:
    """Every visible GPU, else the CPU."""
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


def chunk_command(runner: str, runner_args: Sequence[str], answers: Path, num_chunks: int, chunk_idx: int,
                  device: str) -> list[str]:
    return [sys.executable, "-m", f"dynamic_llava.eval.{runner}", *runner_args, "--answers-file", str(answers),
            "--num-chunks", str(num_chunks), "--chunk-idx", str(chunk_idx), "--device", device]


def merge(parts: Sequence[Path], out: Path) -> int:
    """Concatenate the chunk files (each ends with a newline) into `out`; returns the number of lines."""
    text = "".join(part.read_text(encoding="utf-8") if part.exists() else "" for part in parts)
    write_text_atomic(out, text)
    return text.count("\n")


def run(args: argparse.Namespace) -> int:
    runner_args = args.runner_args[1:] if args.runner_args[:1] == ["--"] else args.runner_args
    clashes = [a for a in runner_args if a.split("=", 1)[0] in OWN_FLAGS]
    if clashes:
        raise UserError(f"{', '.join(clashes)}: set by the launcher; give --answers-file, --num-chunks and "
                        "--devices to the launcher instead")
    if args.num_chunks < 1:
        raise UserError(f"--num-chunks must be >= 1, got {args.num_chunks}")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else default_devices()
    if not devices:
        raise UserError("--devices is empty")
    out = Path(args.answers_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [chunk_file(out, i) for i in range(args.num_chunks)]
    processes: list[subprocess.Popen] = []
    try:
        for i, part in enumerate(parts):
            command = chunk_command(args.runner, runner_args, part, args.num_chunks, i, devices[i % len(devices)])
            processes.append(subprocess.Popen(command))
        codes = [process.wait() for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
    failed = [f"chunk {i} on {devices[i % len(devices)]} (exit code {code})"
              for i, code in enumerate(codes) if code != 0]
    if failed:
        print(f"error: {'; '.join(failed)} failed, see its messages above; {out} not written. "
              "Rerun the same command to resume.", file=sys.stderr)
        return 1
    print(f"merged {merge(parts, out)} answers from {len(parts)} chunks into {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.eval.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runner", choices=RUNNERS, default="model_vqa_loader")
    parser.add_argument("--num-chunks", "--num_chunks", dest="num_chunks", type=int, required=True)
    parser.add_argument("--devices", default=None,
                        help="comma-separated, used round-robin (default: every visible GPU, else cpu)")
    parser.add_argument("--answers-file", required=True, help="merged answers jsonl to write")
    parser.add_argument("runner_args", nargs=argparse.REMAINDER, help="after --: the runner's own flags")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
