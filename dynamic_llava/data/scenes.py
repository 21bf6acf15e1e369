"""Scene specs (benchmark v2): small shapes, each inside one cell of an 8 x 8 grid, sampled from a seed.

The grid is the tower's patch grid at the chain's geometry (112 px in 14-px patches = 64 tokens), so
every object lies inside exactly one patch and per-patch labels are exact. A scene has 3-5 coloured
*targets* (the only objects questions ask about) and 9-13 grey *distractors* (the same shapes in grey)
in other cells, never fewer than `MIN_OBJECT_CELLS` objects in all: more than the 20 % token budget
(`KEPT_PATCHES` of 64), so "keep every patch that is not background" does not fit the budget and a
policy has to find the coloured ones. No two targets share (colour, shape), so "the red circle" always
names one object.

Held-out pairs: the (colour, shape) pairs of `HELD_OUT_PAIRS` (5 of the 35; one per shape, each with
another colour, none among the most frequent) are never targets in training scenes, only in val / test,
where questions about them measure generalisation to unseen combinations.

A scene is resolution free (centres are fractions of the image side, the object size is `RADIUS`), so
it renders at any `--image-size`; at 112 px each object stays at least half a pixel inside its cell.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

# Skewed frequencies (first = most frequent) make POPE's "popular" negatives meaningful.
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink")
COLOUR_WEIGHTS = (6, 5, 4, 4, 3, 3, 2)
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SHAPE_WEIGHTS = (5, 4, 4, 3, 3)
DISTRACTOR_COLOUR = "grey"  # the colour of every distractor, never of a target

HELD_OUT_PAIRS = frozenset({("purple", "circle"), ("yellow", "square"), ("green", "triangle"),
                            ("red", "star"), ("blue", "diamond")})

GRID = 8  # cells per side: the tower's 8 x 8 patches at 112 px / 14 px
KEPT_PATCHES = int(0.2 * GRID * GRID)  # 12: what a 20 % image-token budget keeps
MIN_TARGETS, MAX_TARGETS = 3, 5
MIN_DISTRACTORS, MAX_DISTRACTORS = 9, 13
MIN_OBJECT_CELLS = KEPT_PATCHES + 1  # targets + distractors always exceed the budget

# Fractions of the image side. A cell is 1/8 = 0.125 (14 px at 112 px); the widest shape reaches 1.1 x
# RADIUS from its centre, so RADIUS * 1.1 + JITTER = 0.0555 stays ~0.8 px inside a 112-px cell's half side.
RADIUS = 0.045
JITTER = 0.006  # max offset of a centre from its cell centre, per axis

# Rough places, by thirds of the image (of the cell centre): for descriptions and captions.
PLACE_NAMES = (("top left", "top center", "top right"),
               ("middle left", "center", "middle right"),
               ("bottom left", "bottom center", "bottom right"))
MIN_APART = 2  # cells apart on an axis for left / right / above / below to be stated

SPLITS = ("train", "val", "test")
# Split of a scene = a hash of its canonical content, so two splits can never hold the same scene.
_SPLIT_BUCKETS = {"test": range(10), "val": range(10, 20), "train": range(20, 100)}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str  # one of COLOURS (a target) or DISTRACTOR_COLOUR
    row: int  # grid cell (= tower patch at 112 px / 14 px), 0..GRID-1 from the top
    col: int  # 0..GRID-1 from the left
    x: float  # centre, fraction of the image width
    y: float  # centre, fraction of the image height (0 = top)

    @property
    def is_target(self) -> bool:
        return self.colour != DISTRACTOR_COLOUR

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape

    @property
    def name(self) -> str:
        """E.g. "red circle": unique among the targets of a scene."""
        return f"{self.colour} {self.shape}"

    @property
    def place(self) -> str:
        """The third of the image it is in, e.g. "top left"."""
        return PLACE_NAMES[_third(self.row)][_third(self.col)]


def _third(cell: int) -> int:
    return int((cell + 0.5) / GRID * 3)


@dataclass(frozen=True)
class Scene:
    scene_id: str
    seed: int  # drives the rendering noise, clutter and distractor grey levels
    objects: tuple[SceneObject, ...]  # targets and distractors, in reading order: top to bottom, left to right

    @property
    def targets(self) -> tuple[SceneObject, ...]:
        return tuple(o for o in self.objects if o.is_target)

    @property
    def distractors(self) -> tuple[SceneObject, ...]:
        return tuple(o for o in self.objects if not o.is_target)

    @property
    def key(self) -> str:
        """Canonical content (objects and cells, not the jitter): what "the same scene" means across splits."""
        return ";".join(f"{o.row}{o.col}:{o.name}" for o in self.objects)


def split_of(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def left_of(a: SceneObject, b: SceneObject) -> bool | None:
    """True / False when the columns are clearly apart, None when too close to call."""
    return None if abs(a.col - b.col) < MIN_APART else a.col < b.col


def above(a: SceneObject, b: SceneObject) -> bool | None:
    return None if abs(a.row - b.row) < MIN_APART else a.row < b.row


def _target_pairs(rng: random.Random, count: int, allow_held_out: bool) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    while len(pairs) < count:  # resample until (colour, shape) is new in the scene and allowed
        pair = (rng.choices(COLOURS, COLOUR_WEIGHTS)[0], rng.choices(SHAPES, SHAPE_WEIGHTS)[0])
        if pair not in pairs and (allow_held_out or pair not in HELD_OUT_PAIRS):
            pairs.append(pair)
    return pairs


def _sample_objects(rng: random.Random, allow_held_out: bool) -> tuple[SceneObject, ...]:
    targets = rng.randint(MIN_TARGETS, MAX_TARGETS)
    distractors = rng.randint(max(MIN_DISTRACTORS, MIN_OBJECT_CELLS - targets), MAX_DISTRACTORS)
    cells = rng.sample(range(GRID * GRID), targets + distractors)  # random order: the first ones get targets
    pairs = _target_pairs(rng, targets, allow_held_out)
    pairs += [(DISTRACTOR_COLOUR, rng.choice(SHAPES)) for _ in range(distractors)]
    objects = []
    for cell, (colour, shape) in zip(cells, pairs):
        row, col = divmod(cell, GRID)
        x = (col + 0.5) / GRID + rng.uniform(-JITTER, JITTER)
        y = (row + 0.5) / GRID + rng.uniform(-JITTER, JITTER)
        objects.append(SceneObject(shape, colour, row, col, round(x, 4), round(y, 4)))
    return tuple(sorted(objects, key=lambda o: (o.row, o.col)))


def sample_scene(seed: int, split: str, index: int) -> Scene:
    """Scene `index` of `split`: drawn from its own derived seed, retried until its content hashes to
    `split`; training scenes have no target of a held-out pair."""
    for attempt in range(10_000):
        # A string seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"synth-v2/{seed}/{split}/{index}/{attempt}")
        objects = _sample_objects(rng, allow_held_out=split != "train")
        scene = Scene(f"{split}_{index:06d}", rng.getrandbits(63), objects)
        if split_of(scene.key) == split:
            return scene
    raise RuntimeError(f"no {split} scene found for seed {seed}, index {index}")  # ~1e-458 chance


def scene_from_dict(data: dict) -> Scene:
    """Inverse of `dataclasses.asdict(scene)`; other keys (the `image` of a `scenes.jsonl` line) are ignored."""
    return Scene(data["scene_id"], data["seed"], tuple(SceneObject(**o) for o in data["objects"]))
