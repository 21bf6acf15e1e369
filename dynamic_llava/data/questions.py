"""Short-answer questions about a scene, each with its answer computed from the scene spec.

Types (the `category` of a question): `attribute` (colour / shape / size of an object named by its
other attributes), `count` (digits 0-6), `position` (yes/no, or which side, between two objects in
clearly different columns / rows) and `existence` (POPE-style yes/no; negatives `random`, `popular`
or `adversarial`). Every question names its objects uniquely within the scene.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from itertools import product

from .scenes import (
    COLOUR_WEIGHTS,
    COLOURS,
    SHAPE_WEIGHTS,
    SHAPES,
    Scene,
    SceneObject,
    above,
    left_of,
)

SHORT_ANSWER_TYPES = ("attribute", "count", "position", "existence")
NEGATIVE_KINDS = ("random", "popular", "adversarial")
POPULAR_TOP_K = 5  # popular negatives: among the K most frequent (colour, shape) pairs absent from the image

# (colour, shape) pairs by expected frequency under the sampling weights, most frequent first.
POPULAR_PAIRS = sorted(product(COLOURS, SHAPES), key=lambda p: -COLOUR_WEIGHTS[COLOURS.index(p[0])]
                       * SHAPE_WEIGHTS[SHAPES.index(p[1])])


@dataclass(frozen=True)
class QA:
    category: str
    question: str
    answer: str
    kind: str = ""  # existence: the POPE split (negative kind) it belongs to, whatever its answer


def plural(shape: str) -> str:
    return shape + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _unique(scene: Scene, obj: SceneObject, fields: tuple[str, ...]) -> bool:
    """No other object of the scene matches `obj` on `fields`."""
    return sum(all(getattr(o, f) == getattr(obj, f) for f in fields) for o in scene.objects) == 1


def reference(scene: Scene, obj: SceneObject) -> str:
    """The shortest of "colour shape" / "size colour shape" naming `obj` uniquely (the latter always does)."""
    return f"{obj.colour} {obj.shape}" if _unique(scene, obj, ("colour", "shape")) else obj.name


def attribute_questions(scene: Scene) -> list[QA]:
    """Every attribute question whose description picks out exactly one object (without naming the answer)."""
    out = []
    for o in scene.objects:
        if _unique(scene, o, ("shape",)):
            out.append(QA("attribute", f"What color is the {o.shape}?", o.colour))
        elif _unique(scene, o, ("size", "shape")):
            out.append(QA("attribute", f"What color is the {o.size} {o.shape}?", o.colour))
        if _unique(scene, o, ("colour",)):
            out.append(QA("attribute", f"What shape is the {o.colour} object?", o.shape))
        elif _unique(scene, o, ("size", "colour")):
            out.append(QA("attribute", f"What shape is the {o.size} {o.colour} object?", o.shape))
        if _unique(scene, o, ("colour", "shape")):
            out.append(QA("attribute", f"Is the {o.colour} {o.shape} small or large?", o.size))
    return out


def count_questions(scene: Scene, k: int, rng: random.Random) -> list[QA]:
    """`k` count questions with distinct answers, each answer drawn uniformly from those the scene allows
    (so the frequent small counts do not dominate): how many objects / <colour> objects / <shape>s."""
    by_answer: dict[int, list[str]] = {len(scene.objects): ["How many objects are there in the image?"]}
    for colour in COLOURS:
        n = sum(o.colour == colour for o in scene.objects)
        by_answer.setdefault(n, []).append(f"How many {colour} objects are there?")
    for shape in SHAPES:
        n = sum(o.shape == shape for o in scene.objects)
        by_answer.setdefault(n, []).append(f"How many {plural(shape)} are there?")
    # 7 colours and at most 6 objects: 0 and the total are always two different answers.
    return [QA("count", rng.choice(by_answer[n]), str(n)) for n in rng.sample(sorted(by_answer), k)]


def position_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """One question per ordered pair of objects, on an axis where they are clearly apart."""
    out = []
    for a, b in product(scene.objects, repeat=2):
        if a is b:
            continue
        axes = [(rel, words) for rel, words in ((left_of(a, b), ("left", "right")), (above(a, b), ("above", "below")))
                if rel is not None]
        relation, (first, second) = rng.choice(axes)
        truth = first if relation else second
        ra, rb = reference(scene, a), reference(scene, b)
        asked = rng.choice((first, second))
        if rng.random() < 0.5:
            text = f"Is the {ra} {asked} the {rb}?" if first == "above" else f"Is the {ra} to the {asked} of the {rb}?"
            out.append(QA("position", text, "yes" if asked == truth else "no"))
        elif first == "above":
            out.append(QA("position", f"Is the {ra} above or below the {rb}?", truth))
        else:
            out.append(QA("position", f"Is the {ra} on the left or the right of the {rb}?", truth))
    return out


def existence_question(scene: Scene, kind: str, positive: bool, rng: random.Random) -> QA:
    """"Is there a <colour> <shape> in the image?" about a present pair, or an absent one of negative `kind`."""
    present = {(o.colour, o.shape) for o in scene.objects}
    colour, shape = rng.choice(sorted(present) if positive else negative_candidates(scene, kind))
    answer = "yes" if (colour, shape) in present else "no"
    return QA("existence", f"Is there {article(colour)} {colour} {shape} in the image?", answer, kind)


def negative_candidates(scene: Scene, kind: str) -> list[tuple[str, str]]:
    """Absent (colour, shape) pairs of one negative kind.

    random: any absent pair; popular: the most frequent absent pairs; adversarial: absent pairs that
    combine a present colour with a present shape (attributes swapped between objects), or share one of
    them when no such pair is absent.
    """
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [p for p in product(COLOURS, SHAPES) if p not in present]
    if kind == "random":
        return absent
    if kind == "popular":
        return [p for p in POPULAR_PAIRS if p not in present][:POPULAR_TOP_K]
    if kind == "adversarial":
        colours, shapes = {c for c, _ in present}, {s for _, s in present}
        both = [p for p in absent if p[0] in colours and p[1] in shapes]
        return both or [p for p in absent if p[0] in colours or p[1] in shapes]
    raise ValueError(f"unknown negative kind {kind!r}")


def majority_answers(qas: list[QA]) -> dict[str, str]:
    """The most frequent answer per category (ties: alphabetical), the majority-answer baseline."""
    counts: dict[str, Counter[str]] = {}
    for qa in qas:
        counts.setdefault(qa.category, Counter())[qa.answer] += 1
    return {c: min(counter.items(), key=lambda item: (-item[1], item[0]))[0] for c, counter in counts.items()}


def scene_questions(scene: Scene, index: int, rng: random.Random) -> list[QA]:
    """The questions asked about scene number `index` of its split: two attribute and two position
    questions (fewer when the scene has fewer), two count questions, and one existence question per
    negative kind."""
    attribute = attribute_questions(scene)
    qas = rng.sample(attribute, min(2, len(attribute)))
    qas += count_questions(scene, 2, rng)
    position = position_questions(scene, rng)
    qas += rng.sample(position, min(2, len(position)))
    # Yes / no alternate with the scene index, so each negative kind gets as many yes as no questions.
    qas += [existence_question(scene, kind, (index + k) % 2 == 0, rng) for k, kind in enumerate(NEGATIVE_KINDS)]
    return qas
