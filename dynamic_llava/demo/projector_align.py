"""Stage 1 of the demo chain: align the projector by regression onto word-embedding "slots".

LLaVA's stage 1 trains the projector on captions so that image tokens land where a pre-trained LLM
already reads words. The chain's LLM starts from scratch, and captions teach its projector little
(RESULTS, "Where the look-up breaks"). The generator knows every object, so the target can be given
directly: for each patch, the sum of the start LLM's mean input embeddings of its object's colour word
("grey" for a distractor) and shape word, or twice that of "background" where the patch has no object
(every object lies inside one patch, `tower_pretrain.patch_labels`), plus the patch's place: its column
and row in [-1, 1] along the directions "left" -> "right" and "above" -> "below" of the same embeddings
(a CLIP patch feature carries its place through the position embedding). Without the place, the LLM
would have to read where an object is from its image token's sequence position, and a 4-layer LLM
trained from scratch never learnt to compare two of those (positions stayed at chance). The projector (LLaVA's mlp2x_gelu, on the tower's
selected features) is fitted to these slots with a mean-squared error and written as LLaVA's stage 1
writes it (config.json + mm_projector.bin), for stage 2 to load with `--pretrain_mm_mlp_adapter` and
keep frozen.
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from ..model.checkpoint_files import save_torch_state, write_llava_config
from ..model.loading import load_base_llm
from .loss_history import LossHistory
from .tower_pretrain import HEADS, SceneSplits

BACKGROUND = "background"


def word_embedding(tokenizer: PreTrainedTokenizerBase, embeddings: torch.Tensor, text: str) -> torch.Tensor:
    """[C]: the mean input embedding of `text`'s tokens."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return embeddings[ids].float().mean(dim=0)


