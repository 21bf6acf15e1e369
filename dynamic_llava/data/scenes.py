"""Scene specs: 2-4 coloured shapes, one per cell of a 3 x 3 grid, sampled from a seed.

A scene is resolution free (centres and radii are fractions of the image side), so the same spec
renders at any `--image-size`. Objects sit in distinct cells with a bounded jitter, which keeps
left / right / above / below unambiguous between objects in different columns / rows (`MARGIN`), and
no two objects share (size, colour, shape), so every object has a unique name.
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
SIZES = ("small", "large")
# Fraction of the image side. Objects are large on purpose: a model trained from scratch first learns to use
# the image through roughly uniform attention over its tokens, which carries an object only if it covers
# many of them (at 112 px / 14-px patches a large object spans ~2 x 2 patches, a small one ~1.5 x 1.5).
RADIUS = {"small": 0.09, "large": 0.14}

GRID = 3
CELL_NAMES = (("top left", "top center", "top right"),
              ("middle left", "center", "middle right"),
              ("bottom left", "bottom center", "bottom right"))
JITTER = 0.02  # max offset of a centre from its cell centre; large radius + jitter < half a cell
MARGIN = 0.15  # centres at least this far apart on an axis: the relation on that axis is asked / stated

SPLITS = ("train", "val", "test")
# Split of a scene = a hash of its canonical content, so two splits can never hold the same scene.
_SPLIT_BUCKETS = {"test": range(10), "val": range(10, 20), "train": range(20, 100)}

MIN_OBJECTS, MAX_OBJECTS = 2, 4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    x: float  # centre, fraction of the image width
    y: float  # centre, fraction of the image height (0 = top)

    @property
    def name(self) -> str:
        """The unique full name, e.g. "large red circle"."""
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def place(self) -> str:
        return CELL_NAMES[self.row][self.col]


@dataclass(frozen=True)
class Scene:
    scene_id: str
    seed: int  # drives the rendering noise and clutter
    objects: tuple[SceneObject, ...]  # in reading order: top to bottom, left to right

    @property
    def key(self) -> str:
        """Canonical content (objects and cells, not the jitter): what "the same scene" means across splits."""
        return ";".join(f"{o.row}{o.col}:{o.name}" for o in self.objects)


def split_of(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def left_of(a: SceneObject, b: SceneObject) -> bool | None:
    """True / False when the columns are clearly apart, None when too close to call."""
    return None if abs(a.x - b.x) < MARGIN else a.x < b.x


def above(a: SceneObject, b: SceneObject) -> bool | None:
    return None if abs(a.y - b.y) < MARGIN else a.y < b.y


def _sample_objects(rng: random.Random) -> tuple[SceneObject, ...]:
    count = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    cells = sorted(rng.sample(range(GRID * GRID), count))  # sorted cell index = reading order
    kinds: set[tuple[str, str, str]] = set()
    objects = []
    for cell in cells:
        while True:  # resample until (size, colour, shape) is new in the scene
            kind = (rng.choice(SIZES), rng.choices(COLOURS, COLOUR_WEIGHTS)[0], rng.choices(SHAPES, SHAPE_WEIGHTS)[0])
            if kind not in kinds:
                break
        kinds.add(kind)
        row, col = divmod(cell, GRID)
        x = (col + 0.5) / GRID + rng.uniform(-JITTER, JITTER)
        y = (row + 0.5) / GRID + rng.uniform(-JITTER, JITTER)
        objects.append(SceneObject(kind[2], kind[1], kind[0], row, col, round(x, 4), round(y, 4)))
    return tuple(objects)


def sample_scene(seed: int, split: str, index: int) -> Scene:
    """Scene `index` of `split`: drawn from its own derived seed, retried until its content hashes to `split`."""
    for attempt in range(10_000):
        # A string seed is hashed with SHA-512 by `random`: stable across runs and PYTHONHASHSEED.
        rng = random.Random(f"synth/{seed}/{split}/{index}/{attempt}")
        objects = _sample_objects(rng)
        scene = Scene(f"{split}_{index:06d}", rng.getrandbits(63), objects)
        if split_of(scene.key) == split:
            return scene
    raise RuntimeError(f"no {split} scene found for seed {seed}, index {index}")  # ~1e-458 chance


def scene_from_dict(data: dict) -> Scene:
    """Inverse of `dataclasses.asdict(scene)`; other keys (the `image` of a `scenes.jsonl` line) are ignored."""
    return Scene(data["scene_id"], data["seed"], tuple(SceneObject(**o) for o in data["objects"]))
