"""Deterministic scene texts: a short caption (pre-training) and a long description (>= 60 words).

The description lists every object with its attributes and cell in reading order, the relation
between consecutive objects, and the counts per colour, shape and size: long enough to exercise
output-token sparsification, and fully determined by the scene so a reference exists.
"""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

from .questions import article, plural
from .scenes import COLOURS, SHAPES, SIZES, Scene, SceneObject, above, left_of

DESCRIBE_PROMPTS = (
    "Describe the image in detail.",
    "Describe every object in the image and where it is.",
    "Give a detailed description of the scene.",
)


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: Scene) -> str:
    """E.g. "A large red circle, a small blue star and a small green square." """
    text = _listing([f"{article(o.size)} {o.name}" for o in scene.objects])
    return text[0].upper() + text[1:] + "."


def _relation(a: SceneObject, b: SceneObject) -> str:
    parts = []
    vertical, horizontal = above(a, b), left_of(a, b)
    if vertical is not None:
        parts.append("above" if vertical else "below")
    if horizontal is not None:
        parts.append("to the left of" if horizontal else "to the right of")
    return f"The {a.name} is {' and '.join(parts)} the {b.name}."


def _counts(values: list[str], order: tuple[str, ...], noun: str | None) -> str:
    counts = Counter(values)
    items = []
    for value in sorted(counts, key=order.index):
        n = counts[value]
        thing = f"{value} {noun}" if noun else value
        items.append(f"{n} {thing if n == 1 else (thing + 's' if noun else plural(value))}")
    return _listing(items)


def description(scene: Scene) -> str:
    objects = scene.objects
    where = [f"{article(o.size)} {o.name} {'in the' if o.place == 'center' else 'at the'} {o.place}" for o in objects]
    sentences = [
        f"There are {len(objects)} objects on a textured grey background.",
        f"From top to bottom and left to right, there is {_listing(where)}.",
        *(_relation(a, b) for a, b in pairwise(objects)),
        f"Counting by color: {_counts([o.colour for o in objects], COLOURS, 'object')}.",
        f"Counting by shape: {_counts([o.shape for o in objects], SHAPES, None)}.",
        f"Counting by size: {_counts([o.size for o in objects], SIZES, 'object')}.",
    ]
    return " ".join(sentences)
