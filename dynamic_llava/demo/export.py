"""`dynamic-llava demo export --from DIR/stage3`: the bundled demo model and sample images from a chain's output.

Writes (default: inside the package, what `dynamic-llava ask` uses without `--model-path`):
- `assets/demo_model/`: the Dynamic-LLaVA checkpoint in bf16 (LLaVA layout), its CLIP tower in
  `vision_tower/` (referenced by the relative path "vision_tower") and its tokenizer: self-contained;
- `assets/samples/`: the first `--samples` test-split images of the chain's data (`<scene>.png`) and
  `questions.jsonl` with every short-answer test question about them and its ground-truth answer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from ..constants import BUNDLED_MODEL, BUNDLED_SAMPLES
from ..errors import UserError

SAMPLE_QUESTIONS = "questions.jsonl"
_TOWER = "vision_tower"


def export_model(source: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """Load `source` (a Dynamic-LLaVA checkpoint) and save it to `out` in `dtype` with its tower inside."""
    import torch

    from ..model.loading import load_pretrained_model, save_pretrained_llava

    tokenizer, model, processor, _ = load_pretrained_model(source, dtype="float32")
    model.config.mm_vision_tower = _TOWER  # relative: resolved inside the checkpoint folder
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype  # written to config.json as torch_dtype (config.torch_dtype: deprecated)
    _replace_dir(out, lambda tmp: save_pretrained_llava(model, tokenizer, tmp, image_processor=processor))
    return out


def export_samples(data: Path, out: Path, count: int) -> list[dict]:
    """Copy the first `count` test scenes' images to `out` and write their questions and answers."""
    from ..eval.io import read_jsonl

    scenes = read_jsonl(data / "test" / "scenes.jsonl")[:count]
    questions = {q["question_id"]: q for q in read_jsonl(data / "test" / "questions.jsonl")}
    answers = read_jsonl(data / "test" / "answers.jsonl")
    rows = []

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        for scene in scenes:
            name = f"{scene['scene_id']}.png"
            shutil.copyfile(data / "images" / scene["image"], tmp / name)
            for answer in answers:
                if answer["question_id"].startswith(scene["scene_id"] + "_"):
                    question = questions[answer["question_id"]]
                    rows.append({"question_id": answer["question_id"], "image": name, "text": question["text"],
                                 "answer": answer["answer"], "category": answer["category"]})
        (tmp / SAMPLE_QUESTIONS).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    _replace_dir(out, write)
    return rows


def _replace_dir(out: Path, fill) -> None:
    """Build the folder next to `out`, then swap it in: a failed export leaves the old one intact."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)) / out.name
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, help="a chain's stage-3 folder (DIR/stage3)")
    parser.add_argument("--data", default=None, help="the chain's data folder (default: next to --from, DIR/data)")
    parser.add_argument("--out", default=str(BUNDLED_MODEL), help="model folder (default: the bundled model)")
    parser.add_argument("--samples-out", default=str(BUNDLED_SAMPLES), help="sample images folder")
    parser.add_argument("--samples", type=int, default=4, help="how many test images to bundle")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")


def run(args: argparse.Namespace) -> int:
    from ..model.checkpoint_files import require_dynamic_llava_checkpoint

    source = Path(args.source)
    data = Path(args.data) if args.data else source.parent / "data"
    require_dynamic_llava_checkpoint(source)
    if not (data / "test" / "scenes.jsonl").is_file():
        raise UserError(f"{data} is not a `data synth` folder (no test/scenes.jsonl); pass --data")
    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    export_model(source, Path(args.out), args.dtype)
    rows = export_samples(data, Path(args.samples_out), args.samples)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"model written to {args.out} ({size / 2**20:.1f} MiB); {args.samples} images and "
          f"{len(rows)} questions written to {args.samples_out}")
    return 0
