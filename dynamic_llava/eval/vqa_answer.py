"""The VQA / EvalAI answer normaliser and the 10-annotator VQA accuracy."""

from __future__ import annotations

import itertools
import re
from typing import Sequence

from ..errors import UserError

_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate("zero one two three four five six seven eight nine ten".split())
}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}

# Canonical contracted forms; every spelling of one with some (not all) apostrophes dropped maps to it.
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am "
    "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've "
    "should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're "
    "there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll "
    "why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()


def _contraction_table() -> dict[str, str]:
    """Map each spelling that lacks one or more apostrophes of a canonical form to that form."""
    table: dict[str, str] = {}
    for canonical in _CONTRACTED:
        positions = [i for i, char in enumerate(canonical) if char == "'"]
        for count in range(1, len(positions) + 1):
            for dropped in itertools.combinations(positions, count):
                if count == len(positions) and count > 1:
                    continue  # the original table never lists a double contraction with no apostrophe
                variant = "".join(c for i, c in enumerate(canonical) if i not in dropped)
                table[variant] = canonical
    return table


_CONTRACTIONS = _contraction_table()


def _strip_punctuation(text: str) -> str:
    """Delete punctuation next to a space (or any, in digit-comma-digit text); else turn it into a space."""
    out = text
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or _DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_answer(answer: str) -> str:
    """EvalAI's answer processing: lower case, punctuation, periods, number words, articles, contractions."""
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
