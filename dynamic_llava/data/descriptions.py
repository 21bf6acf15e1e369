"""Deterministic scene texts: a short caption (pre-training) and a long description (>= 60 words).

The description lists every target with its colour, shape and rough place (thirds of the image) in
reading order, the relation between consecutive targets, the counts of the targets per colour and per
shape, and the grey shapes per shape: long enough to exercise output-token sparsification, and fully
determined by the scene so a reference exists.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from .questions import article, plural
from .scenes import COLOURS, SHAPES, Scene, SceneObject, above, left_of

DESCRIBE_PROMPTS = (
    "Describe the image in detail.",
    "Describe every object in the image and where it is.",
    "Give a detailed description of the scene.",
)


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _where(obj: SceneObject) -> str:
    """E.g. "a red circle at the top left"."""
    return f"{article(obj.colour)} {obj.name} {'in the' if obj.place == 'center' else 'at the'} {obj.place}"


def caption(scene: Scene) -> str:
    """E.g. "A red circle at the top left and a blue star in the center, among 11 grey shapes." """
    text = _listing([_where(o) for o in scene.targets])
    return f"{text[0].upper()}{text[1:]}, among {len(scene.distractors)} grey shapes."


def _relation(a: SceneObject, b: SceneObject) -> str:
    parts = []
    vertical, horizontal = above(a, b), left_of(a, b)
    if vertical is not None:
        parts.append("above" if vertical else "below")
    if horizontal is not None:
        parts.append("to the left of" if horizontal else "to the right of")
    return f"The {a.name} is {' and '.join(parts) or 'next to'} the {b.name}."


def _counts(values: list[str], order: tuple[str, ...], noun: str | None) -> str:
    counts = Counter(values)
    items = []
    for value in sorted(counts, key=order.index):
        n = counts[value]
        thing = f"{value} {noun}" if noun else value
        items.append(f"{n} {thing if n == 1 else (thing + 's' if noun else plural(value))}")
    return _listing(items)


def description(scene: Scene) -> str:
    targets, distractors = scene.targets, scene.distractors
    sentences = [
        f"There are {len(targets)} colored objects and {len(distractors)} grey shapes on a textured grey background.",
        f"From top to bottom and left to right, there is {_listing([_where(o) for o in targets])}.",
        *(_relation(a, b) for a, b in pairwise(targets)),
        f"Counting the colored objects by color: {_counts([o.colour for o in targets], COLOURS, 'object')}.",
        f"Counting them by shape: {_counts([o.shape for o in targets], SHAPES, None)}.",
        f"The grey shapes are {_counts([o.shape for o in distractors], SHAPES, None)}.",
    ]
    return " ".join(sentences)
