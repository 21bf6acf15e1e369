"""The VQA / EvalAI answer normaliser and the 10-annotator VQA accuracy."""

from __future__ import annotations

import re
from typing import Sequence

from ..errors import UserError

# "," and "?" are not here: the answer has lost them before punctuation is handled.
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`!"
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# EvalAI's processor calls `PERIOD_STRIP.sub("", text, re.UNICODE)`: re.UNICODE (32) lands in the
# `count` slot, so at most the first 32 such periods are deleted. Kept, so scores match LLaVA's.
_MAX_PERIODS_STRIPPED = 32
_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate("zero one two three four five six seven eight nine ten".split())
}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}

# The contracted forms of EvalAI's table. Each is reached from every spelling that drops exactly one
# of its apostrophes ("couldnt've" and "couldn'tve", not "couldntve"). The table's capitalised
# entries (I'm, I've, I'd've) and those containing "'s" (let's, she's) never fire, since the answer
# is lower-cased and "'s" split off first, so they are not listed: "im" stays "im".
_CONTRACTED = (
    "'ow's'at 'twas ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't "
    "hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am "
    "might've mightn't mightn't've must've mustn't needn't not've o'clock oughtn't shan't she'd've "
    "should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're "
    "there's they'd they'd've they'll they're they've wasn't we'd've we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've you'll you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    """Map each spelling of a contracted form that lacks exactly one of its apostrophes to that form."""
    table = {
        canonical[:i] + canonical[i + 1:]: canonical
        for canonical in _CONTRACTED
        for i, char in enumerate(canonical)
        if char == "'"
    }
    table["somebody'd"] = "somebodyd"  # the table's one entry that runs backwards; scores depend on it
    return table


_CONTRACTIONS = _contraction_table()


def _strip_punctuation(text: str) -> str:
    """Delete punctuation next to a space, else turn it into a space; then delete periods not before a digit."""
    out = text
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_STRIPPED)


def normalize_answer(answer: str) -> str:
    """EvalAI's answer processing as LLaVA runs it: lower case, punctuation, periods, number words,
    articles, contractions."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _strip_punctuation(text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Mean over the leave-one-annotator-out subsets of min(#matches / 3, 1), after normalisation."""
    if len(gt_answers) < 2:
        raise UserError(f"VQA accuracy needs at least 2 human answers, got {len(gt_answers)}")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(answer) == pred for answer in gt_answers)
    # Leaving out a matching annotator leaves matches - 1; leaving out another leaves matches.
    total = matches * min((matches - 1) / 3, 1.0) + (len(gt_answers) - matches) * min(matches / 3, 1.0)
    return total / len(gt_answers)
