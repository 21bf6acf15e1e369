"""Images from requests, within limits: base64 (plain or a data URL) decoded here, never read as paths.

Request strings never reach `mm_utils.load_image` (which would open a string as a file path): bytes are
decoded here, their size and pixel count checked before any pixel data is decoded, and the PIL image is
handed on. http(s) URLs are fetched only when the server allows it, with a byte cap and a timeout.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..mm_utils import load_image
from .protocol import ErrorCode, ServeError

_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 10_000_000  # encoded file size
    max_pixels: int = 4096 * 4096  # width x height
    fetch_timeout: float = 10.0  # seconds, for http(s) URLs


def _bad(message: str) -> ServeError:
    return ServeError(ErrorCode.BAD_REQUEST, message)


def decode_base64_image(text: object, limits: ImageLimits, label: str = "image") -> Image.Image:
    """An RGB image from base64 text or a `data:image/...;base64,` URL."""
    if not isinstance(text, str):
        raise _bad(f"{label} must be a base64 string, got {type(text).__name__}")
    match = _DATA_URL.match(text)
    payload = re.sub(r"\s+", "", text[match.end():] if match else text)
    if not payload:
        raise _bad(f"{label} is empty")
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise _bad(f"{label} is larger than the limit of {limits.max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{label} is not valid base64") from None
    return decode_image_bytes(data, limits, label)


def decode_image_bytes(data: bytes, limits: ImageLimits, label: str = "image") -> Image.Image:
    if len(data) > limits.max_bytes:
        raise _bad(f"{label} is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise _bad(f"{label} is not a recognised image format") from None
    except Image.DecompressionBombError:
        raise _bad(f"{label} has more than {limits.max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise _bad(f"{label} cannot be read: {error}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise _bad(f"{label} is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
    try:
        return load_image(image)  # decodes the pixels (corrupt data fails here), as RGB
    except UserError as error:
        raise _bad(f"{label}: {error}") from None


async def fetch_image(url: str, limits: ImageLimits, client: httpx.AsyncClient, label: str = "image") -> Image.Image:
    """GET an http(s) image URL, reading at most `limits.max_bytes`."""
    if not url.lower().startswith(("http://", "https://")):
        raise _bad(f"{label} URL must be http(s) or a data URL")
    data = bytearray()
    try:
        async with client.stream("GET", url, timeout=limits.fetch_timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise _bad(f"{label} URL answered HTTP {response.status_code}")
            async for piece in response.aiter_bytes():
                data += piece
                if len(data) > limits.max_bytes:
                    raise _bad(f"{label} at the URL is larger than the limit of {limits.max_bytes} bytes")
    except httpx.HTTPError as error:
        raise _bad(f"cannot fetch {label} URL: {error or type(error).__name__}") from None
    return decode_image_bytes(bytes(data), limits, label)
