"""Stage 0 of the demo chain: pre-train the tiny CLIP tower on the synthetic scenes before LLaVA training.

Real LLaVA starts from a pre-trained CLIP; the chain's tower starts random, and the LM loss reaching it
through the LLM is too weak a signal for it to learn to see. The generator knows every object, so
dense labels are free. Linear heads on the tower's output (`select_layer`, CLS dropped, as LLaVA reads it)
are trained with the tower and then thrown away: only the tower is saved, in the layout of the folder it
came from. Two kinds of head:

- per patch: the colour, shape, size and grid cell (row, column) of the object covering most of the
  patch, or "background";
- per image, on the mean of the patch features: the scene's summary, i.e. the object count, the count
  per colour and per shape, and per (colour, shape) pair its size, row and column, or "absent". A
  linear head on a mean is a sum of per-patch contributions, so the tower can keep each object's part
  of the summary on that object's own patches: dropping them loses it, which is what makes the
  token-dropping policies comparable on this tower.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..data.render import _draw_object
from ..data.scenes import COLOURS, GRID, MAX_OBJECTS, SHAPES, SIZES, Scene, scene_from_dict
from ..mm_utils import process_images
from ..model.convert import load_clip, load_image_processor
from .loss_history import LossHistory

# Per-patch heads; a patch no object covers enough of gets the extra last class of each
HEADS = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "row": tuple(range(GRID)), "col": tuple(range(GRID))}
PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]
# Per-image heads: name -> (sub-heads, classes of each). Class 0 of a pair head is "absent"; the last
# class of a row / column head is "several" (one pair can occur twice, in both sizes).
SCENE_HEADS = {"count": (1, MAX_OBJECTS + 1), "colour_count": (len(COLOURS), MAX_OBJECTS + 1),
               "shape_count": (len(SHAPES), MAX_OBJECTS + 1), "pair_size": (len(PAIRS), 4),
               "pair_row": (len(PAIRS), GRID + 2), "pair_col": (len(PAIRS), GRID + 2)}
MIN_COVERAGE = 0.05  # of a patch's pixels; a small star split over four patches still labels one of them


def patch_labels(scene: Scene, image_size: int, patch_size: int) -> dict[str, torch.Tensor]:
    """Per patch (reading order) the class index of each attribute of its main object, or len(values)
    for background; the rendering geometry is the generator's own, drawn at the tower's input size."""
    grid = image_size // patch_size
    coverage = np.zeros((len(scene.objects), grid, grid))
    for k, obj in enumerate(scene.objects):
        canvas = Image.new("RGB", (image_size, image_size))
        _draw_object(ImageDraw.Draw(canvas), obj, image_size)
        mask = np.asarray(canvas).any(axis=2)[: grid * patch_size, : grid * patch_size]
        coverage[k] = mask.reshape(grid, patch_size, grid, patch_size).mean(axis=(1, 3))
    best = coverage.argmax(axis=0).ravel()
    covered = coverage.max(axis=0).ravel() >= MIN_COVERAGE
    out = {}
    for head, values in HEADS.items():
        index = [values.index(getattr(o, head)) for o in scene.objects]
        out[head] = torch.tensor([index[b] if c else len(values) for b, c in zip(best, covered)])
    return out


def scene_labels(scene: Scene) -> dict[str, torch.Tensor]:
    """The per-image summary targets of `SCENE_HEADS`, one class index per sub-head."""
    colour_count = [sum(o.colour == c for o in scene.objects) for c in COLOURS]
    shape_count = [sum(o.shape == s for o in scene.objects) for s in SHAPES]
    size, row, col = [], [], []
    for colour, shape in PAIRS:
        # (size, colour, shape) is unique in a scene, so a pair found twice is there in both sizes
        found = [o for o in scene.objects if (o.colour, o.shape) == (colour, shape)]
        several = len(found) > 1
        size.append(0 if not found else 3 if several else 1 + SIZES.index(found[0].size))
        row.append(0 if not found else GRID + 1 if several else 1 + found[0].row)
        col.append(0 if not found else GRID + 1 if several else 1 + found[0].col)
    values = {"count": [len(scene.objects)], "colour_count": colour_count, "shape_count": shape_count,
              "pair_size": size, "pair_row": row, "pair_col": col}
    return {head: torch.tensor(value) for head, value in values.items()}


class _Heads(nn.Module):
    """Linear probes on the patch features (`HEADS`) and on their mean (`SCENE_HEADS`)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.patch = nn.ModuleDict({head: nn.Linear(hidden, len(values) + 1) for head, values in HEADS.items()})
        self.scene = nn.ModuleDict({head: nn.Linear(hidden, n * classes)
                                    for head, (n, classes) in SCENE_HEADS.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = {head: layer(features) for head, layer in self.patch.items()}
        mean = features.mean(dim=1)
        for head, layer in self.scene.items():
            n, classes = SCENE_HEADS[head]
            logits[head] = layer(mean).view(-1, n, classes)
        return logits


def load_split(data_dir: Path, split: str, processor: Any, image_size: int, patch_size: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel values (bf16, preprocessed as LLaVA training does with `--image_aspect_ratio pad`) and labels."""
    rows = [json.loads(line) for line in (data_dir / split / "scenes.jsonl").read_text(encoding="utf-8").splitlines()]
    pixels, labels = [], {head: [] for head in [*HEADS, *SCENE_HEADS]}
    for start in tqdm(range(0, len(rows), 64), desc=f"{split} images", unit="batch"):
        chunk = rows[start:start + 64]
        images = [Image.open(data_dir / "images" / row["image"]).convert("RGB") for row in chunk]
        pixels.append(process_images(images, processor, "pad").to(torch.bfloat16))
        for row in chunk:
            scene = scene_from_dict(row)
            for head, value in [*patch_labels(scene, image_size, patch_size).items(), *scene_labels(scene).items()]:
                labels[head].append(value)
    return torch.cat(pixels), {head: torch.stack(values) for head, values in labels.items()}


class SceneSplits:
    """The splits of a `data synth` folder as `load_split` gives them, each loaded on first use and kept:
    the chain's stages 0 and 1 read the same 16000 images (about a minute each time). `processor` must
    be the image processor of the towers the splits are fed to."""

    def __init__(self, data_dir: Path, processor: Any, image_size: int, patch_size: int) -> None:
        self.data_dir, self.processor = data_dir, processor
        self.image_size, self.patch_size = image_size, patch_size
        self._loaded: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def has(self, split: str) -> bool:
        return (self.data_dir / split / "scenes.jsonl").is_file()

    def __getitem__(self, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if split not in self._loaded:
            self._loaded[split] = load_split(self.data_dir, split, self.processor, self.image_size, self.patch_size)
        return self._loaded[split]


def _losses(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the heads of their mean cross-entropy (over patches, or over sub-heads)."""
    return sum(nn.functional.cross_entropy(logits[head].float().flatten(0, -2), labels[head].flatten())
               for head in logits)


@torch.no_grad()
def _evaluate(tower: nn.Module, heads: _Heads, pixels: torch.Tensor, labels: dict[str, torch.Tensor],
              select_layer: int, batch_size: int) -> dict[str, float]:
    """Held-out accuracy: per-patch attributes on object patches only (background is most patches); scene
    heads over all their sub-heads, and the pair heads also over the pairs present only (most are absent)."""
    tower.eval()
    predicted: dict[str, list[torch.Tensor]] = {head: [] for head in labels}
    for start in range(0, len(pixels), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tower(pixels[start:start + batch_size], output_hidden_states=True)
            logits = heads(out.hidden_states[select_layer][:, 1:])
        for head, value in logits.items():
            predicted[head].append(value.argmax(dim=-1))
    tower.train()
    result = {}
    for head, values in HEADS.items():
        guess, truth = torch.cat(predicted[head]), labels[head]
        foreground = truth != len(values)
        result[f"{head}_accuracy_object_patches"] = (guess == truth)[foreground].float().mean().item()
    object_patch = labels["colour"] != len(COLOURS)
    guess_object = torch.cat(predicted["colour"]) != len(COLOURS)
    result["object_vs_background_accuracy"] = (guess_object == object_patch).float().mean().item()
    for head in SCENE_HEADS:
        hit = torch.cat(predicted[head]) == labels[head]
        result[f"{head}_accuracy"] = hit.float().mean().item()
        if head.startswith("pair_"):
            result[f"{head}_accuracy_present"] = hit[labels["pair_size"] != 0].float().mean().item()
    return result


def _save_tower(tower: nn.Module, tower_dir: Path, out_dir: Path) -> None:
    """The trained weights under the `vision_model.` keys of released CLIP checkpoints, next to copies of
    the source folder's config and image processor settings (`out_dir` may be `tower_dir`: in place)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {f"vision_model.{name}": value.detach().float().contiguous() for name, value in tower.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if out_dir.resolve() != tower_dir.resolve():
        for name in ("config.json", "preprocessor_config.json"):
            shutil.copyfile(tower_dir / name, out_dir / name)


def pretrain_tower(data_dir: Path, tower_dir: Path, out_dir: Path, *, steps: int = 800, lr: float = 1e-3,
                   batch_size: int = 32, seed: int = 0, select_layer: int = -1, warmup_steps: int = 50,
                   log_every: int = 50, threads: int | None = 1, splits: SceneSplits | None = None) -> dict[str, Any]:
    """Train the CLIP tower in `tower_dir` on `data_dir`'s training scenes (a `data synth` folder); save it to
    `out_dir`. Returns the loss history (every `log_every` steps), held-out accuracy of the heads on the
    val split when there is one, and the wall time. `threads`: torch's intra-op threads meanwhile (None:
    leave them), one by default because the demo shares a small CPU. `splits`: `data_dir`'s images already
    loaded (by default they are loaded here)."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _pretrain(data_dir, tower_dir, out_dir, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                         select_layer=select_layer, warmup_steps=warmup_steps, log_every=log_every, splits=splits)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(data_dir: Path, tower_dir: Path, out_dir: Path, *, steps: int, lr: float, batch_size: int, seed: int,
              select_layer: int, warmup_steps: int, log_every: int, splits: SceneSplits | None) -> dict[str, Any]:
    began = time.perf_counter()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tower = load_clip(tower_dir, dtype=torch.float32).train()
    config = tower.config
    if splits is None:
        splits = SceneSplits(data_dir, load_image_processor(tower_dir), config.image_size, config.patch_size)
    pixels, labels = splits["train"]
    heads = _Heads(config.hidden_size)
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Linear warm-up, then cosine to zero, as the chain's own stages
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps)
                                                 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    progress = tqdm(range(1, steps + 1), desc="tower pre-training", unit="step")
    history = LossHistory(progress, steps, every=log_every, fmt=".3f")
    for step in progress:
        batch = torch.randint(len(pixels), (batch_size,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tower(pixels[batch], output_hidden_states=True)
            logits = heads(out.hidden_states[select_layer][:, 1:])
        loss = _losses(logits, {head: value[batch] for head, value in labels.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        history.add(step, loss.item())
    _save_tower(tower, tower_dir, out_dir)
    result: dict[str, Any] = {"steps": steps, "loss_history": history.rows, "train_images": len(pixels)}
    if splits.has("val"):
        val_pixels, val_labels = splits["val"]
        result["val"] = _evaluate(tower, heads, val_pixels, val_labels, select_layer, batch_size)
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result
