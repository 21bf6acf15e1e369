"""From a user's question and images to model inputs: the one place prompts are built.

The CLI, evaluation runners and servers all go through `prepare_request` so prompt building, image
handling and stop strings are identical everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_PLACEHOLDER
from .conversation import get_conv_template, stop_string
from .mm_utils import ImageSource, count_image_placeholders, load_images, process_images, tokenizer_image_token


def infer_conv_mode(model_name: str) -> str:
    """LLaVA's rule for picking a template from the model name (v1 templates when nothing matches)."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "mpt" in name:
        return "mpt"
    if "v0" in name:
        return "llava_v0"
    return "llava_v1"


def image_query(query: str, num_images: int, mm_use_im_start_end: bool) -> str:
    """Put the image tokens in the question: at `<image-placeholder>` / `<image>` if present, else in front."""
    token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN if mm_use_im_start_end \
        else DEFAULT_IMAGE_TOKEN
    if IMAGE_PLACEHOLDER in query:
        return query.replace(IMAGE_PLACEHOLDER, token)
    if num_images == 0 or count_image_placeholders(query) > 0:
        return query.replace(DEFAULT_IMAGE_TOKEN, token) if mm_use_im_start_end else query
    return (token + "\n") * num_images + query


@dataclass
class PreparedRequest:
    prompt: str
    input_ids: torch.Tensor  # [T] with IMAGE_TOKEN_INDEX placeholders
    pixel_values: torch.Tensor | None  # [n_images, 3, H, W]
    images: list[Image.Image]  # the loaded images (for mask overlays)
    stop: str


def prepare_request(query: str, image_sources: Sequence[ImageSource], tokenizer, image_processor, model_config,
                    conv_mode: str) -> PreparedRequest:
    """One single-turn request: template, image loading and preprocessing, tokenisation."""
    conv = get_conv_template(conv_mode)
    images = load_images(image_sources)
    conv.append_message(conv.roles[0], image_query(query, len(images), model_config.mm_use_im_start_end))
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    pixel_values = None
    if images:
        pixel_values = process_images(images, image_processor, model_config.image_aspect_ratio)
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")
    return PreparedRequest(prompt, input_ids, pixel_values, images, stop_string(conv))
