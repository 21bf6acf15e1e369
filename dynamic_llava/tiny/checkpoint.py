"""A complete, small, random Dynamic-LLaVA checkpoint in the real on-disk layouts (for tests and demos)."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

from ..errors import UserError
from ..model.checkpoint_files import save_tokenizer
from ..model.config import DynamicLlavaConfig, SparseConfig
from ..model.convert import convert_checkpoint
from ..model.llava import DynamicLlavaForCausalLM
from ..model.loading import save_pretrained_llava
from .tokenizer import train_tiny_tokenizer
from .vision_tower import write_tiny_clip_tower

TOWER_HIDDEN_SIZE = 32  # write_tiny_clip_tower's default width
# Larger than the usual 0.02 so that random logits are spread out and greedy decoding is not degenerate.
_INIT_STD = 0.1

_TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=4096, mm_hidden_size=TOWER_HIDDEN_SIZE,
    mm_projector_type="mlp2x_gelu",
)
_TINY_SPARSE: dict[str, Any] = dict(d_model=64, nhead=4, dim_feedforward=128, num_layers=2)


def _seeded_init(model: nn.Module, seed: int) -> None:
    """Matrices and embeddings N(0, 0.1); norm scales 1 + N(0, 0.1); biases N(0, 0.02).

    Norm scales and biases are not left at 1 and 0, so parity tests notice misplaced weights.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                param.copy_(noise * _INIT_STD)
            elif name.endswith("bias"):
                param.copy_(noise * 0.02)
            else:  # RMSNorm / LayerNorm scale
                param.copy_(1.0 + noise * _INIT_STD)


def make_tiny_checkpoint(out_dir: str | Path, fmt: str = "llava", predictors: bool = True, seed: int = 0,
                         **size_overrides: Any) -> Path:
    """Write a tiny random checkpoint: LLaVA layout (`fmt="llava"`), llava-hf (`fmt="hf"`), or a plain
    LLaMA LLM saved by transformers (`fmt="llm"`, the Vicuna of stage-1 pre-training).

    The LLaVA layout has the CLIP tower in `out_dir/vision_tower` (336 px, patch 14: 576 image tokens),
    referenced by absolute path from `mm_vision_tower`, and the 1000-token tiny tokenizer. The LLM has
    hidden size 64, 4 layers, 4 heads; `size_overrides` replace config keys (e.g. `num_key_value_heads=2`
    for GQA) or `sparse_config` keys (e.g. `vision_keep_rate=0.5`). `predictors=False` leaves out the
    predictor weights and `sparse_config` (a plain LLaVA-1.5 checkpoint). Deterministic for a seed.
    """
    out = Path(out_dir)
    if fmt == "llm":
        return _make_tiny_base_llm(out, seed, **size_overrides)
    if fmt == "hf":
        with tempfile.TemporaryDirectory() as tmp:
            source = make_tiny_checkpoint(Path(tmp) / "llava", "llava", predictors, seed, **size_overrides)
            return convert_checkpoint(source, out, to="hf")
    if fmt != "llava":
        raise UserError(f"unknown checkpoint format {fmt!r} (llava, hf, llm)")
    sparse_keys = {f.name for f in dataclasses.fields(SparseConfig)}
    sparse = {**_TINY_SPARSE, **{k: v for k, v in size_overrides.items() if k in sparse_keys}}
    overrides = {k: v for k, v in size_overrides.items() if k not in sparse_keys}
    tower_dir = out / "vision_tower"
    write_tiny_clip_tower(tower_dir, seed=seed)
    config = DynamicLlavaConfig(**{**_TINY_CONFIG, **overrides, "mm_vision_tower": str(tower_dir.resolve()),
                                   "sparse_config": sparse})
    with no_init_weights():
        model = DynamicLlavaForCausalLM(config)
    _seeded_init(model, seed)
    with tempfile.TemporaryDirectory() as tmp:
        train_tiny_tokenizer(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        save_pretrained_llava(model, tokenizer, out, predictors=predictors)
    return out


def _make_tiny_base_llm(out: Path, seed: int, **size_overrides: Any) -> Path:
    """A transformers `LlamaForCausalLM` folder with the tiny tokenizer, plus a CLIP tower to pair it with
    in `out/vision_tower` (pass it as --vision_tower)."""
    llm_keys = set(LlamaConfig().to_dict())
    sizes = {k: v for k, v in {**_TINY_CONFIG, **size_overrides}.items() if k in llm_keys}
    config = LlamaConfig(**sizes, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    with no_init_weights():
        model = LlamaForCausalLM(config)
    _seeded_init(model, seed)
    model.save_pretrained(out)
    with tempfile.TemporaryDirectory() as tmp:
        train_tiny_tokenizer(Path(tmp))
        save_tokenizer(AutoTokenizer.from_pretrained(tmp, local_files_only=True), out)
    write_tiny_clip_tower(out / "vision_tower", seed=seed)
    return out