def slot_tables(tokenizer: PreTrainedTokenizerBase, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per patch head, [classes + 1, C]: the mean input embedding of each class's word (the classes of
    `tower_pretrain.HEADS` are words: "red", ..., "grey"; "circle", ...), then of "background" (the patch
    labels' extra last class)."""
    return {head: torch.stack([word_embedding(tokenizer, embeddings, w) for w in (*words, BACKGROUND)])
            for head, words in HEADS.items()}


def place_slots(tokenizer: PreTrainedTokenizerBase, embeddings: torch.Tensor, grid: int) -> torch.Tensor:
    """[grid * grid, C]: per patch (reading order), x (e("right") - e("left")) / 2 + y (e("below") - e("above")) / 2
    with x, y its column and row scaled to [-1, 1] (e: mean input embedding of a word)."""
    word = functools.partial(word_embedding, tokenizer, embeddings)
    across, down = (word("right") - word("left")) / 2, (word("below") - word("above")) / 2
    coordinate = torch.linspace(-1.0, 1.0, grid)
    x, y = coordinate.repeat(grid), coordinate.repeat_interleave(grid)
    return x[:, None] * across + y[:, None] * down


def patch_slots(labels: dict[str, torch.Tensor], tables: dict[str, torch.Tensor],
                places: torch.Tensor | None = None) -> torch.Tensor:
    """[..., P, C]: per patch, the sum over the heads of the slot of its label (`labels[head]`: [..., P] class
    ids), plus its place slot (`places` [P, C], from `place_slots`) when given."""
    slots = sum(tables[head][labels[head]] for head in HEADS)
    return slots if places is None else slots + places


@torch.no_grad()
def _features(tower: nn.Module, pixels: torch.Tensor, bf16: bool, batch_size: int = 64) -> torch.Tensor:
    """The tower's selected patch features of every image, [n, patches, mm_hidden]: computed and stored in bf16
    when `bf16` (as in training), else in fp32, the projector's own dtype (without autocast a bf16 input
    would not multiply its fp32 weights)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    chunks = []
    for start in tqdm(range(0, len(pixels), batch_size), desc="tower features", unit="batch"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            chunks.append(tower(pixels[start:start + batch_size]).to(dtype))
    return torch.cat(chunks)


def align_projector(data_dir: Path, llm: Path, tower: Path, out: Path, *, steps: int = 4000, lr: float = 1e-3,
                    batch_size: int = 256, seed: int = 0, projector_type: str = "mlp2x_gelu",
                    select_layer: int = -1, bf16: bool = True, splits: SceneSplits | None = None) -> dict[str, Any]:
    """Fit a fresh projector between `tower` (a CLIP folder) and the plain LLM `llm` to the slots of
    `data_dir`'s training scenes (batches of `batch_size` images, every patch); save it in `out`. Returns
    the loss history and, when `data_dir` has a val split, the held-out mean squared error and mean cosine
    similarity of projected patches to their slots. `select_layer`: the tower's hidden state the projector
    reads (LLaVA's `mm_vision_select_layer`, written to the saved config). `bf16`: the tower and the MLP
    compute in bf16 autocast (fast where the CPU runs bf16 natively). `splits`: `data_dir`'s images
    already loaded (with the tower's image processor; by default they are loaded here)."""
    began = time.perf_counter()
    random.seed(seed)
    torch.manual_seed(seed)
    tokenizer, model, processor = load_base_llm(llm, str(tower), dtype=torch.float32, mm_projector_type=projector_type,
                                                mm_vision_select_layer=select_layer, mm_vision_select_feature="patch")
    vision, projector = model.model.vision_tower, model.model.mm_projector
    embeddings = model.model.embed_tokens.weight.detach()
    tables = slot_tables(tokenizer, embeddings)
    size, patch = vision.vision_tower.config.image_size, vision.vision_tower.config.patch_size
    places = place_slots(tokenizer, embeddings, size // patch)
    if splits is None:
        splits = SceneSplits(data_dir, processor, size, patch)
    pixels, labels = splits["train"]
    features = _features(vision, pixels, bf16)
    # Every image's slots up front ([n, patches, C], ~2.1 GB for the chain's 32000 images): a step is then one
    # gather, and with the MLP in bf16 (fp32 weights) a step takes ~1/3 of the time
    slots = patch_slots(labels, tables, places)
    last = [m for m in projector.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():  # start near the origin: the slots are sums of small embeddings
        last.weight.mul_(0.05)
        last.bias.zero_()
    optimizer = torch.optim.AdamW(projector.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    progress = tqdm(range(1, steps + 1), desc="projector alignment", unit="step")
    history = LossHistory(progress, steps, every=max(1, steps // 40), fmt=".2e")
    for step in progress:
        batch = torch.randint(len(features), (min(batch_size, len(features)),), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            predicted = projector(features[batch])
        loss = nn.functional.mse_loss(predicted.float(), slots[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.add(step, loss.item())
    result: dict[str, Any] = {"steps": steps, "loss_history": history.rows, "train_images": len(pixels)}
    if splits.has("val"):
        val_pixels, val_labels = splits["val"]
        with torch.no_grad():
            predicted = projector(_features(vision, val_pixels, bf16).float())
        target = patch_slots(val_labels, tables, places)
        result["val"] = {"mse": nn.functional.mse_loss(predicted, target).item(),
                         "cosine": nn.functional.cosine_similarity(predicted, target, dim=-1).mean().item()}
    _save(model, out)
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


def _save(model: nn.Module, out: Path) -> None:
    """What LLaVA's stage 1 writes: config.json and mm_projector.bin (`model.mm_projector.*` only)."""
    config = model.config
    config.image_aspect_ratio = "pad"
    config.mm_use_im_start_end = config.mm_use_im_patch_token = False
    config.tune_mm_mlp_adapter = True
    out.mkdir(parents=True, exist_ok=True)
    write_llava_config(out, config, sparse=False, dtype=model.lm_head.weight.dtype)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("model.mm_projector.")}
    save_torch_state(state, out / "mm_projector.bin")
