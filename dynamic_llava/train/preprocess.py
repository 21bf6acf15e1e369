"""One LLaVA conversation -> `input_ids` and `labels` for supervised training, as LLaVA-1.5 makes them.

The prompt string is rendered as inference renders it (`prompting.render_conversation`, LLaVA's bytes) and
tokenised by `tokenizer_image_token` (LLaVA's ids, see `mm_utils.SlowLlamaEncoder`), so training sees
exactly the ids inference builds. Labels follow LLaVA's `preprocess` functions (llava/train/train.py),
which count tokens instead of locating characters: the conversation is cut into rounds at the template's
end-of-turn separator, and each round's instruction (up to and including the assistant's role marker) is
masked by the token count of that text tokenised on its own, with LLaVA's fixed corrections for the BOS
and the space before the reply. When the counted length disagrees with the real one ("tokenization
mismatch" in LLaVA) the whole sample is masked, with a warning. Templates: `v1` / `vicuna_v1` /
`llava_v1`, `plain`, the LLaMA-2 style ones (`llama_2`, `llava_llama_2`, `mistral_instruct`) and the
ChatML ones (`mpt`, `chatml_direct`: with a LLaMA tokenizer LLaVA's count never matches, so every such
sample is masked, as in LLaVA). LLaVA trains `v0` on an older prompt layout of its own; here `v0` /
`llava_v0` use their inference prompt, each reply supervised from the token count of the prompt up to
it.

Image placeholders follow LLaVA-1.5's training layout: the `<image>` tokens of a human turn move to
its front, one `<image>\\n` per image, followed by the rest of the turn stripped.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dynamic_llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from dynamic_llava.conversation import Conversation, SeparatorStyle, get_conv_template
from dynamic_llava.errors import UserError
from dynamic_llava.mm_utils import slow_llama_encoder, tokenizer_image_token
from dynamic_llava.prompting import ASSISTANT, USER, Turn, image_token, render_conversation

_ROLES = {"human": USER, "gpt": ASSISTANT}

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
    token = image_token(mm_use_im_start_end)
    placed = []
    for (role, text), count in zip(turns, counts):
        if count:
            # LLaVA strips the result too: a turn holding only the image is "<image>", no newline.
            text = ((token + "\n") * count + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
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
    # (reply open, reply closed) per assistant turn
    renderings = [(render_conversation(conv_version, [*turns[:i], (ASSISTANT, None)]).get_prompt(),
                   render_conversation(conv_version, turns[:i + 1]).get_prompt())
                  for i, (role, _) in enumerate(turns) if role == ASSISTANT]
    prompt = render_conversation(conv_version, turns).get_prompt()
    # The spans are only right if every template renders a conversation turn by turn, appending.
    if not all(closed.startswith(opened) and prompt.startswith(closed) for opened, closed in renderings):
        raise RuntimeError(f"template {conv_version!r} does not render conversations by appending turns")
    return prompt, [(len(opened), len(closed)) for opened, closed in renderings]


def _ignore(labels: list[int], start: int, stop: int | None = None) -> None:
    """`labels[start:stop] = IGNORE_INDEX` with Python slice semantics (LLaVA slices the same way)."""
    labels[start:stop] = [IGNORE_INDEX] * len(labels[start:stop])


@dataclass(frozen=True)
class _RoundRule:
    """How one of LLaVA's preprocess functions counts a conversation's rounds."""

    answer_marker: str  # what ends a round's instruction (the assistant's role marker)
    start: int  # tokens masked before the first round (the BOS)
    trim: int  # subtracted from the instruction's own token count (its BOS, the space before the reply)
    later_round_shift: int  # added to the counts of every round but the first
    chatml: bool = False  # rounds cut at every separator, then regrouped into system + user + reply, user + reply


def _round_rule(conv: Conversation, tokenizer: Any) -> _RoundRule | None:
    """LLaVA's rule for this template (its `preprocess` dispatch), None for templates it has none for."""
    if conv.sep_style is SeparatorStyle.LLAMA_2:  # preprocess_llama_2
        return _RoundRule("[/INST] ", 1, 2, 0)
    if conv.version.startswith("v1"):  # preprocess_v1
        legacy = bool(getattr(tokenizer, "legacy", True))
        return _RoundRule(conv.sep + conv.roles[ASSISTANT] + ": ", 1, 2, 0 if legacy else -1)
    if conv.version == "mpt":  # preprocess_mpt
        legacy = bool(getattr(tokenizer, "legacy", False))
        return _RoundRule(conv.sep + conv.roles[ASSISTANT], 0, 1, 1 if legacy else 0, chatml=True)
    return None


