"""`dynamic-llava convert`: a checkpoint from one layout into the other (see `layouts` for the layouts).

LLaVA -> llava-hf writes a `LlavaConfig`, transformers names (the vision tower included), the embedding
and `lm_head` grown by one row for the `<image>` token (added to the tokenizer) and a `LlavaProcessor`.
Predictor weights and the LLaVA-only config keys (`sparse_config`, `image_aspect_ratio`, ...) are kept
beside them, so LLaVA -> llava-hf -> LLaVA gives back the same checkpoint. llava-hf -> LLaVA is the
inverse, with the tower written as the CLIP folder `vision_tower/` inside the output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import LlavaProcessor

from ..constants import DEFAULT_IMAGE_TOKEN
from ..errors import UserError
from .checkpoint_files import (
    CheckpointParts,
    iter_shards,
    load_image_processor,
    open_tokenizer,
    read_checkpoint_config,
    resolve_local,
    resolve_vision_tower,
    save_state_dict,
    save_tokenizer,
    staged_output,
    write_llava_checkpoint,
)
from .layouts import (
    EMBEDDINGS,
    HF,
    SELECT_FEATURE_TO_HF,
    check_keys,
    check_tower_keys,
    expected_shapes,
    hf_name,
    llava_hf_config,
    llava_names,
)
from .loading import load_clip


def read_checkpoint(path: Path) -> CheckpointParts:
    """All parts of a LLaVA, Dynamic-LLaVA or llava-hf checkpoint, in LLaVA names, as stored (no dtype change).

    An `<image>` token that is the last vocabulary entry of a llava-hf checkpoint (as `to="hf"` adds it)
    is taken out of the embeddings and marked for removal from the tokenizer.
    """
    layout, config, vision_config, raw = read_checkpoint_config(path)
    state, tower_state = {}, {}
    for shard in iter_shards(path):
        llm, tower = llava_names(shard, layout)
        state.update(llm)
        tower_state.update(tower)
    check_keys(expected_shapes(config), {k: v.shape for k, v in state.items()}, path)
    tokenizer = open_tokenizer(path)
    has_sparse_config = "sparse_config" in raw
    if layout != HF:
        tower_path = resolve_vision_tower(config.mm_vision_tower, path)
        clip = load_clip(tower_path)
        return CheckpointParts(config, state, tokenizer, clip.config, clip.state_dict(),
                               load_image_processor(tower_path), has_sparse_config)
    check_tower_keys(vision_config, tower_state, path)
    parts = CheckpointParts(config, state, tokenizer, vision_config, tower_state, load_image_processor(path),
                            has_sparse_config)
    image_id = raw.get("image_token_index", raw.get("image_token_id"))
    if (image_id == config.vocab_size - 1 == len(tokenizer) - 1
            and tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN) == image_id):
        for name in EMBEDDINGS:
            state[name] = state[name][:-1].clone()
        config.vocab_size -= 1
        parts.drop_tokens = (DEFAULT_IMAGE_TOKEN,)
    return parts


def write_hf_checkpoint(parts: CheckpointParts, out_dir: str | Path, max_shard_size: int | str = "5GB") -> Path:
    """Write `parts` as a llava-hf checkpoint (see the module docstring)."""
    cfg = parts.config
    if cfg.mm_projector_type != "mlp2x_gelu":
        raise UserError(f"llava-hf has no {cfg.mm_projector_type!r} projector (only mlp2x_gelu converts)")
    tokenizer = parts.tokenizer
    if DEFAULT_IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(DEFAULT_IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    if image_id > cfg.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the model only {cfg.vocab_size} embeddings")
    state = dict(parts.state)
    if image_id == cfg.vocab_size:
        for name in EMBEDDINGS:
            rows = state[name]
            state[name] = torch.cat([rows, rows.float().mean(0, keepdim=True).to(rows.dtype)])
    hf_state = {hf_name(k): v for k, v in state.items()}
    hf_state.update({f"model.vision_tower.vision_model.{k}": v for k, v in parts.tower_state.items()})
    processor = LlavaProcessor(
        image_processor=parts.image_processor, tokenizer=tokenizer, patch_size=parts.tower_config.patch_size,
        vision_feature_select_strategy=SELECT_FEATURE_TO_HF[cfg.mm_vision_select_feature],
        image_token=DEFAULT_IMAGE_TOKEN, num_additional_image_tokens=1,
    )
    with staged_output(out_dir) as stage:
        hf_config = llava_hf_config(cfg, parts.tower_config, max(cfg.vocab_size, image_id + 1), image_id,
                                    parts.state["lm_head.weight"].dtype, parts.has_sparse_config)
        hf_config.save_pretrained(stage)
        save_state_dict(hf_state, stage, max_shard_size)
        processor.save_pretrained(stage)
        parts.image_processor.save_pretrained(stage)
        save_tokenizer(tokenizer, stage)
    return Path(out_dir)


def convert_checkpoint(src: str | Path, dst: str | Path, to: str, max_shard_size: int | str = "5GB") -> Path:
    """Convert checkpoint `src` to layout `to` ("hf" for llava-hf, "llava" for the original LLaVA) in `dst`."""
    if to not in ("hf", "llava"):
        raise UserError(f"unknown checkpoint layout {to!r} (hf, llava)")
    src_path = resolve_local(src, "checkpoint")
    if Path(dst).expanduser().resolve() == src_path:
        raise UserError(f"the destination {dst} is the source checkpoint; choose another folder")
    parts = read_checkpoint(src_path)
    if to == "hf":
        return write_hf_checkpoint(parts, dst, max_shard_size)
    return write_llava_checkpoint(parts, dst, max_shard_size)
