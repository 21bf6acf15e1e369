"""Token ids and training labels are exactly LLaVA-1.5's, id for id.

The fixture tests/fixtures/llava_tokenization.json holds what LLaVA's own code (llava-torch 1.2.2.post1
on transformers 4.37, slow SentencePiece tokenizer) computes for the tiny tokenizer (its model is
llava_tokenization.model beside it) under the three tokenizer_config.json variants checkpoints ship;
tests/reference/make_llava_token_fixture.py (run in a separate environment) writes it. Here the
project's code is run on the same inputs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch
from PIL import Image

from dynamic_llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from dynamic_llava.conversation import get_conv_template
from dynamic_llava.mm_utils import llava_token_ids, tokenizer_image_token
from dynamic_llava.model.checkpoint_files import open_tokenizer, save_tokenizer
from dynamic_llava.prompting import prepare_request
from dynamic_llava.tiny.tokenizer import train_tiny_tokenizer
from dynamic_llava.train.preprocess import PromptFormat, preprocess

FIXTURE = Path(__file__).parent / "fixtures" / "llava_tokenization.json"
MODEL = FIXTURE.with_suffix(".model")
VARIANTS = {"legacy_true": True, "legacy_false": False, "legacy_missing": None}


@pytest.fixture(scope="module")
def fixture() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory, fixture) -> Path:
    """The tiny tokenizer folder, with the SentencePiece model the fixture was made with (shipped beside
    it, so the ids do not depend on SentencePiece training the same model again)."""
    directory = tmp_path_factory.mktemp("tinytok")
    train_tiny_tokenizer(directory)
    shutil.copyfile(MODEL, directory / "tokenizer.model")
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == fixture["tokenizer_model_sha256"]
    return directory


def variant_dir(source: Path, legacy: bool | None, parent: Path) -> Path:
    """The tiny tokenizer with tokenizer_config.json's `legacy` set, or without the key (None)."""
    folder = parent / f"legacy_{legacy}"
    if not folder.exists():
        shutil.copytree(source, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.pop("legacy", None)
        if legacy is not None:
            config["legacy"] = legacy
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tiny_tokenizer_dir, tmp_path_factory, fixture) -> tuple[str, object, dict]:
    """(name, the tokenizer as the project loads it, LLaVA's results for that tokenizer_config.json)."""
    name = request.param
    folder = variant_dir(tiny_tokenizer_dir, VARIANTS[name], tmp_path_factory.mktemp(name))
    tokenizer = open_tokenizer(folder)
    tokenizer.pad_token = tokenizer.unk_token  # LLaVA's (and load_tokenizer's) padding
    expected = fixture["variants"][name]
    assert bool(tokenizer.legacy) == expected["resolved_legacy"]
    if "same_ids_as" in expected:
        expected = {**fixture["variants"][expected["same_ids_as"]], **expected}
    return name, tokenizer, expected


def report(kind: str, name: str, mismatches: list, total: int) -> None:
    print(f"{kind} [{name}]: {total} compared, {len(mismatches)} mismatches")
    assert not mismatches, f"{len(mismatches)} of {total} differ from LLaVA, e.g. {mismatches[:3]}"


def rendered(case: dict) -> str:
    conv = get_conv_template(case["template"])
    conv.append_message(conv.roles[0], case["user"])
    conv.append_message(conv.roles[1], case.get("answer"))
    return conv.get_prompt()


def test_tokenizer_image_token_matches_llava(variant, fixture):
    name, tokenizer, expected = variant
    mismatches = []
    for case, ids in zip(fixture["prompt_cases"], expected["prompts"], strict=True):
        if "template" in case and rendered(case) != case["prompt"]:
            mismatches.append(("prompt string", case))
        elif tokenizer_image_token(case["prompt"], tokenizer) != ids:
            mismatches.append(("ids", case["prompt"]))
    report("tokenizer_image_token", name, mismatches, len(fixture["prompt_cases"]))