def _rounds(prompt: str, conv: Conversation, rule: _RoundRule) -> list[str]:
    """The prompt cut into rounds the way LLaVA's preprocess functions cut it."""
    if not rule.chatml:
        return prompt.split(conv.sep2)
    pieces = prompt.split(conv.sep)
    return [conv.sep.join(pieces[:3])] + [conv.sep.join(pieces[i:i + 2]) for i in range(3, len(pieces), 2)]


def _round_labels(prompt: str, input_ids: list[int], conv: Conversation, rule: _RoundRule, tokenizer: Any,
                  has_image: bool) -> list[int] | None:
    """LLaVA's labels for a round-based template; None on its "tokenization mismatch"."""
    labels = list(input_ids)
    cur = rule.start
    _ignore(labels, 0, cur)
    for i, round_text in enumerate(_rounds(prompt, conv, rule)):
        parts = round_text.split(rule.answer_marker)
        if not round_text or len(parts) != 2:
            break
        round_len = len(tokenizer_image_token(round_text, tokenizer))
        instruction_len = len(tokenizer_image_token(parts[0] + rule.answer_marker, tokenizer)) - rule.trim
        if i:
            round_len += rule.later_round_shift
            instruction_len += rule.later_round_shift
        _ignore(labels, cur, cur + instruction_len)
        cur += round_len
    _ignore(labels, cur)
    # LLaVA cuts text-only samples to model_max_length before counting (image samples are cut later).
    counted = input_ids if has_image else input_ids[:tokenizer.model_max_length]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    total = sum(token != pad for token in counted)
    return None if cur < tokenizer.model_max_length and cur != total else labels


def _prefix_labels(prompt: str, input_ids: list[int], spans: Sequence[Span], tokenizer: Any) -> list[int] | None:
    """Each reply supervised from the token count of the prompt up to it to that of the prompt through it;
    None when those prompts' ids are not prefixes of the whole prompt's (a token straddles a boundary)."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, stop in spans:
        bounds = []
        for end in (start, stop):
            prefix = tokenizer_image_token(prompt[:end], tokenizer)
            if input_ids[:len(prefix)] != prefix:
                return None
            bounds.append(len(prefix))
        labels[bounds[0]:bounds[1]] = input_ids[bounds[0]:bounds[1]]
    return labels


def preprocess(conversations: Any, num_images: int, tokenizer: Any, prompt_format: PromptFormat,
               sample_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `labels` (LongTensors of one length, not truncated) for one LLaVA conversation.

    `input_ids` hold IMAGE_TOKEN_INDEX per image; labels are IGNORE_INDEX except on the assistant
    replies and their end-of-turn separator (e.g. `</s>` for v1, caption + "\\n" for plain), as LLaVA's
    token counting places them.
    """
    turns = parse_turns(conversations, num_images, prompt_format.mm_use_im_start_end, sample_id)
    prompt, spans = render(turns, prompt_format.conv_version, num_images, sample_id)
    input_ids = tokenizer_image_token(prompt, tokenizer)
    conv = get_conv_template(prompt_format.conv_version)
    rule = _round_rule(conv, tokenizer)
    labels: list[int] | None
    if conv.sep_style is SeparatorStyle.PLAIN:  # preprocess_plain: everything after the image(s)
        labels = list(input_ids)
        _ignore(labels, 0, len(tokenizer_image_token(DEFAULT_IMAGE_TOKEN * num_images, tokenizer)))
    elif rule is not None:
        labels = _round_labels(prompt, input_ids, conv, rule, tokenizer, has_image=num_images > 0)
    else:
        labels = _prefix_labels(prompt, input_ids, spans, tokenizer)
    if labels is None:
        warnings.warn(f"sample {sample_id}: tokens do not line up with the answer boundaries (LLaVA's "
                      "\"tokenization mismatch\"); the sample is kept but none of its tokens is supervised"
                      + _mismatch_hint(tokenizer), stacklevel=2)
        labels = [IGNORE_INDEX] * len(input_ids)
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def _mismatch_hint(tokenizer: Any) -> str:
    """The likely cause when the tokenizer is a tokenizer.json read as legacy=False: LLaVA's token counting
    assumes the slow SentencePiece LLaMA tokenizer, which needs tokenizer.model (without it, every
    multi-turn `v1` sample mismatches)."""
    if slow_llama_encoder(tokenizer) is not None or getattr(tokenizer, "legacy", True):
        return ""
    return ("; this tokenizer has no tokenizer.model and reads as legacy=False, which LLaVA's round counting "
            "does not follow: put the base LLM's tokenizer.model beside tokenizer.json")


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
