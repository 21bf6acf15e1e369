"""The one prompt builder: inference requests, the serving engine and training render a conversation and its
image tokens the same way, and images already loaded are not loaded again."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from dynamic_llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN
from dynamic_llava.mm_utils import load_image
from dynamic_llava.prompting import ASSISTANT, USER, prepare_request, render_conversation
from dynamic_llava.train.preprocess import PromptFormat, preprocess


class _Pixels:
    """A stand-in image processor counting its calls (the ids do not depend on pixels)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images, return_tensors):
        self.calls += 1
        return {"pixel_values": torch.zeros(len(images), 3, 4, 4)}


@pytest.fixture(scope="module")
def tokenizer(tiny_llava_dir):
    return AutoTokenizer.from_pretrained(tiny_llava_dir)


@pytest.mark.parametrize("mm_use_im_start_end", [False, True])
def test_a_request_is_the_training_prompt_up_to_the_reply(tokenizer, mm_use_im_start_end: bool) -> None:
    config = SimpleNamespace(mm_use_im_start_end=mm_use_im_start_end, image_aspect_ratio=None)
    image = Image.new("RGB", (8, 6), (10, 20, 30))
    request = prepare_request("What is it?", [image], tokenizer, _Pixels(), config, "v1")
    assert (DEFAULT_IM_START_TOKEN + "<image>" + DEFAULT_IM_END_TOKEN in request.prompt) == mm_use_im_start_end
    conversation = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    input_ids, labels = preprocess(conversation, 1, tokenizer, PromptFormat("v1", mm_use_im_start_end), "s0")
    reply = int((labels != -100).nonzero()[0])  # the first supervised token
    assert input_ids[:reply].tolist() == request.input_ids.tolist()


def test_loaded_images_are_used_as_they_are(tokenizer) -> None:
    config = SimpleNamespace(mm_use_im_start_end=False, image_aspect_ratio=None)
    loaded = load_image(Image.new("RGB", (8, 6), (10, 20, 30)))
    grey = Image.new("L", (8, 6), 128)
    png = io.BytesIO()
    loaded.save(png, format="PNG")
    opened = Image.open(io.BytesIO(png.getvalue()))  # decoded lazily: through load_image
    request = prepare_request("<image> and <image> and <image>?", [loaded, grey, opened], tokenizer, _Pixels(),
                              config, "v1")
    assert request.images[0] is loaded
    assert request.images[1] is not grey and request.images[1].mode == "RGB"
    assert request.images[2] is not opened and request.images[2].tobytes() == loaded.tobytes()


def test_render_conversation_replaces_the_system_prompt_only_when_given() -> None:
    turns = [(USER, "Hi"), (ASSISTANT, "Hello."), (USER, "Bye"), (ASSISTANT, None)]
    default = render_conversation("llava_v1", turns).get_prompt()
    assert default.endswith(" USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT:")
    assert render_conversation("llava_v1", turns, system="Be brief.").get_prompt() == (
        "Be brief. USER: Hi ASSISTANT: Hello.</s>USER: Bye ASSISTANT:")
    assert render_conversation("llava_v1", turns, system="").get_prompt().startswith(" USER: Hi")