class _Pixels:
    """A stand-in image processor: prepare_request's ids do not depend on pixels."""

    def __call__(self, images, return_tensors):
        return {"pixel_values": torch.zeros(len(images), 3, 4, 4)}


def test_prepare_request_matches_llava(variant, fixture):
    name, tokenizer, expected = variant
    image = Image.new("RGB", (8, 6), (10, 20, 30))
    model_config = SimpleNamespace(mm_use_im_start_end=False, image_aspect_ratio=None)
    mismatches = []
    for case, ids in zip(fixture["request_cases"], expected["requests"], strict=True):
        request = prepare_request(case["query"], [image], tokenizer, _Pixels(), model_config, case["conv_mode"])
        if request.prompt != case["prompt"] or request.input_ids.tolist() != ids:
            mismatches.append(case)
    report("prepare_request", name, mismatches, len(fixture["request_cases"]))


def test_training_preprocess_matches_llava(variant, fixture):
    name, tokenizer, expected = variant
    marked = copy.deepcopy(tokenizer)
    marked.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    mismatches = []
    supervised = 0
    for i, (case, ref) in enumerate(zip(fixture["train_cases"], expected["train"], strict=True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            input_ids, labels = preprocess(case["conversations"], int(case["has_image"]),
                                           marked if case["im_start_end"] else tokenizer,
                                           PromptFormat(case["version"], case["im_start_end"]), f"c{i}")
        llava_masked_all = all(label == IGNORE_INDEX for label in ref["labels"])
        supervised += not llava_masked_all
        if input_ids.tolist() != ref["input_ids"] or labels.tolist() != ref["labels"]:
            mismatches.append((i, case["version"]))
        elif bool(caught) != llava_masked_all:  # we warn exactly where LLaVA reports a mismatch
            mismatches.append((i, "warning", [str(w.message) for w in caught]))
    # The comparison must cover real answer spans, not only samples LLaVA masks entirely.
    assert supervised >= len(fixture["train_cases"]) // 3
    report("training preprocess", name, mismatches, len(fixture["train_cases"]))


PLAIN_TEXTS = ["What is in the image?", " What is it?", "  Two spaces.", "\nNewline first.", "Describe\n\nit.",
               "café 猫 🐱", "Trailing space ", "a\tb", "", " ", "USER: ", "Numbers 12 and 3.5."]


@pytest.mark.parametrize("legacy", [True, False])
def test_plain_text_ids_are_the_sentencepiece_model_s(legacy, tiny_tokenizer_dir, tmp_path):
    """Without special tokens or literal "▁", LLaVA's ids under either `legacy` are exactly what the
    SentencePiece model itself gives (plus BOS); the fast tokenizer drops the space of " What"."""
    tokenizer = open_tokenizer(variant_dir(tiny_tokenizer_dir, legacy, tmp_path))
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    for text in PLAIN_TEXTS:
        assert llava_token_ids(text, tokenizer) == [tokenizer.bos_token_id, *sp.encode(text)], repr(text)


@pytest.mark.parametrize("legacy", [True, False])
def test_space_after_the_image_keeps_its_own_token(legacy, tiny_tokenizer_dir, tmp_path):
    tokenizer = open_tokenizer(variant_dir(tiny_tokenizer_dir, legacy, tmp_path))
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    ids = tokenizer_image_token("USER: <image> What is it?", tokenizer)
    after = ids[ids.index(IMAGE_TOKEN_INDEX) + 1:]
    assert after == sp.encode(" What is it?")
    assert sp.id_to_piece(after[0]) == "\u2581"  # the lone "▁" LLaVA keeps


def test_legacy_decides_text_after_special_tokens(tiny_tokenizer_dir, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
    eos = sp.piece_to_id("</s>")
    legacy = open_tokenizer(variant_dir(tiny_tokenizer_dir, True, tmp_path))
    modern = open_tokenizer(variant_dir(tiny_tokenizer_dir, False, tmp_path))
    assert llava_token_ids("a</s>USER: b", legacy) == [1, *sp.encode("a"), eos, *sp.encode("USER: b")]
    modern_ids = llava_token_ids("a</s>USER: b", modern)
    assert modern_ids[:3] == [1, *sp.encode("a"), eos] and modern_ids[3:] != sp.encode("USER: b")


@pytest.mark.parametrize("legacy", [True, False, None])
def test_saved_tokenizer_config_keeps_every_key_and_legacy(legacy, tiny_tokenizer_dir, tmp_path):
    source = variant_dir(tiny_tokenizer_dir, legacy, tmp_path)
    tokenizer = open_tokenizer(source)
    save_tokenizer(tokenizer, tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    original = json.loads((source / "tokenizer_config.json").read_text())
    assert set(original) <= set(written)
    assert written["legacy"] is (legacy is not False)  # a missing key is written as LLaVA reads it: true
    assert written["add_bos_token"] is True and written["add_eos_token"] is False
    assert (tmp_path / "saved" / "tokenizer.model").is_file()
    again = open_tokenizer(tmp_path / "saved")
    for text in ["a</s>USER: b", " What is it?", "USER: <image> x"]:
        assert tokenizer_image_token(text, again) == tokenizer_image_token(text, tokenizer)


def test_saving_over_the_source_folder_keeps_its_keys(tiny_tokenizer_dir, tmp_path):
    source = variant_dir(tiny_tokenizer_dir, None, tmp_path)
    original = json.loads((source / "tokenizer_config.json").read_text())
    save_tokenizer(open_tokenizer(source), source)
    written = json.loads((source / "tokenizer_config.json").read_text())
    assert set(original) <= set(written) and written["legacy"] is True


def test_saved_added_tokens_stay_special(tiny_tokenizer_dir, tmp_path):
    tokenizer = open_tokenizer(variant_dir(tiny_tokenizer_dir, False, tmp_path))
    tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    save_tokenizer(tokenizer, tmp_path / "saved")
    written = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert written["additional_special_tokens"] == [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    contents = {entry["content"]: entry["special"] for entry in written["added_tokens_decoder"].values()}
    assert contents == {"<unk>": True, "<s>": True, "</s>": True, DEFAULT_IM_START_TOKEN: True,
                        DEFAULT_IM_END_TOKEN: True}
    prompt = f"USER: {DEFAULT_IM_START_TOKEN}<image>{DEFAULT_IM_END_TOKEN}\nWhat?"
    assert tokenizer_image_token(prompt, open_tokenizer(tmp_path / "saved")) == tokenizer_image_token(prompt, tokenizer)


def test_tiny_checkpoint_writes_legacy(tiny_llava_dir):
    """make-tiny writes the tokenizer config with its `legacy` (true, see tiny/tokenizer.py) and the model."""
    written = json.loads((tiny_llava_dir / "tokenizer_config.json").read_text())
    assert written["legacy"] is True and written["add_bos_token"] is True
    assert (tiny_llava_dir / "tokenizer.model").is_file()


def test_without_a_sentencepiece_model_the_tokenizer_s_own_ids_are_used(tiny_tokenizer_dir, tmp_path):
    """A tokenizer.json-only folder (e.g. the bundled demo model) cannot be run by LLaVA's slow tokenizer:
    its ids stay the fast tokenizer's."""
    open_tokenizer(variant_dir(tiny_tokenizer_dir, False, tmp_path)).save_pretrained(tmp_path / "json_only")
    assert not (tmp_path / "json_only" / "tokenizer.model").exists()
    tokenizer = open_tokenizer(tmp_path / "json_only")
    for text in PLAIN_TEXTS:
        assert llava_token_ids(text, tokenizer) == tokenizer(text).input_ids
