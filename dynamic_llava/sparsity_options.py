"""The command-line flags of `SparsityOptions` (the run-time token policy choices), shared by every inference
command (ask, eval runners, generation ability, serving)."""

from __future__ import annotations

import argparse
from typing import Any

from .model.policy import OUTPUT_RULES, VISION_RULES


def keep_rate(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_sparsity_arguments(parser: argparse.ArgumentParser, no_sparse_help: str = "dense LLaVA-1.5 "
                           "(no token dropping)") -> None:
    parser.add_argument("--vision-keep-rate", type=keep_rate, default=None, help="override the checkpoint's rate")
    parser.add_argument("--output-keep-rate", type=keep_rate, default=None,
                        help="kept fraction of generated tokens for --output-policy random / h2o")
    parser.add_argument("--vision-policy", choices=VISION_RULES, default=None,
                        help="how image tokens are ranked: the learned predictor (Dynamic-LLaVA, default), FastV's "
                             "last-token attention at layer --sparse-layer - 1, or random")
    parser.add_argument("--output-policy", choices=OUTPUT_RULES, default=None,
                        help="which generated tokens stay in the cache: the predictor (default), random, every "
                             "other one (structure), or H2O (heavy hitters + recent window, evicting; needs the cache)")
    parser.add_argument("--no-output-sparsity", action="store_true", help="keep every generated token")
    parser.add_argument("--sparse-layer", type=int, default=None, help="first layer on the reduced tokens "
                        "(FastV's K, >= 1 for FastV; 0 drops them before the first layer; default: the checkpoint's, 2)")
    parser.add_argument("--policy-seed", type=int, default=None, help="seed of the random vision / output "
                        "policies (default 0)")
    parser.add_argument("--no-sparse", action="store_true", help=no_sparse_help)


def sparsity_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `load_pretrained_model` (`sparse` plus other `SparsityOptions` fields)."""
    if args.no_sparse:
        return {"sparse": False}
    overrides: dict[str, Any] = {
        "vision_keep_rate": args.vision_keep_rate, "output_text_keep_rate": args.output_keep_rate,
        "vision_policy": args.vision_policy, "output_policy": args.output_policy, "sparse_layer": args.sparse_layer,
        "policy_seed": args.policy_seed}
    if args.no_output_sparsity:
        overrides["output_sparsity"] = False
    return {k: v for k, v in overrides.items() if v is not None}
