"""Conversation templates render LLaVA 1.2.x's prompt strings byte for byte."""

import pytest

from dynamic_llava.conversation import (
    conv_templates,
    default_conversation,
    get_conv_template,
    stop_string,
)
from dynamic_llava.errors import UserError

SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
SYSTEM_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
SYSTEM_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
QUESTION = "<image>\nWhat is this?"

SINGLE_TURN = {
    "vicuna_v1": f"{SYSTEM_USER} USER: <image>\nWhat is this? ASSISTANT:",
    "v1": f"{SYSTEM_USER} USER: <image>\nWhat is this? ASSISTANT:",
    "llava_v1": f"{SYSTEM_HUMAN} USER: <image>\nWhat is this? ASSISTANT:",
    "llava_v0": f"{SYSTEM_HUMAN}###Human: <image>\nWhat is this?###Assistant:",
    "plain": "<image>\nWhat is this?\n",
    "llama_2": f"[INST] <<SYS>>\n{SYSTEM_LLAMA_2}\n<</SYS>>\n\n<image>\nWhat is this? [/INST]",
    "llava_llama_2": f"[INST] <<SYS>>\n{SYSTEM_LLAVA_LLAMA_2}\n<</SYS>>\n\n<image>\nWhat is this? [/INST]",
    "mistral_instruct": "[INST] <image>\nWhat is this? [/INST]",
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|><|im_start|>assistant\n"
    ),
    "mpt": (
        "<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
        "The assistant gives helpful and honest answers.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|><|im_start|>assistant\n"
    ),
}

TWO_TURNS = {
    "vicuna_v1": f"{SYSTEM_USER} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: What colour? ASSISTANT:",
    "llava_v0": (
        f"{SYSTEM_HUMAN}###Human: <image>\nWhat is this?###Assistant: A cat.###Human: What colour?###Assistant:"
    ),
    "llama_2": (
        f"[INST] <<SYS>>\n{SYSTEM_LLAMA_2}\n<</SYS>>\n\n<image>\nWhat is this? [/INST] A cat. </s>"
        "<s>[INST] What colour? [/INST]"
    ),
    "mistral_instruct": "[INST] <image>\nWhat is this? [/INST] A cat. </s>[INST] What colour? [/INST]",
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is this?<|im_end|><|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\nWhat colour?<|im_end|><|im_start|>assistant\n"
    ),
}


def render(name: str, *turns: object) -> str:
    conv = get_conv_template(name)
    for i, message in enumerate(turns):
        conv.append_message(conv.roles[i % 2], message)
    return conv.get_prompt()


@pytest.mark.parametrize("name", sorted(SINGLE_TURN))
def test_single_turn_prompt(name):
    assert render(name, QUESTION, None) == SINGLE_TURN[name]


@pytest.mark.parametrize("name", sorted(TWO_TURNS))
def test_two_turn_prompt(name):
    assert render(name, QUESTION, "A cat.", "What colour?", None) == TWO_TURNS[name]


def test_v0_keeps_its_worked_example_before_the_user_turn():
    prompt = render("v0", QUESTION, None)
    assert prompt.startswith(
        f"{SYSTEM_HUMAN}###Human: What are the key differences between renewable and non-renewable energy "
        "sources?###Assistant: Renewable energy sources are those that can be replenished naturally"
    )
    assert prompt.endswith(
        "their depletion can lead to economic and social instability.\n###Human: <image>\nWhat is this?###Assistant:"
    )
    assert prompt.count("###") == 4


def test_image_tuple_moves_placeholder_to_front():
    image_message = ("What is this? <image>", object(), "Default")
    assert render("vicuna_v1", image_message, None) == SINGLE_TURN["vicuna_v1"]
    assert render("vicuna_v1", ("What is this?", object(), "Pad"), None) == SINGLE_TURN["vicuna_v1"]


def test_empty_message_is_an_open_turn():
    assert render("vicuna_v1", QUESTION, "") == SINGLE_TURN["vicuna_v1"]


def test_llama_2_needs_a_user_message_first():
    with pytest.raises(ValueError):
        render("llama_2", None)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vicuna_v1", "</s>"),
        ("llava_v1", "</s>"),
        ("llava_v0", "###"),
        ("v0", "###"),
        ("plain", "\n"),
        ("llama_2", "</s>"),
        ("llava_llama_2", "</s>"),
        ("mistral_instruct", "</s>"),
        ("chatml_direct", "<|im_end|>"),
        ("mpt", "<|im_end|>"),
    ],
)
def test_stop_string(name, expected):
    assert stop_string(get_conv_template(name)) == expected


def test_get_conv_template_returns_independent_copies():
    first = get_conv_template("vicuna_v1")
    first.append_message("USER", "hello")
    assert get_conv_template("vicuna_v1").messages == []
    assert len(conv_templates["vicuna_v1"].messages) == 0
    second = first.copy()
    second.append_message("ASSISTANT", "hi")
    assert len(first.messages) == 1 and len(second.messages) == 2
    second.messages[0][1] = "edited"  # LLaVA's CLI fills the open turn in place like this
    assert first.messages[0][1] == "hello"
    v0 = get_conv_template("v0")
    v0.messages[1][1] = "edited"
    assert conv_templates["v0"].messages[1][1] != "edited"


def test_shared_templates_cannot_be_appended_to():
    with pytest.raises(AttributeError):
        conv_templates["vicuna_v1"].append_message("USER", "hello")


def test_default_conversation_is_vicuna_v1():
    conv = default_conversation.copy()
    conv.append_message(conv.roles[0], QUESTION)
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == SINGLE_TURN["vicuna_v1"]


def test_unknown_template_lists_valid_names():
    with pytest.raises(UserError, match="vicuna_v2") as excinfo:
        get_conv_template("vicuna_v2")
    for name in ("vicuna_v1", "llava_v1", "plain", "chatml_direct", "mpt"):
        assert name in str(excinfo.value)
