"""Draw a scene: a textured grey background with neutral clutter, then the shapes.

The texture (blotchy grey levels, faint stripes) and clutter (thin lines, specks) vary per scene but are
colourless and darker than any distractor, so they carry no answer. Distractors are filled with one of
`DISTRACTOR_GREYS`, lighter than the background and the clutter, so they are clearly objects, but
colourless. Everything random comes from the scene's own seed. The background is quantised to a few
grey levels so the PNGs stay small.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .scenes import RADIUS, Scene, SceneObject

RGB = {
    "red": (220, 40, 40),
    "blue": (40, 90, 235),
    "green": (40, 175, 60),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "pink": (250, 140, 200),
}
# Background greys are 54-107 and clutter 100-150: a distractor is always at least 15 levels lighter.
DISTRACTOR_GREYS = (165, 195, 225)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = int(rng.integers(60, 96))
    coarse = rng.integers(-1, 2, size=(6, 6)).astype(np.float32)  # low-frequency blotches
    blotches = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(8, 20)
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0.6
    grey = base + 6 * np.round(blotches) + 5 * stripes
    return Image.fromarray(np.repeat(grey.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    for _ in range(int(rng.integers(2, 6))):
        level = int(rng.integers(110, 151))
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, size, 4))
        draw.line((x0, y0, x1, y1), fill=(level, level, level), width=1)
    for _ in range(int(rng.integers(5, 15))):
        level = int(rng.integers(100, 151))
        x, y = (int(v) for v in rng.integers(0, size, 2))
        draw.rectangle((x, y, x + 1, y + 1), fill=(level, level, level))


def _polygon(cx: float, cy: float, radius: float, points: int, rotation: float, inner: float | None = None
             ) -> list[tuple[float, float]]:
    """A regular polygon (or a star, with `inner` radius between the points), first vertex at `rotation`."""
    steps = points * 2 if inner else points
    out = []
    for k in range(steps):
        r = inner if inner and k % 2 else radius
        a = rotation + 2 * math.pi * k / steps
        out.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return out


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int, fill: tuple[int, int, int]) -> None:
    """`obj` in `fill`; no shape reaches further than 1.1 x RADIUS from its centre."""
    # PIL puts pixel i's centre at coordinate i: a centre at fraction f of the side is at f * size - 0.5
    cx, cy, r = obj.x * size - 0.5, obj.y * size - 0.5, RADIUS * size
    up = -math.pi / 2
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        side = r * 0.8  # half side: about the circle's area
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.2, r * 1.1, 3, up), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, up), fill=fill)
    elif obj.shape == "star":
        draw.polygon(_polygon(cx, cy + r * 0.1, r * 1.1, 5, up, inner=r * 0.45), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene, size: int) -> Image.Image:
    """The scene as a `size` x `size` RGB image; the same scene and size give the same pixels."""
    rng = np.random.default_rng(scene.seed)
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    _clutter(draw, rng, size)
    for obj in scene.objects:
        if obj.is_target:
            fill = RGB[obj.colour]
        else:
            level = DISTRACTOR_GREYS[int(rng.integers(len(DISTRACTOR_GREYS)))]
            fill = (level, level, level)
        draw_object(draw, obj, size, fill)
    return image
