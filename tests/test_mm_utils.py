"""Image loading / preprocessing and the `<image>`-aware tokenisation."""

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor

from dynamic_llava.constants import IMAGE_TOKEN_INDEX
from dynamic_llava.errors import UserError
from dynamic_llava.mm_utils import (
    count_image_placeholders,
    expand2square,
    get_model_name_from_path,
    load_image,
    load_images,
    process_images,
    tokenizer_image_token,
)
from dynamic_llava.tiny.tokenizer import train_tiny_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
RED = (200, 30, 60)


def png_bytes(size=(40, 20), color=RED, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tiny_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def image_processor():
    return CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


@pytest.fixture
def png_file(tmp_path) -> Path:
    path = tmp_path / "red.png"
    path.write_bytes(png_bytes())
    return path


def assert_red(image: Image.Image, size=(40, 20)):
    assert image.mode == "RGB"
    assert image.size == size
    assert image.getpixel((0, 0)) == RED


# --- load_image: every accepted source -----------------------------------------------------------


def test_load_from_str_and_path(png_file):
    assert_red(load_image(str(png_file)))
    assert_red(load_image(png_file))


def test_load_from_base64_plain_and_wrapped():
    encoded = base64.b64encode(png_bytes()).decode()
    assert_red(load_image(encoded))
    wrapped = "\n".join(encoded[i : i + 16] for i in range(0, len(encoded), 16))
    assert_red(load_image(wrapped))


def test_load_from_data_url():
    encoded = base64.b64encode(png_bytes()).decode()
    assert_red(load_image(f"data:image/png;base64,{encoded}"))


def test_load_from_bytes():
    assert_red(load_image(png_bytes()))
    assert_red(load_image(bytearray(png_bytes())))


@pytest.mark.parametrize("mode, color", [("RGBA", RED + (128,)), ("L", 90), ("P", 3)])
def test_load_converts_to_rgb(mode, color):
    image = load_image(Image.new(mode, (40, 20), color))
    assert image.mode == "RGB" and image.size == (40, 20)
    assert load_image(png_bytes(mode=mode, color=color)).mode == "RGB"


def test_load_images_mixed_sources(png_file):
    images = load_images([png_file, png_bytes(size=(8, 8)), Image.new("RGB", (5, 7))])
    assert [image.size for image in images] == [(40, 20), (8, 8), (5, 7)]


# --- load_image: every bad input is one UserError naming the source ------------------------------


def test_missing_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "cat.jpg"
    for source in (missing, str(missing)):
        with pytest.raises(UserError, match="not found") as excinfo:
            load_image(source)
        assert str(missing) in str(excinfo.value)


def test_directory_names_path(tmp_path):
    with pytest.raises(UserError, match="directory") as excinfo:
        load_image(tmp_path)
    assert str(tmp_path) in str(excinfo.value)


def test_corrupt_file_names_path(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.raises(UserError) as excinfo:
        load_image(str(path))
    assert str(path) in str(excinfo.value)
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


def test_truncated_file_names_path(tmp_path):
    path = tmp_path / "truncated.png"
    data = png_bytes(size=(64, 64))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as excinfo:
        load_image(path)
    assert str(path) in str(excinfo.value)


def test_corrupt_bytes():
    with pytest.raises(UserError, match="cannot read image"):
        load_image(b"\x89PNG garbage")


def test_url_is_refused():
    with pytest.raises(UserError, match="not fetched") as excinfo:
        load_image("https://example.com/cat.jpg")
    assert "https://example.com/cat.jpg" in str(excinfo.value)


def test_bad_base64_data_url():
    with pytest.raises(UserError, match="data URL"):
        load_image("data:image/png;base64,@@not base64@@")
    with pytest.raises(UserError, match="data URL"):
        load_image("data:image/png,rawtext")


def test_base64_that_is_not_an_image():
    text = base64.b64encode(b"hello, not an image at all").decode()
    with pytest.raises(UserError, match="base64") as excinfo:
        load_image(text)
    assert text in str(excinfo.value)


def test_neither_file_nor_base64_names_the_string():
    with pytest.raises(UserError, match="not found: images/cat_001.jpg"):
        load_image("images/cat_001.jpg")
    with pytest.raises(UserError, match="empty"):
        load_image("")


def test_unsupported_type():
    with pytest.raises(UserError, match="int"):
        load_image(42)


# --- expand2square / process_images ----------------------------------------------------------------


def test_expand2square_centres_image_on_background():
    tall = Image.new("RGB", (10, 30), RED)
    square = expand2square(tall, (1, 2, 3))
    assert square.size == (30, 30)
    assert square.getpixel((0, 0)) == (1, 2, 3) and square.getpixel((29, 29)) == (1, 2, 3)
    assert square.getpixel((10, 0)) == RED and square.getpixel((19, 29)) == RED
    assert square.getpixel((9, 15)) == (1, 2, 3) and square.getpixel((20, 15)) == (1, 2, 3)
    already = Image.new("RGB", (5, 5))
    assert expand2square(already, (0, 0, 0)) is already


def normalised(rgb) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def test_process_images_pad_borders_with_mean_colour(image_processor):
    wide = Image.new("RGB", (120, 60), RED)  # padded to 120x120: 30 rows of border above and below
    pixels = process_images([wide, wide], image_processor, "pad")
    assert pixels.shape == (2, 3, 336, 336) and pixels.dtype == torch.float32
    border = 30 * 336 // 120 - 4  # rows that are pure background, away from resampling blur
    for rows in (pixels[:, :, :border, :], pixels[:, :, -border:, :]):
        assert rows.abs().max() < 0.02  # the mean colour normalises to ~0
    centre = pixels[0, :, 160:176, 160:176]
    assert torch.allclose(centre, normalised(RED)[:, None, None].expand_as(centre), atol=0.02)


def test_process_images_without_pad_crops_the_centre(image_processor):
    wide = Image.new("RGB", (120, 60), RED)
    for mode in ("resize", None, "crop"):
        pixels = process_images([wide], image_processor, mode)
        assert pixels.shape == (1, 3, 336, 336)
        expected = normalised(RED)[None, :, None, None].expand_as(pixels)
        assert torch.allclose(pixels, expected, atol=0.02)  # no background border anywhere


def test_process_images_pad_handles_mixed_sizes(image_processor):
    images = [Image.new("RGB", (120, 60), RED), Image.new("RGB", (20, 90), RED), Image.new("RGB", (50, 50), RED)]
    assert process_images(images, image_processor, "pad").shape == (3, 3, 336, 336)


# --- tokenizer_image_token ---------------------------------------------------------------------


def test_tokenizer_adds_bos(tokenizer):
    assert tokenizer("What is this?").input_ids[0] == tokenizer.bos_token_id == 1


def test_no_image_equals_plain_tokenisation(tokenizer):
    prompt = "USER: What is this? ASSISTANT:"
    assert tokenizer_image_token(prompt, tokenizer) == tokenizer(prompt).input_ids


def test_one_image(tokenizer):
    before, after = "A chat. USER: ", "\nWhat is this? ASSISTANT:"
    ids = tokenizer_image_token(before + "<image>" + after, tokenizer)
    head = tokenizer(before).input_ids
    assert ids == head + [IMAGE_TOKEN_INDEX] + tokenizer(after).input_ids[1:]
    assert ids.index(IMAGE_TOKEN_INDEX) == len(head)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_two_images_and_leading_placeholder(tokenizer):
    ids = tokenizer_image_token("<image>\n<image>\nDescribe both.", tokenizer)
    newline = tokenizer("\n").input_ids[1:]
    assert ids == [1, IMAGE_TOKEN_INDEX] + newline + [IMAGE_TOKEN_INDEX] + tokenizer("\nDescribe both.").input_ids[1:]
    assert ids.count(IMAGE_TOKEN_INDEX) == 2 and ids.count(1) == 1


def test_tensor_output_and_custom_index(tokenizer):
    prompt = "<image>\nWhat is this?"
    tensor = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")
    assert tensor.dtype == torch.long and tensor.tolist() == tokenizer_image_token(prompt, tokenizer)
    assert tokenizer_image_token(prompt, tokenizer, image_token_index=-7)[1] == -7
    with pytest.raises(ValueError):
        tokenizer_image_token(prompt, tokenizer, return_tensors="np")


def test_tokenizer_without_bos_keeps_every_token(tokenizer):
    no_bos = AutoTokenizer.from_pretrained(tokenizer.name_or_path, add_bos_token=False)
    ids = tokenizer_image_token("Look: <image>\nWhat?", no_bos)
    assert ids == no_bos("Look: ").input_ids + [IMAGE_TOKEN_INDEX] + no_bos("\nWhat?").input_ids
    assert 1 not in ids


# --- small helpers -----------------------------------------------------------------------------


def test_count_image_placeholders():
    assert count_image_placeholders("<image>\n<image>\nCompare.") == 2
    assert count_image_placeholders("no image") == 0


@pytest.mark.parametrize(
    "path, name",
    [
        ("liuhaotian/llava-v1.5-7b", "llava-v1.5-7b"),
        ("/ckpts/dynamic-llava-7b/", "dynamic-llava-7b"),
        ("/ckpts/run1/checkpoint-500", "run1_checkpoint-500"),
        (Path("/ckpts/run1/checkpoint-500/"), "run1_checkpoint-500"),
        ("checkpoint-500", "checkpoint-500"),
    ],
)
def test_get_model_name_from_path(path, name):
    assert get_model_name_from_path(path) == name
