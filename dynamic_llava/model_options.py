"""The device and dtype flags of every command that loads a model, and loading the model its flags name
(ask, the evaluation runners, generation ability, the chat CLI and the servers)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .cpu_features import add_dtype_argument
from .sparsity_options import sparsity_overrides

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor, PreTrainedTokenizerBase

    from .model.llava import DynamicLlavaForCausalLM


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype (parsing them imports no torch)."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_dtype_argument(parser)


def resolve_device(device: str | None) -> str:
    """--device, else cuda when there is one."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(args: argparse.Namespace, model_path: str | Path | None = None,
               devices: list[str] | None = None,
               ) -> tuple[PreTrainedTokenizerBase, DynamicLlavaForCausalLM, CLIPImageProcessor]:
    """(tokenizer, model, image processor) of `model_path` (default: --model-path) with --model-base, on
    --device (or its decoder layers split over `devices`) in --dtype, sparsified as the sparsity flags say."""
    from .model.loading import load_pretrained_model  # heavy import: only once a command has checked its input

    device = devices[0] if devices else resolve_device(args.device)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path or args.model_path, args.model_base, device=device, dtype=args.dtype, devices=devices,
        **sparsity_overrides(args))
    return tokenizer, model, image_processor
