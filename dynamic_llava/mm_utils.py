"""Images in, pixels and token ids out: the multimodal input helpers LLaVA users know."""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image, UnidentifiedImageError

from dynamic_llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from dynamic_llava.errors import UserError

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image]


def load_image(source: ImageSource) -> Image.Image:
    """Open one image as RGB from a path, base64 text (plain or a data URL), raw bytes or a PIL image.

    Every failure is a UserError naming the source; URLs are refused (there is no network).
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source, "(PIL image)")
    if isinstance(source, (bytes, bytearray)):
        return _decode_image(bytes(source), "(raw bytes)")
    if isinstance(source, os.PathLike):
        return _read_image_file(Path(source))
    if isinstance(source, str):
        return _load_from_text(source)
    raise UserError(
        f"cannot load an image from a {type(source).__name__}; "
        "pass a file path, base64 text, a data URL, bytes or a PIL image"
    )


def load_images(sources: Iterable[ImageSource]) -> list[Image.Image]:
    """`load_image` for each source, in order."""
    return [load_image(source) for source in sources]


def _load_from_text(text: str) -> Image.Image:
    if not text:
        raise UserError("empty image source: expected a file path or base64 image data")
    if text.startswith(("http://", "https://")):
        raise UserError(
            f"image URLs are not fetched (no network access): {text}; download the image and pass its path"
        )
    if text.startswith("data:"):
        header, comma, payload = text.partition(",")
        data = _b64decode(payload) if comma and header.endswith(";base64") else None
        if data is None:
            raise UserError(f"not a base64 data URL ('data:image/...;base64,<data>'): {_shorten(text)}")
        return _decode_image(data, f"data URL {_shorten(text)}")
    # os.path.exists, unlike Path.exists, tolerates names too long to be paths (i.e. base64 text).
    if os.path.exists(text):
        return _read_image_file(Path(text))
    data = _b64decode(text)
    if data is None:
        raise UserError(f"image file not found: {text}")
    return _decode_image(data, f"{_shorten(text)} (not an existing file, so read as base64)")


def _b64decode(text: str) -> bytes | None:
    """Strict base64 decoding (line breaks allowed); None if `text` is not base64."""
    compact = re.sub(r"\s+", "", text)
    if not compact:
        return None
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None


def _read_image_file(path: Path) -> Image.Image:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"image file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"image path is a directory, not a file: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read image file {path}: {exc.strerror or exc}") from None
    return _decode_image(data, str(path))


def _decode_image(data: bytes, label: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UserError(f"cannot read image {label}: not a recognised image format, or corrupt") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {label}: {exc}") from None
    return _to_rgb(image, label)


def _to_rgb(image: Image.Image, label: str) -> Image.Image:
    # Decoding is lazy in PIL: truncated or corrupt pixel data only fails here.
    try:
        return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {label}: {exc}") from None


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def expand2square(pil_img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad the shorter side symmetrically with `background_color` (the image itself if square)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def process_images(
    images: Sequence[Image.Image], image_processor: Any, image_aspect_ratio: str | None
) -> torch.Tensor:
    """Pixel values [N, 3, H, W] for RGB images, preprocessed as the checkpoint was trained.

    `image_aspect_ratio == "pad"` (LLaVA-1.5) first pads each image to a square with the processor's
    mean colour, so the centre crop keeps the whole image; anything else is plain CLIP preprocessing
    (resize the short side, centre crop).
    """
    if image_aspect_ratio == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        images = [expand2square(image, background) for image in images]
    return image_processor(list(images), return_tensors="pt")["pixel_values"]


def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Token ids for `prompt` with each `<image>` replaced by `image_token_index`.

    Text between placeholders is tokenised chunk by chunk (as LLaVA does, so ids match what
    checkpoints were trained on); only the first chunk keeps the tokenizer's BOS.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    has_bos = tokenizer.bos_token_id is not None and chunks[0][:1] == [tokenizer.bos_token_id]
    input_ids = list(chunks[0])
    for chunk in chunks[1:]:
        input_ids.append(image_token_index)
        input_ids.extend(chunk[1:] if has_bos else chunk)
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"unsupported return_tensors {return_tensors!r} (use None or 'pt')")


def count_image_placeholders(prompt: str) -> int:
    """How many `<image>` placeholders `prompt` holds (each needs one image)."""
    return prompt.count(DEFAULT_IMAGE_TOKEN)


def get_model_name_from_path(model_path: str | os.PathLike) -> str:
    """The model's name as LLaVA derives it: the last folder, or `parent_checkpoint-N`."""
    parts = str(model_path).strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]
