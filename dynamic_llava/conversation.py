"""LLaVA conversation templates: the prompt strings users select with `--conv-mode`.

Every template renders byte-for-byte the prompt LLaVA 1.2.x renders, because released checkpoints
were trained on exactly those strings. A message is either text, `None` (the open turn the model
is to fill), or LLaVA's `(text, image, image_process_mode)` tuple; only the text enters the prompt.
"""

from __future__ import annotations

import dataclasses
from enum import Enum, auto
from typing import Any, Sequence

from dynamic_llava.constants import DEFAULT_IMAGE_TOKEN
from dynamic_llava.errors import UserError


class SeparatorStyle(Enum):
    """How turns are joined into one prompt string."""

    SINGLE = auto()  # "{role}: {text}{sep}" for every turn
    TWO = auto()  # like SINGLE, but user turns end with sep and assistant turns with sep2
    MPT = auto()  # "{role}{text}{sep}", roles carry their own markup (ChatML)
    PLAIN = auto()  # texts only, no system or roles (LLaVA pre-training)
    LLAMA_2 = auto()  # "[INST] ... [/INST] answer </s>" with a <<SYS>> block in the first turn


@dataclasses.dataclass
class Conversation:
    """A template plus the turns so far; `messages` holds `[role, message]` pairs."""

    system: str
    roles: tuple[str, str]
    messages: Sequence[Sequence[Any]]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    def append_message(self, role: str, message: Any) -> None:
        """Add one turn; `message=None` leaves the turn open for the model to complete."""
        self.messages.append([role, message])

    def copy(self) -> Conversation:
        """A copy whose message list can be appended to without touching this one."""
        return dataclasses.replace(self, messages=[[role, message] for role, message in self.messages])

    def get_prompt(self) -> str:
        """The prompt string for the turns so far, exactly as LLaVA renders it."""
        turns = self._turns()
        if self.sep_style is SeparatorStyle.SINGLE:
            return self.system + self.sep + "".join(
                f"{role}:" if text is None else f"{role}: {text}{self.sep}" for role, text in turns
            )
        if self.sep_style is SeparatorStyle.TWO:
            seps = (self.sep, self.sep2)
            return self.system + self.sep + "".join(
                f"{role}:" if text is None else f"{role}: {text}{seps[i % 2]}"
                for i, (role, text) in enumerate(turns)
            )
        if self.sep_style is SeparatorStyle.MPT:
            return self.system + self.sep + "".join(
                role if text is None else f"{role}{text}{self.sep}" for role, text in turns
            )
        if self.sep_style is SeparatorStyle.PLAIN:
            seps = (self.sep, self.sep2 or "")
            return self.system + "".join(
                text + seps[i % 2] for i, (_, text) in enumerate(turns) if text is not None
            )
        if self.sep_style is SeparatorStyle.LLAMA_2:
            return self._llama_2_prompt(turns)
        raise ValueError(f"unknown separator style {self.sep_style}")

    def _turns(self) -> list[tuple[str, str | None]]:
        """(role, text) pairs, text None for an open turn.

        As in LLaVA, when the first message carries an image (a tuple), its `<image>` placeholder
        is moved to the very front, followed by a newline.
        """
        turns: list[tuple[str, str | None]] = []
        for i, (role, message) in enumerate(self.messages):
            if not message:
                turns.append((role, None))
            elif isinstance(message, tuple):
                text = message[0]
                if i == 0:
                    text = DEFAULT_IMAGE_TOKEN + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
                turns.append((role, text))
            else:
                turns.append((role, message))
        return turns

    def _llama_2_prompt(self, turns: list[tuple[str, str | None]]) -> str:
        if not turns or turns[0][1] is None or turns[0][0] != self.roles[0]:
            raise ValueError("a LLaMA-2 style conversation must start with a non-empty user message")
        prompt = ""
        for i, (_, text) in enumerate(turns):
            if text is None:
                continue
            if i == 0 and self.system:
                text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
            if i % 2 == 0:
                prompt += f"{self.sep}[INST] {text} [/INST]"
            else:
                prompt += f" {text} {self.sep2}"
        # The tokenizer adds the first BOS itself; later turns keep their literal "<s>".
        return prompt.removeprefix(self.sep)


def stop_string(conv: Conversation) -> str:
    """Where generation stops for this template (what LLaVA's CLI and model worker use)."""
    if conv.sep_style in (SeparatorStyle.TWO, SeparatorStyle.LLAMA_2):
        return conv.sep2
    return conv.sep


_SYSTEM_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_SYSTEM_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_SYSTEM_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, "
    "toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased "
    "and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of "
    "answering something not correct. If you don't know the answer to a question, please don't "
    "share false information."
)
_SYSTEM_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

# The v0 template opens with one worked example exchange (offset=2 marks it as not user history).
_V0_EXAMPLE = (
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    (
        "Assistant",
        "Renewable energy sources are those that can be replenished naturally in a relatively "
        "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
        "Non-renewable energy sources, on the other hand, are finite and will eventually be "
        "depleted, such as coal, oil, and natural gas. Here are some key differences between "
        "renewable and non-renewable energy sources:\n"
        "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
        "energy sources are finite and will eventually run out.\n"
        "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
        "than non-renewable sources, which can lead to air and water pollution, greenhouse gas "
        "emissions, and other negative effects.\n"
        "3. Cost: Renewable energy sources can be more expensive to initially set up, but they "
        "typically have lower operational costs than non-renewable sources.\n"
        "4. Reliability: Renewable energy sources are often more reliable and can be used in more "
        "remote locations than non-renewable sources.\n"
        "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to "
        "different situations and needs, while non-renewable sources are more rigid and inflexible.\n"
        "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
        "non-renewable sources are not, and their depletion can lead to economic and social "
        "instability.\n",
    ),
)

# Templates hold tuples so that appending to a shared template fails loudly: use get_conv_template.
conv_vicuna_v0 = Conversation(
    system=_SYSTEM_HUMAN,
    roles=("Human", "Assistant"),
    messages=_V0_EXAMPLE,
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_vicuna_v1 = Conversation(
    system=_SYSTEM_USER,
    roles=("USER", "ASSISTANT"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)
conv_llava_v0 = Conversation(
    system=_SYSTEM_HUMAN,
    roles=("Human", "Assistant"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)
conv_llava_v1 = Conversation(
    system=_SYSTEM_HUMAN,
    roles=("USER", "ASSISTANT"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)
conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)
conv_llama_2 = Conversation(
    system=_SYSTEM_LLAMA_2,
    roles=("USER", "ASSISTANT"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
)
conv_llava_llama_2 = Conversation(
    system=_SYSTEM_LLAVA_LLAMA_2,
    roles=("USER", "ASSISTANT"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
)
conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
    version="llama_v2",
)
conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="mpt",
)
conv_mpt = Conversation(
    system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    version="mpt",
)

default_conversation = conv_vicuna_v1

# Names as LLaVA spells them, including its aliases ("default" is v0 there too).
conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "llava_v1": conv_llava_v1,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
}


def get_conv_template(name: str) -> Conversation:
    """A fresh, appendable copy of the template `name` (as typed for `--conv-mode`)."""
    try:
        template = conv_templates[name]
    except KeyError:
        valid = ", ".join(sorted(conv_templates))
        raise UserError(f"unknown conversation template {name!r}; valid names: {valid}") from None
    return template.copy()
