"""Short-answer questions about the targets of a scene, each with its answer computed from the scene spec.

Types (the `category` of a question): `attribute` (the colour of the coloured object of a shape, or the
shape of the object of a colour), `count` (digits 0-5: coloured objects, objects of a colour, coloured
objects of a shape), `position` (the third of the image a target is in, e.g. "top left") and
`existence` (POPE-style yes/no about a coloured (colour, shape) pair; negatives `random`, `popular` or
`adversarial`). Grey distractors are never an answer nor counted: a
question naming a shape says "colored". Every question needs the patches of specific targets.
A question is `held_out` when a (colour, shape) pair it is about, or counts, is in `HELD_OUT_PAIRS`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import product

from .scenes import (
    COLOUR_WEIGHTS,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPE_WEIGHTS,
    SHAPES,
    Scene,
    SceneObject,
)

SHORT_ANSWER_TYPES = ("attribute", "count", "position", "existence")
NEGATIVE_KINDS = ("random", "popular", "adversarial")
POPULAR_TOP_K = 5  # popular negatives: among the K most frequent (colour, shape) pairs absent from the image

# (colour, shape) pairs by expected frequency in training under the sampling weights, most frequent first:
# the held-out pairs, never training targets, last.
POPULAR_PAIRS = sorted(product(COLOURS, SHAPES), key=lambda p: (
    p in HELD_OUT_PAIRS, -COLOUR_WEIGHTS[COLOURS.index(p[0])] * SHAPE_WEIGHTS[SHAPES.index(p[1])]))


@dataclass(frozen=True)
class QA:
    category: str
    question: str
    answer: str
    kind: str = ""  # existence: the POPE split (negative kind) it belongs to, whatever its answer
    held_out: bool = False  # about (or counting) a target of a held-out (colour, shape) pair


def plural(shape: str) -> str:
    return shape + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _held_out(objects: Iterable[SceneObject]) -> bool:
    return any(o.pair in HELD_OUT_PAIRS for o in objects)


def _unique(scene: Scene, obj: SceneObject, field: str) -> bool:
    """No other target of the scene has `obj`'s `field`."""
    return sum(getattr(o, field) == getattr(obj, field) for o in scene.targets) == 1


def attribute_questions(scene: Scene) -> list[QA]:
    """Every attribute question whose description picks out exactly one target (without naming the answer)."""
    out = []
    for o in scene.targets:
        if _unique(scene, o, "shape"):
            out.append(QA("attribute", f"What color is the colored {o.shape}?", o.colour, held_out=_held_out([o])))
        if _unique(scene, o, "colour"):
            out.append(QA("attribute", f"What shape is the {o.colour} object?", o.shape, held_out=_held_out([o])))
    return out


def count_questions(scene: Scene, k: int, rng: random.Random) -> list[QA]:
    """`k` count questions with distinct answers, each answer drawn uniformly from those the scene allows
    (so the frequent small counts do not dominate): how many coloured objects / <colour> objects /
    coloured <shape>s."""
    targets = scene.targets
    by_answer: dict[int, list[QA]] = {}

    def add(question: str, counted: list[SceneObject]) -> None:
        by_answer.setdefault(len(counted), []).append(
            QA("count", question, str(len(counted)), held_out=_held_out(counted)))

    add("How many colored objects are there?", list(targets))
    for colour in COLOURS:
        add(f"How many {colour} objects are there?", [o for o in targets if o.colour == colour])
    for shape in SHAPES:
        add(f"How many colored {plural(shape)} are there?", [o for o in targets if o.shape == shape])
    # 7 colours and at most 5 targets: 0 and the number of targets are always two different answers.
    return [rng.choice(by_answer[n]) for n in rng.sample(sorted(by_answer), k)]


def position_questions(scene: Scene) -> list[QA]:
    """Where a target is, in the thirds of the image the descriptions use ("top left", "center", ...), for
    every target named, as in the attribute questions, by a colour or a shape no other target has.
    Relations between two targets named by colour and shape were asked before (run V5): a 4-layer LLM
    trained from scratch stayed at chance on them even when trained on nothing else."""
    out = []
    for o in scene.targets:
        if _unique(scene, o, "shape"):
            out.append(QA("position", f"Where is the colored {o.shape}?", o.place, held_out=_held_out([o])))
        if _unique(scene, o, "colour"):
            out.append(QA("position", f"Where is the {o.colour} object?", o.place, held_out=_held_out([o])))
    return out


def existence_question(scene: Scene, kind: str, positive: bool, rng: random.Random,
                       unseen_pairs: frozenset[tuple[str, str]] = frozenset()) -> QA:
    """"Is there a <colour> <shape> in the image?" about a present target pair, or an absent pair of negative
    `kind` not in `unseen_pairs` (training: the held-out pairs, so no training answer is about them)."""
    present = {o.pair for o in scene.targets}
    colour, shape = rng.choice(sorted(present) if positive else negative_candidates(scene, kind, unseen_pairs))
    answer = "yes" if (colour, shape) in present else "no"
    return QA("existence", f"Is there {article(colour)} {colour} {shape} in the image?", answer, kind,
              held_out=(colour, shape) in HELD_OUT_PAIRS)


def negative_candidates(scene: Scene, kind: str, unseen_pairs: frozenset[tuple[str, str]] = frozenset()
                        ) -> list[tuple[str, str]]:
    """Absent (colour, shape) pairs of one negative kind, none of `unseen_pairs` (grey distractors are absent
    pairs too).

    random: any absent pair; popular: the most frequent absent pairs; adversarial: absent pairs that
    combine a present colour with a present shape (attributes swapped between targets), or share one of
    them when no such pair is absent.
    """
    present = {o.pair for o in scene.targets}
    absent = [p for p in product(COLOURS, SHAPES) if p not in present and p not in unseen_pairs]
    if kind == "random":
        return absent
    if kind == "popular":
        return [p for p in POPULAR_PAIRS if p in absent][:POPULAR_TOP_K]
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


def scene_questions(scene: Scene, index: int, rng: random.Random,
                    unseen_pairs: frozenset[tuple[str, str]] = frozenset()) -> list[QA]:
    """The questions asked about scene number `index` of its split: two attribute and two position
    questions (fewer when the scene has fewer), two count questions, and one existence question per
    negative kind; none names a pair of `unseen_pairs`."""
    attribute = attribute_questions(scene)
    qas = rng.sample(attribute, min(2, len(attribute)))
    qas += count_questions(scene, 2, rng)
    position = position_questions(scene)
    qas += rng.sample(position, min(2, len(position)))
    # Yes / no alternate with the scene index, so each negative kind gets as many yes as no questions.
    qas += [existence_question(scene, kind, (index + k) % 2 == 0, rng, unseen_pairs)
            for k, kind in enumerate(NEGATIVE_KINDS)]
    return qas
