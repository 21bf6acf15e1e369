"""Write a tiny, randomly initialised CLIP vision tower laid out like `openai/clip-vit-large-patch14-336`."""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPVisionModel

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_INIT_STD = 0.02


def _preprocessor_config(image_size: int) -> dict:
    """CLIPImageProcessor settings of the real CLIP-336 checkpoint, at `image_size`."""
    return {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }


def _random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded HF-style init: normal(0, 0.02) weights and embeddings, zero biases, unit LayerNorm scales.

    Keys get the `vision_model.` prefix of released CLIP checkpoints (and of `CLIPVisionModel`
    before transformers v5 flattened it; v5 still loads such keys). Done by hand (not by
    transformers' `_init_weights`) so the bytes depend neither on the transformers version nor on
    the global torch RNG.
    """
    generator = torch.Generator().manual_seed(seed)
    layer_norms = {name for name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)}
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if leaf == "bias":
            value = torch.zeros(param.shape)
        elif owner in layer_norms:
            value = torch.ones(param.shape)
        else:
            value = torch.randn(param.shape, generator=generator) * _INIT_STD
        state[f"vision_model.{name}"] = value.contiguous()
    return state


def write_tiny_clip_tower(
    out_dir: pathlib.Path,
    seed: int = 0,
    image_size: int = 336,
    patch_size: int = 14,
    hidden_size: int = 32,
    num_layers: int = 3,
    num_heads: int = 4,
    intermediate_size: int = 64,
) -> None:
    """Write `config.json` (full CLIPConfig), `preprocessor_config.json` and `model.safetensors`.

    The weights are those of a `CLIPVisionModel` (keys under `vision_model.`), as
    `CLIPVisionModel.from_pretrained(out_dir)` expects; the text half of CLIP is configured
    but has no weights, because LLaVA never loads it.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config={
            "vocab_size": 1000,
            # Real CLIP uses 49406/49407; keep the ids inside the tiny vocabulary.
            "bos_token_id": 998,
            "eos_token_id": 999,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "max_position_embeddings": 77,
            "projection_dim": 16,
        },
        vision_config={
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "image_size": image_size,
            "patch_size": patch_size,
            "projection_dim": 16,
        },
        projection_dim=16,
    )
    config.architectures = ["CLIPModel"]
    # Meta device: only names and shapes are needed, and this leaves the global RNG untouched.
    with torch.device("meta"):
        model = CLIPVisionModel(config.vision_config)
    save_file(_random_state_dict(model, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    preprocessor = json.dumps(_preprocessor_config(image_size), indent=2)
    (out_dir / "preprocessor_config.json").write_text(preprocessor + "\n")
