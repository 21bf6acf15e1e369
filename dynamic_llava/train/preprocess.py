"""One LLaVA conversation -> `input_ids` and `labels` for supervised training.

The prompt string is rendered by the inference templates (`conversation.py`), so training sees
exactly the ids inference builds for the same conversation. Labels are exact by construction: each
assistant reply (with its end-of-turn separator) is a character span of that prompt, found by
rendering the conversation with the reply open and closed; the tokenizer's character offsets then
say which tokens fall inside a span. A token that straddles a span boundary would make the labels
ambiguous: such a sample is masked entirely (and a warning names it) rather than trained on.

Image placeholders follow LLaVA-1.5's training layout: the `<image>` tokens of a human turn move to
its front, one `<image>\\n` per image, followed by the rest of the turn stripped.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dynamic_llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from dynamic_llava.conversation import SeparatorStyle, get_conv_template
from dynamic_llava.errors import UserError

HUMAN, ASSISTANT = 0, 1
_ROLES = {"human": HUMAN, "gpt": ASSISTANT}

Turn = tuple[int, str]  # (HUMAN | ASSISTANT, text)
Span = tuple[int, int]  # [start, end) character offsets in the prompt


@dataclass(frozen=True)
class PromptFormat:
    """How conversations become token ids: the template name and the image-token markup."""

    conv_version: str  # a `conv_templates` name, e.g. "v1" for LLaVA-1.5 fine-tuning, "plain" for stage 1
    mm_use_im_start_end: bool = False  # wrap each <image> in <im_start> ... <im_end>


def parse_turns(conversations: Any, num_images: int, mm_use_im_start_end: bool, sample_id: str) -> list[Turn]:
    """Validated turns, alternating human / assistant, with the image placeholders laid out for training.

    A leading assistant turn is dropped (as LLaVA does). The human turns must hold one `<image>` per
    image, or none at all (then they are put in front of the first human turn). Malformed data is a
    UserError naming the sample.
    """
    if not isinstance(conversations, list) or not conversations:
        raise UserError(f"sample {sample_id}: 'conversations' must be a non-empty list")
    turns: list[Turn] = []
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise UserError(f"sample {sample_id}: every turn must be {{'from': 'human'|'gpt', 'value': str}}, "
                            f"got {turn!r:.80}")
        turns.append((_ROLES[turn["from"]], turn["value"]))
    if turns[0][0] == ASSISTANT:
        turns = turns[1:]
    for i, (role, text) in enumerate(turns):
        if role != i % 2:
            raise UserError(f"sample {sample_id}: turns must alternate human, gpt, human, ... (turn {i} does not)")
        if not text.strip():
            # The templates render an empty message as an open turn, which would garble the prompt.
            raise UserError(f"sample {sample_id}: turn {i} is empty")
        if role == ASSISTANT and DEFAULT_IMAGE_TOKEN in text:
            raise UserError(f"sample {sample_id}: {DEFAULT_IMAGE_TOKEN} in an assistant reply (turn {i})")
    if not turns:
        raise UserError(f"sample {sample_id}: no human turn")
    return _place_images(turns, num_images, mm_use_im_start_end, sample_id)


def _place_images(turns: list[Turn], num_images: int, mm_use_im_start_end: bool, sample_id: str) -> list[Turn]:
    counts = [text.count(DEFAULT_IMAGE_TOKEN) for _, text in turns]
    if sum(counts) == 0 and num_images:
        counts[0] = num_images
    elif sum(counts) != num_images:
        raise UserError(f"sample {sample_id}: {sum(counts)} {DEFAULT_IMAGE_TOKEN} placeholder(s) "
                        f"for {num_images} image(s)")
    token = DEFAULT_IMAGE_TOKEN
    if mm_use_im_start_end:
        token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    placed = []
    for (role, text), count in zip(turns, counts):
        if count:
            text = (token + "\n") * count + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        placed.append((role, text))
    return placed


def render(turns: Sequence[Turn], conv_version: str, num_images: int, sample_id: str) -> tuple[str, list[Span]]:
    """The prompt string and the character span of every assistant reply plus its separator.

    A reply's span runs from the end of the prompt rendered with that reply open (what inference
    feeds the model) to the end of the prompt rendered with it closed. `plain` (pre-training) is
    LLaVA's special case: the human turn becomes just the image placeholder(s), followed by the
    caption and the template's separator.
    """
    conv = get_conv_template(conv_version)
    if conv.sep_style is SeparatorStyle.PLAIN:
        if len(turns) != 2:
            raise UserError(f"sample {sample_id}: the 'plain' template takes one human and one gpt turn, "
                            f"got {len(turns)} turns")
        prefix = DEFAULT_IMAGE_TOKEN * num_images
        prompt = prefix + turns[1][1] + conv.sep
        return prompt, [(len(prefix), len(prompt))]
    renderings: list[tuple[str, str]] = []  # (reply open, reply closed) per assistant turn
    for role, text in turns:
        if role == ASSISTANT:
            opened = conv.copy()
            opened.append_message(conv.roles[ASSISTANT], None)
            conv.append_message(conv.roles[ASSISTANT], text)
            renderings.append((opened.get_prompt(), conv.get_prompt()))
        else:
            conv.append_message(conv.roles[HUMAN], text)
    prompt = conv.get_prompt()
    # The spans are only right if every template renders a conversation turn by turn, appending.
    if not all(closed.startswith(opened) and prompt.startswith(closed) for opened, closed in renderings):
        raise RuntimeError(f"template {conv_version!r} does not render conversations by appending turns")
    return prompt, [(len(opened), len(closed)) for opened, closed in renderings]


def tokenize_with_offsets(prompt: str, tokenizer: Any) -> tuple[list[int], list[Span]]:
    """`tokenizer_image_token(prompt)` plus each token's character span in `prompt`.

    Same chunking as inference: text between `<image>` placeholders is tokenised on its own and
    only the first chunk keeps the BOS; each placeholder is IMAGE_TOKEN_INDEX spanning `<image>`.
    """
    if not tokenizer.is_fast:
        raise UserError("training needs a fast (tokenizers-backed) tokenizer: labels use character offsets")
    ids: list[int] = []
    offsets: list[Span] = []
    start = 0
    for i, chunk in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
            offsets.append((start - len(DEFAULT_IMAGE_TOKEN), start))
        encoded = tokenizer(chunk, return_offsets_mapping=True)
        chunk_ids, chunk_offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        if i == 0:
            has_bos = tokenizer.bos_token_id is not None and chunk_ids[:1] == [tokenizer.bos_token_id]
        elif has_bos:
            chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
        ids.extend(chunk_ids)
        offsets.extend((start + a, start + b) for a, b in chunk_offsets)
        start += len(chunk) + len(DEFAULT_IMAGE_TOKEN)
    return ids, offsets


def supervised_tokens(offsets: Sequence[Span], spans: Sequence[Span], prompt: str) -> list[bool] | None:
    """Which tokens lie entirely inside an answer span; None when tokens and spans do not line up.

    Lining up means every non-blank character of a span is covered by a token inside it: a token
    straddling a span boundary leaves characters uncovered. (A blank may have no token of its own,
    e.g. before `</s>`.)
    """
    mask = [False] * len(offsets)
    for a, b in spans:
        covered = [False] * (b - a)
        for t, (start, end) in enumerate(offsets):
            if a <= start < b and end <= b:
                mask[t] = True
                covered[start - a:end - a] = [True] * (end - start)
        if any(not done and not prompt[a + k].isspace() for k, done in enumerate(covered)):
            return None
    return mask


def preprocess(conversations: Any, num_images: int, tokenizer: Any, prompt_format: PromptFormat,
               sample_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `labels` (LongTensors of one length, not truncated) for one LLaVA conversation.

    `input_ids` hold IMAGE_TOKEN_INDEX per image; labels are IGNORE_INDEX except on the assistant
    replies and their end-of-turn separator (e.g. `</s>` for v1, `###` for v0, caption + "\\n" for plain).
    """
    turns = parse_turns(conversations, num_images, prompt_format.mm_use_im_start_end, sample_id)
    prompt, spans = render(turns, prompt_format.conv_version, num_images, sample_id)
    ids, offsets = tokenize_with_offsets(prompt, tokenizer)
    mask = supervised_tokens(offsets, spans, prompt)
    if mask is None:
        warnings.warn(f"sample {sample_id}: tokens do not line up with the answer boundaries; "
                      "the sample is kept but none of its tokens is supervised", stacklevel=2)
        mask = [False] * len(ids)
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.where(torch.tensor(mask), input_ids, IGNORE_INDEX)
    return input_ids, labels


def fit_to_length(input_ids: torch.Tensor, labels: torch.Tensor, images: torch.Tensor | None,
                  max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Cut a sample to `max_length` tokens, counting each image placeholder as ONE token.

    The model later expands every placeholder to the tower's image tokens (576 for CLIP-L/336), so the
    LLM sequence can be longer than `max_length`. Images whose placeholder was cut away are dropped,
    keeping placeholders and images paired; a cut-away answer simply leaves all labels IGNORE_INDEX.
    """
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if images is not None:
        kept = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        images = images[:kept] if kept else None
    return input_ids, labels, images
