"""Flags shared by the servers that load a model (model worker, OpenAI API), and building their engine."""

from __future__ import annotations

import argparse

from ..errors import UserError
from ..mm_utils import get_model_name_from_path
from ..model_options import add_device_arguments, load_model
from ..sparsity_options import add_sparsity_arguments
from .engine import Engine
from .images import ImageLimits


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="checkpoint folder (LLaVA, llava-hf or Dynamic-LLaVA)")
    parser.add_argument("--model-base", default=None, help="base LLM for LoRA / projector-only checkpoints")
    parser.add_argument("--model-name", default=None, help="name clients ask for (default: from --model-path)")
    add_device_arguments(parser)
    add_sparsity_arguments(parser, no_sparse_help="serve dense LLaVA-1.5 (requests' sparse: true then changes nothing)")
    limits = parser.add_argument_group("batching and limits")
    limits.add_argument("--max-batch-size", type=int, default=8, help="requests generated together in one batch")
    limits.add_argument("--limit-model-concurrency", type=int, default=1,
                        help="batches generated at the same time (LLaVA's flag; there each request ran alone, "
                             "here a batch holds up to --max-batch-size requests)")
    limits.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting or running; past it the answer is 'busy' (HTTP 503)")
    limits.add_argument("--max-new-tokens-limit", type=int, default=1024,
                        help="larger max_new_tokens requests are clamped to this (and to the context left)")
    limits.add_argument("--max-image-bytes", type=int, default=ImageLimits.max_bytes, help="per image, encoded")
    limits.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels, help="per image, w x h")


def image_limits(args: argparse.Namespace) -> ImageLimits:
    if args.max_image_bytes < 1 or args.max_image_pixels < 1:
        raise UserError("--max-image-bytes and --max-image-pixels must be >= 1")
    return ImageLimits(max_bytes=args.max_image_bytes, max_pixels=args.max_image_pixels)


def gpu_devices(num_gpus: int, device: str | None) -> list[str] | None:
    """The devices a model is split over for `--num-gpus N` (LLaVA's worker: cuda:0 .. cuda:N-1), None for 1."""
    if num_gpus < 1:
        raise UserError("--num-gpus must be >= 1")
    if num_gpus == 1:
        return None
    if device not in (None, "cuda"):
        raise UserError(f"--num-gpus {num_gpus} splits the model over cuda:0 .. cuda:{num_gpus - 1}: leave --device "
                        f"unset or cuda (not {device}); choose the GPUs with CUDA_VISIBLE_DEVICES")
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < num_gpus:
        raise UserError(f"--num-gpus {num_gpus}: only {visible} GPU(s) visible")
    return [f"cuda:{i}" for i in range(num_gpus)]


def load_engine(args: argparse.Namespace) -> Engine:
    """Load the checkpoint and start its engine (flag errors are UserErrors, raised before loading)."""
    engine_limits = dict(max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                         max_new_tokens_limit=args.max_new_tokens_limit, concurrency=args.limit_model_concurrency)
    if min(engine_limits.values()) < 1:
        raise UserError("--max-batch-size, --max-queue, --max-new-tokens-limit and --limit-model-concurrency "
                        "must be >= 1")
    image_limits(args)
    devices = gpu_devices(getattr(args, "num_gpus", 1), args.device)
    tokenizer, model, image_processor = load_model(args, devices=devices)
    name = args.model_name or get_model_name_from_path(args.model_path)
    return Engine(model, tokenizer, image_processor, name, **engine_limits)
