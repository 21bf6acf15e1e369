"""Images in, pixels and token ids out: the multimodal input helpers LLaVA users know."""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import sentencepiece as spm
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


# ----------------------------------------------------------------------------- LLaVA's token ids
SPIECE_UNDERLINE = "\u2581"  # SentencePiece's word-boundary mark
# Appended to a ModelProto, this record (field 3, normalizer_spec, holding field 3, add_dummy_prefix = false)
# merges into the model's normalizer: protobuf merges repeated singular message fields, last scalar wins.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


@dataclass(frozen=True)
class _AddedToken:
    content: str
    id: int
    lstrip: bool
    rstrip: bool
    single_word: bool


@dataclass(frozen=True)
class _SlowLlamaSpec:
    """What LLaVA's `LlamaTokenizer(use_fast=False)` ids depend on; hashable, so encoders are cached."""

    model_file: str
    legacy: bool
    added: tuple[_AddedToken, ...]
    special: frozenset[str]  # all_special_tokens: a leading "▁" before one of these is dropped (legacy=False)
    unk_token: str
    prefix_ids: tuple[int, ...]  # BOS when add_bos_token
    suffix_ids: tuple[int, ...]  # EOS when add_eos_token


class SlowLlamaEncoder:
    """Token ids exactly as LLaVA-1.5 computes them: transformers 4.3x's SentencePiece `LlamaTokenizer`
    (LLaVA loads it with `use_fast=False`), which the fast tokenizer does not reproduce for text that
    starts with spaces or a literal "▁", nor (with `legacy`) for text right after a special token.

    Text is split at added tokens (honouring their lstrip / rstrip / single_word flags); each piece is
    encoded by SentencePiece. `legacy=True`: every piece gets SentencePiece's dummy "▁" prefix.
    `legacy=False`: "▁" marks in the text become spaces, one "▁" is put in front of the whole text only,
    pieces are encoded without a dummy prefix (a piece that starts with a space is encoded behind
    `unk_token`, whose pieces are then removed, so the space is kept), and a leading lone "▁" before a
    special token is dropped.
    """

    def __init__(self, spec: _SlowLlamaSpec) -> None:
        self.spec = spec
        proto = Path(spec.model_file).read_bytes()
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(proto if spec.legacy else proto + _NO_DUMMY_PREFIX)
        self.unk_length = len(self.sp.encode(spec.unk_token))
        self.added = {token.content: token for token in spec.added}
        contents = sorted(self.added, key=len, reverse=True)  # the longest added token wins at a position
        self.pattern = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None

    def __call__(self, text: str) -> list[int]:
        return [*self.spec.prefix_ids, *self.encode(text), *self.spec.suffix_ids]

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS / EOS."""
        if not text:
            return []
        if not self.spec.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        ids: list[int] = []
        for piece, added in self._split(text):
            ids.extend([added.id] if added is not None else self._encode_piece(piece))
        if (not self.spec.legacy and len(ids) > 1 and self.sp.id_to_piece(ids[0]) == SPIECE_UNDERLINE
                and self._token_text(ids[1]) in self.spec.special):
            ids = ids[1:]
        return ids

    def _token_text(self, token_id: int) -> str:
        for token in self.spec.added:
            if token.id == token_id:
                return token.content
        return self.sp.id_to_piece(token_id)

    def _split(self, text: str) -> list[tuple[str, _AddedToken | None]]:
        """Text pieces and added tokens, in order, with the added tokens' whitespace rules applied."""
        parts = [part for part in self.pattern.split(text) if part] if self.pattern else [text]
        tokens = [self.added.get(part) for part in parts]
        for i, token in enumerate(tokens):
            if token is None:
                continue
            left = parts[i - 1] if i > 0 else ""
            right = parts[i + 1] if i + 1 < len(parts) else ""
            if token.rstrip and right:
                parts[i + 1] = right.lstrip()
            if token.lstrip and left:
                parts[i - 1] = left.rstrip()
            # A single-word token glued to a neighbour is plain text of that neighbour.
            if token.single_word and left and left[-1] != " ":
                parts[i - 1], parts[i], tokens[i - 1], tokens[i] = parts[i - 1] + parts[i], "", None, None
            elif token.single_word and right and right[0] != " ":
                parts[i + 1], parts[i], tokens[i + 1], tokens[i] = parts[i] + parts[i + 1], "", None, None
        return [(part, token) for part, token in zip(parts, tokens) if part]

    def _encode_piece(self, piece: str) -> list[int]:
        if self.spec.legacy or not piece.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(piece)
        ids = self.sp.encode(self.spec.unk_token + piece)
        return ids[self.unk_length:] if len(ids) >= self.unk_length else ids


@lru_cache(maxsize=8)
def _slow_llama_encoder(spec: _SlowLlamaSpec) -> SlowLlamaEncoder:
    return SlowLlamaEncoder(spec)


def slow_llama_encoder(tokenizer: Any) -> SlowLlamaEncoder | None:
    """The LLaVA-exact encoder for a LLaMA-family tokenizer with its SentencePiece model at hand, else None.

    Read from the tokenizer as loaded: its `tokenizer.model`, `legacy` (a missing setting counts as True,
    as transformers 4.3x reads it), added tokens, BOS / EOS settings.
    """
    model_file = getattr(tokenizer, "vocab_file", None)
    if not model_file or not str(model_file).endswith(".model") or not os.path.isfile(model_file):
        return None
    added = tuple(
        _AddedToken(str(token.content), int(token_id), bool(token.lstrip), bool(token.rstrip),
                    bool(token.single_word))
        for token_id, token in sorted(tokenizer.added_tokens_decoder.items())
    )
    prefix, suffix = _special_ids_around(tokenizer)
    spec = _SlowLlamaSpec(
        model_file=str(model_file),
        legacy=bool(getattr(tokenizer, "legacy", True)),
        added=added,
        # transformers 4.3x counts tokens added with `special_tokens=True` among all_special_tokens; 5.x does not.
        special=frozenset(map(str, tokenizer.all_special_tokens)) | {
            str(token.content) for token in tokenizer.added_tokens_decoder.values() if token.special},
        unk_token=str(tokenizer.unk_token),
        prefix_ids=prefix,
        suffix_ids=suffix,
    )
    return _slow_llama_encoder(spec)


def _special_ids_around(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids the tokenizer puts before and after a text (BOS / EOS), read from what it does: its
    `add_bos_token` attribute does not always say (transformers 5 keeps them in tokenizer.json)."""
    bare = list(tokenizer("a", add_special_tokens=False).input_ids)
    full = list(tokenizer("a").input_ids)
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return tuple(full[:start]), tuple(full[start + len(bare):])
    raise ValueError(f"cannot tell the special tokens {type(tokenizer).__name__} adds around a text")


def llava_token_ids(text: str, tokenizer: Any) -> list[int]:
    """`tokenizer(text).input_ids` as LLaVA-1.5 computes it (BOS included): the slow SentencePiece LLaMA
    tokenizer's ids where the tokenizer has its `tokenizer.model`, the tokenizer's own ids otherwise."""
    encoder = slow_llama_encoder(tokenizer)
    return encoder(text) if encoder is not None else list(tokenizer(text).input_ids)


def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Token ids for `prompt` with each `<image>` replaced by `image_token_index`, as LLaVA computes them.

    Text between placeholders is tokenised chunk by chunk with `llava_token_ids` (so ids match what
    checkpoints were trained on); only the first chunk keeps the tokenizer's BOS.
    """
    chunks = [llava_token_ids(chunk, tokenizer) for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
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
