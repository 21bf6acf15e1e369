"""Pictures of what the token policy kept: dropped image patches greyed out."""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image, ImageDraw

from .mm_utils import expand2square


def kept_patches_overlay(image: Image.Image, keep: Sequence[bool], image_aspect_ratio: str | None,
                         size: int = 336, background: tuple[int, int, int] = (122, 116, 104)) -> Image.Image:
    """The image as the vision tower saw it (padded to a square for `pad`, resized), with each dropped
    patch of the side x side grid (side = sqrt(len(keep)), row-major) blended to grey."""
    side = math.isqrt(len(keep))
    if side * side != len(keep):
        raise ValueError(f"{len(keep)} patches do not form a square grid")
    view = expand2square(image, background) if image_aspect_ratio == "pad" else image
    view = view.convert("RGB").resize((size, size), Image.BICUBIC)
    grey = Image.new("RGB", view.size, (128, 128, 128))
    faded = Image.blend(view, grey, 0.8)
    mask = Image.new("L", view.size, 0)
    draw = ImageDraw.Draw(mask)
    cell = size / side
    for index, kept in enumerate(keep):
        if not kept:
            row, col = divmod(index, side)
            draw.rectangle([col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1], fill=255)
    return Image.composite(faded, view, mask)
