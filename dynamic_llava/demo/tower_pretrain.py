"""Stage 0 of the demo chain: pre-train the tiny CLIP tower on the synthetic scenes before LLaVA training.

Real LLaVA starts from a pre-trained CLIP; the chain's tower starts random, and the LM loss reaching it
through the LLM is too weak a signal for it to learn to see. The generator knows every object, so
dense labels are free. Linear heads on the tower's output (`select_layer`, CLS dropped, as LLaVA reads it)
are trained with the tower and then thrown away: only the tower is saved, in the layout of the folder it
came from. The heads are per patch only: the colour (a target's, grey for a distractor) and the shape
of the object in the patch, or "background", and the patch's row and column (its place, which the
projector's slots carry to the LLM: `projector_align`; a random position embedding alone, mixed with the
content by the tower's layer norm, let the projector recover only a noisy place). Every object lies inside one cell of the scene grid, and
the tower's patch grid is that grid (or a finer multiple of it), so these labels are exact and each
patch's features need only say what is in that patch. No head asks for scene-wide facts (there were
per-image summary heads once), which a tower would learn to spread over every patch: dropping a patch
loses exactly its object, which is what makes the token-dropping policies comparable on this tower.
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
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..data.scenes import COLOURS, DISTRACTOR_COLOUR, GRID, SHAPES, Scene, scene_from_dict
from ..mm_utils import process_images
from ..model.checkpoint_files import load_image_processor
from ..model.loading import load_clip
from .loss_history import LossHistory

# Per-patch heads: classes of each; a patch with no object gets the extra last class ("background")
HEADS = {"colour": (*COLOURS, DISTRACTOR_COLOUR), "shape": SHAPES}
# Per-patch place heads: the patch's row and column in the tower's patch grid
PLACE_HEADS = ("row", "column")


def place_labels(grid: int) -> dict[str, torch.Tensor]:
    """[grid * grid] per place head: each patch's row and column (reading order)."""
    index = torch.arange(grid * grid)
    return {"row": index // grid, "column": index % grid}


def patch_labels(scene: Scene, image_size: int, patch_size: int) -> dict[str, torch.Tensor]:
    """Per patch (reading order) the class index of each attribute of the object in its cell, or
    len(values) for background. The tower's patch grid must be the scene's grid or a multiple of it (a
    patch then lies inside one cell: at 8 x 8 patches, 112 px / 14 px, one object per patch at most)."""
    grid = image_size // patch_size
    if grid % GRID:
        raise ValueError(f"a {grid} x {grid} patch grid ({image_size} px / {patch_size} px) does not tile the "
                         f"scenes' {GRID} x {GRID} cells")
    cell_of_patch = torch.arange(grid) * GRID // grid
    out = {}
    for head, values in HEADS.items():
        cells = torch.full((GRID, GRID), len(values))
        for obj in scene.objects:
            cells[obj.row, obj.col] = values.index(getattr(obj, head))
        out[head] = cells[cell_of_patch][:, cell_of_patch].flatten()
    return out


class _Heads(nn.Module):
    """Linear probes on the patch features, one per `HEADS` and `PLACE_HEADS` entry (`grid` patches a side)."""

    def __init__(self, hidden: int, grid: int) -> None:
        super().__init__()
        self.patch = nn.ModuleDict({**{head: nn.Linear(hidden, len(values) + 1) for head, values in HEADS.items()},
                                    **{head: nn.Linear(hidden, grid) for head in PLACE_HEADS}})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {head: layer(features) for head, layer in self.patch.items()}


def load_split(data_dir: Path, split: str, processor: Any, image_size: int, patch_size: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel values (bf16, preprocessed as LLaVA training does with `--image_aspect_ratio pad`) and labels."""
    rows = [json.loads(line) for line in (data_dir / split / "scenes.jsonl").read_text(encoding="utf-8").splitlines()]
    pixels, labels = [], {head: [] for head in HEADS}
    for start in tqdm(range(0, len(rows), 64), desc=f"{split} images", unit="batch"):
        chunk = rows[start:start + 64]
        images = [Image.open(data_dir / "images" / row["image"]).convert("RGB") for row in chunk]
        pixels.append(process_images(images, processor, "pad").to(torch.bfloat16))
        for row in chunk:
            scene = scene_from_dict(row)
            for head, value in patch_labels(scene, image_size, patch_size).items():
                labels[head].append(value)
    return torch.cat(pixels), {head: torch.stack(values) for head, values in labels.items()}


class SceneSplits:
    """The splits of a `data synth` folder as `load_split` gives them, each loaded on first use and kept:
    the chain's stages 0 and 1 read the same 32000 images (over a minute each time). `processor` must
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
    """Sum over the heads of their mean cross-entropy over patches."""
    return sum(nn.functional.cross_entropy(logits[head].float().flatten(0, -2), labels[head].flatten())
               for head in logits)


def _with_places(labels: dict[str, torch.Tensor], places: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`labels` ([n, patches] per `HEADS` entry) and `places` (`place_labels`), expanded to the same shape."""
    n = len(next(iter(labels.values())))
    return {**labels, **{head: value.expand(n, -1) for head, value in places.items()}}


@torch.no_grad()
def _evaluate(tower: nn.Module, heads: _Heads, pixels: torch.Tensor, labels: dict[str, torch.Tensor],
              places: dict[str, torch.Tensor], select_layer: int, batch_size: int, bf16: bool) -> dict[str, float]:
    """Held-out accuracy: per-patch attributes on object patches only (background is most patches), the
    place heads on every patch, and whether a patch is told apart as object / background and as target
    (coloured) / anything else."""
    tower.eval()
    predicted: dict[str, list[torch.Tensor]] = {head: [] for head in heads.patch}
    for start in range(0, len(pixels), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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
    for head, truth in places.items():
        result[f"{head}_accuracy"] = (torch.cat(predicted[head]) == truth).float().mean().item()
    guess, truth = torch.cat(predicted["colour"]), labels["colour"]
    background = len(HEADS["colour"])
    result["object_vs_background_accuracy"] = ((guess != background) == (truth != background)).float().mean().item()
    # Colour classes below len(COLOURS) are the targets' colours
    result["target_vs_rest_accuracy"] = ((guess < len(COLOURS)) == (truth < len(COLOURS))).float().mean().item()
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
                   log_every: int = 50, threads: int | None = 1, bf16: bool = True,
                   splits: SceneSplits | None = None) -> dict[str, Any]:
    """Train the CLIP tower in `tower_dir` on `data_dir`'s training scenes (a `data synth` folder); save it to
    `out_dir`. Returns the loss history (every `log_every` steps), held-out accuracy of the heads on the
    val split when there is one, and the wall time. `threads`: torch's intra-op threads meanwhile (None:
    leave them), one by default because the demo shares a small CPU. `bf16`: compute in bf16 autocast (fast
    where the CPU runs bf16 natively). `splits`: `data_dir`'s images already
    loaded (by default they are loaded here)."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _pretrain(data_dir, tower_dir, out_dir, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                         select_layer=select_layer, warmup_steps=warmup_steps, log_every=log_every, bf16=bf16,
                         splits=splits)
    finally:
        torch.set_num_threads(previous_threads)


def _pretrain(data_dir: Path, tower_dir: Path, out_dir: Path, *, steps: int, lr: float, batch_size: int, seed: int,
              select_layer: int, warmup_steps: int, log_every: int, bf16: bool,
              splits: SceneSplits | None) -> dict[str, Any]:
    began = time.perf_counter()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tower = load_clip(tower_dir, dtype=torch.float32).train()
    config = tower.config
    if splits is None:
        splits = SceneSplits(data_dir, load_image_processor(tower_dir), config.image_size, config.patch_size)
    pixels, labels = splits["train"]
    grid = config.image_size // config.patch_size
    heads = _Heads(config.hidden_size, grid)
    places = place_labels(grid)  # the same for every image
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = tower(pixels[batch], output_hidden_states=True)
            logits = heads(out.hidden_states[select_layer][:, 1:])
        loss = _losses(logits, _with_places({head: value[batch] for head, value in labels.items()}, places))
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
        result["val"] = _evaluate(tower, heads, val_pixels, val_labels, places, select_layer, batch_size, bf16)
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result
