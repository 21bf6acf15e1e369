"""LLaVA's `merge_lora_weights`: a LoRA training output + its base LLM -> one full LLaVA checkpoint.

    python -m dynamic_llava.tools.merge_lora_weights --model-path LORA --model-base BASE --save-model-path OUT

The LoRA folder is LLaVA's (`adapter_config.json`, `adapter_model.*`, `non_lora_trainables.bin` with the
projector, `config.json`); `load_pretrained_model` merges it, `save_pretrained_llava` writes the result.
Predictor weights and `sparse_config` are written only when the LoRA's config.json has a `sparse_config`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..errors import run_command
from ..model.checkpoint_files import output_dir, read_json, resolve_local
from ..model.loading import load_pretrained_model, save_pretrained_llava


def merge_lora_weights(model_path: str | Path, model_base: str | Path, save_model_path: str | Path,
                       dtype: str | None = None) -> Path:
    """Merge LoRA `model_path` into `model_base` and save the full checkpoint; return its folder.

    `dtype` (float32, bfloat16, float16) is the dtype of the merge and of the output; None is
    `load_pretrained_model`'s default (float32 on CPU).
    """
    path = resolve_local(model_path, "checkpoint")
    base = resolve_local(model_base, "base model")
    out = output_dir(str(save_model_path), path, base)
    predictors = "sparse_config" in read_json(path / "config.json")
    with warnings.catch_warnings():
        if not predictors:  # they are left out of the output, so their fresh initialisation does not matter
            warnings.filterwarnings("ignore", message=".*no Dynamic-LLaVA predictor weights")
        tokenizer, model, image_processor, _ = load_pretrained_model(path, base, dtype=dtype)
    save_pretrained_llava(model, tokenizer, out, predictors=predictors, image_processor=image_processor)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.tools.merge_lora_weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="the LoRA training output folder")
    parser.add_argument("--model-base", required=True, help="the base LLM the LoRA was trained on")
    parser.add_argument("--save-model-path", required=True, help="output folder for the merged checkpoint")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="dtype of the merge and the output (default float32; LLaVA merges in float16)")
    return parser


def _run(args: argparse.Namespace) -> int:
    out = merge_lora_weights(args.model_path, args.model_base, args.save_model_path, args.dtype)
    print(f"merged checkpoint written to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
