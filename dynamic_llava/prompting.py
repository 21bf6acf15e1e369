"""From a user's question and images to model inputs: the one place prompts are built.

Every prompt, inference or training, is rendered by `render_conversation` (a template plus turns), with
an image standing for `image_token` (the one place `<im_start><image><im_end>` is written). `ask`, the
evaluation runners and the generation-ability run go through `prepare_request`; the chat CLI, the OpenAI
API and the serving engine through `render_conversation`, `encode_prompt` and `wrap_image_tokens`; training
through `render_conversation` (train/preprocess.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image, ImageFile

from .constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_PLACEHOLDER
from .conversation import Conversation, get_conv_template, stop_string
from .mm_utils import ImageSource, count_image_placeholders, load_image, process_images, tokenizer_image_token

USER, ASSISTANT = 0, 1  # a turn's speaker: index into the template's roles
Turn = tuple[int, str | None]  # (USER | ASSISTANT, text); text None: the open turn the model fills


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


def image_token(mm_use_im_start_end: bool) -> str:
    """What stands for one image in a prompt (checkpoints trained with `mm_use_im_start_end` wrap it)."""
    if mm_use_im_start_end:
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return DEFAULT_IMAGE_TOKEN


def wrap_image_tokens(text: str, mm_use_im_start_end: bool) -> str:
    """`text` with every `<image>` as `image_token` writes it."""
    return text.replace(DEFAULT_IMAGE_TOKEN, image_token(mm_use_im_start_end)) if mm_use_im_start_end else text


def image_query(query: str, num_images: int, mm_use_im_start_end: bool) -> str:
    """Put the image tokens in the question: at `<image-placeholder>` / `<image>` if present, else in front."""
    token = image_token(mm_use_im_start_end)
    if IMAGE_PLACEHOLDER in query:
        return query.replace(IMAGE_PLACEHOLDER, token)
    if num_images == 0 or count_image_placeholders(query) > 0:
        return wrap_image_tokens(query, mm_use_im_start_end)
    return (token + "\n") * num_images + query


def render_conversation(conv_mode: str, turns: Sequence[Turn], system: str | None = None) -> Conversation:
    """The template `conv_mode` holding `turns` (`get_prompt()` renders it); `system` replaces its system prompt."""
    conv = get_conv_template(conv_mode)
    if system is not None:
        conv.system = system
    for role, text in turns:
        conv.append_message(conv.roles[role], text)
    return conv


def encode_prompt(prompt: str, images: Sequence[Image.Image], tokenizer, image_processor, model_config
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A rendered prompt's token ids (IMAGE_TOKEN_INDEX per `<image>`) and its images' pixels (None: no image)."""
    input_ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")
    pixel_values = process_images(images, image_processor, model_config.image_aspect_ratio) if images else None
    return input_ids, pixel_values


def _loaded(source: ImageSource) -> Image.Image:
    """A decoded RGB image (what `load_image` returns) as it is; anything else through `load_image`
    (PIL decodes an opened file lazily: its errors surface, as UserErrors, there)."""
    if isinstance(source, Image.Image) and not isinstance(source, ImageFile.ImageFile) and source.mode == "RGB":
        return source
    return load_image(source)


@dataclass
class PreparedRequest:
    prompt: str
    input_ids: torch.Tensor  # [T] with IMAGE_TOKEN_INDEX placeholders
    pixel_values: torch.Tensor | None  # [n_images, 3, H, W]
    images: list[Image.Image]  # the loaded images (for mask overlays)
    stop: str


def prepare_request(query: str, image_sources: Sequence[ImageSource], tokenizer, image_processor, model_config,
                    conv_mode: str) -> PreparedRequest:
    """One single-turn request: template, image loading (images `load_image` made are taken as they are) and
    preprocessing, tokenisation."""
    images = [_loaded(source) for source in image_sources]
    question = image_query(query, len(images), model_config.mm_use_im_start_end)
    conv = render_conversation(conv_mode, [(USER, question), (ASSISTANT, None)])
    prompt = conv.get_prompt()
    input_ids, pixel_values = encode_prompt(prompt, images, tokenizer, image_processor, model_config)
    return PreparedRequest(prompt, input_ids, pixel_values, images, stop_string(conv))
