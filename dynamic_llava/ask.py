"""`dynamic-llava ask`: one question about one or more images, answered with sparsification and stats.

Also behind `python -m dynamic_llava.eval.run_llava` (LLaVA's flags).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .errors import UserError
from .generation import GenerationConfig, GenerationResult, stream_generate
from .mm_utils import get_model_name_from_path, load_images
from .model.policy import DensePolicy, DynamicLlavaPolicy, make_policy
from .model_options import add_device_arguments, load_model
from .prompting import infer_conv_mode, prepare_request
from .sparsity_options import add_sparsity_arguments
from .visualize import kept_patches_overlay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, help="checkpoint folder (LLaVA, llava-hf or Dynamic-LLaVA; "
                        "default: the bundled demo model, a tiny Dynamic-LLaVA trained on `data synth` scenes)")
    parser.add_argument("--model-base", default=None, help="base LLM for LoRA / projector-only checkpoints")
    parser.add_argument("--image-file", default="", help="image path(s), separated by --sep")
    parser.add_argument("--sep", default=",", help="separator between several --image-file paths")
    parser.add_argument("--query", required=True)
    parser.add_argument("--conv-mode", default=None, help="template (default: inferred from the model name)")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-beams", type=int, default=1, help="only 1 (greedy / sampling) is supported")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    add_sparsity_arguments(parser)
    parser.add_argument("--no-cache", action="store_true", help="decode without KV cache (recompute each step)")
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object with the answer and stats")
    parser.add_argument("--save-mask", default=None, help="PNG showing the kept image patches (dropped: grey)")


def bundled_model_path() -> Path:
    """The demo model shipped in the package (`dynamic-llava demo export` writes it)."""
    from .constants import BUNDLED_MODEL

    if not (BUNDLED_MODEL / "config.json").is_file():
        raise UserError(f"no --model-path given and the bundled demo model is missing ({BUNDLED_MODEL}); "
                        "pass --model-path or rebuild it with `dynamic-llava demo export`")
    return BUNDLED_MODEL


def run(args: argparse.Namespace) -> int:
    if args.num_beams != 1:
        raise UserError("beam search is not supported: use --num-beams 1")
    sources = [s for s in args.image_file.split(args.sep) if s] if args.image_file else []
    images = load_images(sources)  # fail on a bad image before loading the model
    if args.save_mask:
        if not images:
            raise UserError("--save-mask needs an --image-file")
        if not Path(args.save_mask).resolve().parent.is_dir():
            raise UserError(f"folder for --save-mask does not exist: {Path(args.save_mask).parent}")
    model_path = args.model_path or bundled_model_path()
    tokenizer, model, image_processor = load_model(args, model_path)
    conv_mode = args.conv_mode or infer_conv_mode(get_model_name_from_path(model_path))
    request = prepare_request(args.query, images, tokenizer, image_processor, model.config, conv_mode)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              stop_strings=[request.stop], use_cache=not args.no_cache, seed=args.seed)
    pixels = [request.pixel_values] if request.pixel_values is not None else [None]
    policy = make_policy(model)  # the sparsity flags, as the model was loaded with them
    stream = stream_generate(model, tokenizer, [request.input_ids], pixels, config, policy)
    for deltas in stream:
        if not args.json and deltas[0]:
            print(deltas[0], end="", flush=True)
    result = stream.results[0]
    if not args.json:
        print(flush=True)  # end the streamed answer's line before the mask note on stderr
    if args.save_mask:
        _save_masks(args.save_mask, request.images, result, model.config.image_aspect_ratio, image_processor)
    if args.json:
        print(json.dumps(_summary(result, policy, conv_mode)))
    return 0


def _summary(result: GenerationResult, policy: DensePolicy | DynamicLlavaPolicy, conv_mode: str) -> dict:
    return {
        "answer": result.text.strip(),
        "finish_reason": result.finish_reason,
        "conv_mode": conv_mode,
        "sparse_layer": policy.sparse_layer,
        "vision_keep_rate": policy.vision_keep_rate,
        "prompt_tokens": result.prompt_tokens,
        **result.efficiency_stats(),
        "prefill_seconds": round(result.prefill_seconds, 4),
        "decode_seconds": round(result.decode_seconds, 4),
    }


def _save_masks(path: str, images, result: GenerationResult, aspect: str, image_processor) -> None:
    """One PNG per image (`x.png`, `x_1.png`, ...), each written to a temp file then renamed."""
    target = Path(path)
    background = tuple(int(x * 255) for x in image_processor.image_mean)
    for index, (image, keep) in enumerate(zip(images, result.image_keep)):
        out = target if index == 0 else target.with_name(f"{target.stem}_{index}{target.suffix or '.png'}")
        overlay = kept_patches_overlay(image, keep, aspect, background=background)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".png")
        os.close(fd)
        try:
            overlay.save(tmp, format="PNG")
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    print(f"kept-patch mask written to {target}", file=sys.stderr)
