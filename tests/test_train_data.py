"""The supervised training data pipeline: labels, image placeholders, dataset, collator, sampler."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import HfArgumentParser

import dynamic_llava.train.preprocess as preprocess_module
from dynamic_llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from dynamic_llava.conversation import get_conv_template
from dynamic_llava.errors import UserError
from dynamic_llava.mm_utils import process_images, tokenizer_image_token
from dynamic_llava.model.checkpoint_files import load_image_processor, open_tokenizer
from dynamic_llava.train.dataset import (
    DataArguments,
    DataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    check_data_args,
    make_supervised_data_module,
)
from dynamic_llava.train.preprocess import PromptFormat, preprocess
from dynamic_llava.train.sampler import (
    ModalityLengthGroupedSampler,
    modality_grouped_indices,
)
from dynamic_llava.train.trainer import DynamicLlavaTrainer

QUESTIONS = ["What is in the picture?", "How many cats are there?", "Why is the sky blue?"]
ANSWERS = ["A red cat sits on the table.", "There are 3 cats, and 12 dogs!", "Because of (Rayleigh) scattering."]
# What each template puts after a reply; it must be supervised with the reply.
END_OF_TURN = {"v0": "###", "llava_v0": "###", "v1": "</s>", "llava_v1": "</s>", "llama_2": " </s>",
               "llava_llama_2": " </s>"}


@pytest.fixture(scope="module")
def tokenizer(tiny_llava_dir: Path):
    return open_tokenizer(tiny_llava_dir)


@pytest.fixture(scope="module")
def modern_tokenizer(tiny_llava_dir: Path, tmp_path_factory):
    """The tiny tokenizer with `legacy: false` (llava-v1.5-7b's setting; the tiny checkpoint's is true)."""
    folder = tmp_path_factory.mktemp("modern_tokenizer")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_llava_dir / name).read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    return open_tokenizer(folder)


@pytest.fixture(scope="module")
def image_processor(tiny_llava_dir: Path):
    return load_image_processor(tiny_llava_dir / "vision_tower")


def conversation(turns: int, first_question: str = "<image>\n" + QUESTIONS[0]) -> list[dict[str, str]]:
    questions = [first_question, *QUESTIONS[1:]]
    out = []
    for q, a in list(zip(questions, ANSWERS))[:turns]:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


def supervised_runs(labels: torch.Tensor) -> list[list[int]]:
    """The contiguous runs of supervised label ids."""
    runs, current = [], []
    for label in labels.tolist():
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def inference_prompt(version: str, turns: list[dict[str, str]], open_last: bool = False) -> str:
    """The prompt inference renders for these turns (optionally with the last reply left open)."""
    conv = get_conv_template(version)
    for i, turn in enumerate(turns):
        last = i == len(turns) - 1
        conv.append_message(conv.roles[turn["from"] == "gpt"], None if open_last and last else turn["value"])
    return conv.get_prompt()


def save_image(path: Path, size: tuple[int, int] = (48, 32), color: tuple[int, int, int] = (200, 30, 60)) -> str:
    Image.new("RGB", size, color).save(path)
    return path.name


def write_json(path: Path, records: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def image_record(sample_id: str, image: str | list[str], answer: str) -> dict:
    return {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": answer}]}


def text_record(sample_id: str, answer: str) -> dict:
    return {"id": sample_id, "conversations": [{"from": "human", "value": "Say something."},
                                               {"from": "gpt", "value": answer}]}


def make_dataset(tokenizer, image_processor, data_path: Path, image_folder: Path | None, version: str = "v1",
                 model_max_length: int = 2048, **data_kwargs) -> LazySupervisedDataset:
    args = DataArguments(data_path=str(data_path), is_multimodal=True,
                         image_folder=str(image_folder) if image_folder else None, **data_kwargs)
    return LazySupervisedDataset(tokenizer, args, image_processor, PromptFormat(version), model_max_length)


# ----------------------------------------------------------------------------- labels per template
@pytest.mark.parametrize("version", sorted(END_OF_TURN))
def test_multi_turn_labels_are_exactly_the_replies(tokenizer, version):
    turns = conversation(3)
    input_ids, labels = preprocess(turns, 1, tokenizer, PromptFormat(version), "s0")

    assert input_ids.shape == labels.shape and input_ids.dtype == labels.dtype == torch.long
    assert input_ids.tolist() == tokenizer_image_token(inference_prompt(version, turns), tokenizer)
    assert [tokenizer.decode(run) for run in supervised_runs(labels)] == [a + END_OF_TURN[version] for a in ANSWERS]
    supervised = labels != IGNORE_INDEX
    assert torch.equal(labels[supervised], input_ids[supervised])
    # The last reply's labels start exactly where inference starts generating for that prompt.
    prompt_ids = tokenizer_image_token(inference_prompt(version, turns, open_last=True), tokenizer)
    assert input_ids[:len(prompt_ids)].tolist() == prompt_ids
    assert labels[len(prompt_ids) - 1] == IGNORE_INDEX and labels[len(prompt_ids)] != IGNORE_INDEX


def test_a_separator_inside_a_reply_masks_the_sample_as_llava_does(tokenizer):
    """LLaVA cuts v1 rounds at "</s>": one inside a reply makes its count miss, and the sample is masked."""
    turns = conversation(2)
    turns[1]["value"] = "It ends with </s> inside."
    with pytest.warns(UserWarning, match="sample s0: .*tokenization mismatch"):
        input_ids, labels = preprocess(turns, 1, tokenizer, PromptFormat("v1"), "s0")
    assert (labels == IGNORE_INDEX).all() and len(labels) == len(input_ids)


@pytest.mark.parametrize("version", ["llama_2", "v1"])
def test_legacy_false_keeps_llava_s_labels_where_its_count_fits(modern_tokenizer, version):
    """Under `legacy: false` LLaVA shifts v1's later rounds by one token, which this tiny vocabulary does
    not fit: LLaVA masks such samples, and so does preprocess; LLaMA-2 rounds are not shifted."""
    if version == "v1":
        with pytest.warns(UserWarning, match="sample s0: .*tokenization mismatch"):
            _, labels = preprocess(conversation(2), 1, modern_tokenizer, PromptFormat(version), "s0")
        assert (labels == IGNORE_INDEX).all()
    else:
        _, labels = preprocess(conversation(2), 1, modern_tokenizer, PromptFormat(version), "s0")
        decoded = [modern_tokenizer.decode(run) for run in supervised_runs(labels)]
        assert decoded == [a + END_OF_TURN[version] for a in ANSWERS[:2]]
    _, labels = preprocess(conversation(1), 1, modern_tokenizer, PromptFormat(version), "s1")  # one round
    assert [modern_tokenizer.decode(run) for run in supervised_runs(labels)] == [ANSWERS[0] + END_OF_TURN[version]]


def test_a_tokenizer_json_alone_read_as_non_legacy_is_named_as_the_cause(modern_tokenizer, tiny_llava_dir,
                                                                          tmp_path):
    """Without tokenizer.model, transformers reads tokenizer.json as legacy=False and every multi-turn v1
    sample mismatches: the warning says so and what to add (the first bundled demo model had this)."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_llava_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    json_only = open_tokenizer(tmp_path)
    with pytest.warns(UserWarning, match="s0: .*mismatch.*no tokenizer.model and reads as legacy=False"):
        preprocess(conversation(2), 1, json_only, PromptFormat("v1"), "s0")
    with pytest.warns(UserWarning, match="mismatch") as record:  # with tokenizer.model: LLaVA's own mismatch
        preprocess(conversation(2), 1, modern_tokenizer, PromptFormat("v1"), "s1")
    assert "tokenizer.model" not in str(record[0].message)


@pytest.mark.parametrize("version", ["mpt", "chatml_direct"])
def test_chatml_templates_mask_everything_with_a_llama_tokenizer(tokenizer, version):
    """LLaVA's preprocess_mpt counts rounds for a tokenizer without BOS; with LLaMA's it never fits."""
    with pytest.warns(UserWarning, match="tokenization mismatch"):
        input_ids, labels = preprocess(conversation(2), 1, tokenizer, PromptFormat(version), "s0")
    assert input_ids.tolist() == tokenizer_image_token(inference_prompt(version, conversation(2)), tokenizer)
    assert (labels == IGNORE_INDEX).all()


def test_plain_supervises_caption_and_newline_only(tokenizer):
    turns = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": ANSWERS[0]}]
    input_ids, labels = preprocess(turns, 1, tokenizer, PromptFormat("plain"), "s0")

    assert input_ids.tolist() == tokenizer_image_token("<image>" + ANSWERS[0] + "\n", tokenizer)
    assert input_ids[:2].tolist() == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    assert labels[:2].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert [tokenizer.decode(run) for run in supervised_runs(labels)] == [ANSWERS[0] + "\n"]


def test_image_inside_the_first_turn_moves_to_its_front(tokenizer):
    turns = conversation(2, first_question="What is in <image> the picture?")
    input_ids, labels = preprocess(turns, 1, tokenizer, PromptFormat("v1"), "s0")

    moved = conversation(2, first_question="<image>\nWhat is in  the picture?")  # LLaVA strips, no re-spacing
    assert input_ids.tolist() == tokenizer_image_token(inference_prompt("v1", moved), tokenizer)
    (position,) = (input_ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    assert tokenizer.decode(input_ids[1:position]).rstrip() == get_conv_template("v1").system + " USER:"
    assert [tokenizer.decode(run) for run in supervised_runs(labels)] == [a + "</s>" for a in ANSWERS[:2]]


def test_several_images_and_im_start_end_markup(tiny_llava_dir):
    tokenizer = open_tokenizer(tiny_llava_dir)  # a private copy: tokens are added to it
    tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
    start, end = tokenizer.convert_tokens_to_ids([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN])
    turns = conversation(1, first_question="Compare <image> and <image>.")
    input_ids, labels = preprocess(turns, 2, tokenizer, PromptFormat("v1", mm_use_im_start_end=True), "s0")

    markup = f"{DEFAULT_IM_START_TOKEN}<image>{DEFAULT_IM_END_TOKEN}\n"
    expected = inference_prompt("v1", conversation(1, first_question=markup * 2 + "Compare  and ."))
    assert input_ids.tolist() == tokenizer_image_token(expected, tokenizer)
    positions = (input_ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
    assert len(positions) == 2
    for p in positions:
        assert input_ids[p - 1] == start and input_ids[p + 1] == end
    assert [tokenizer.decode(run) for run in supervised_runs(labels)] == [ANSWERS[0] + "</s>"]


def test_placeholder_count_must_match_the_images(tokenizer):
    with pytest.raises(UserError, match="sample s7: 2 <image> placeholder"):
        preprocess(conversation(1, "<image> and <image>"), 1, tokenizer, PromptFormat("v1"), "s7")
    # No placeholder at all: LLaVA-1.5's layout, the image goes in front of the first question.
    input_ids, _ = preprocess(conversation(1, QUESTIONS[0]), 1, tokenizer, PromptFormat("v1"), "s7")
    assert input_ids.tolist() == tokenizer_image_token(inference_prompt("v1", conversation(1)), tokenizer)


def test_misaligned_answer_boundary_masks_the_sample_and_warns(tokenizer, monkeypatch):
    """v0 (not counted the LLaVA way, see preprocess) supervises from the prompt's own token counts."""
    render = preprocess_module.render

    def shifted(*args):
        prompt, spans = render(*args)
        return prompt, [(a + 1, b) for a, b in spans]  # starts inside the first reply token ("▁A")

    monkeypatch.setattr(preprocess_module, "render", shifted)
    with pytest.warns(UserWarning, match="sample bad-7"):
        input_ids, labels = preprocess(conversation(1), 1, tokenizer, PromptFormat("v0"), "bad-7")
    assert len(labels) == len(input_ids) and (labels == IGNORE_INDEX).all()


# ----------------------------------------------------------------------------- dataset
def test_requires_image_indexes_every_image_sample_once(tokenizer, image_processor, tmp_path):
    records = []
    for k in range(8):
        if k % 3 == 1:
            records.append(text_record(f"t{k}", f"Text answer {k}."))
        else:
            records.append(image_record(f"i{k}", save_image(tmp_path / f"{k}.png"), f"Image answer {k}."))
    data = write_json(tmp_path / "data.json", records)
    image_answers = {f"Image answer {k}.</s>" for k in range(8) if k % 3 != 1}

    dataset = make_dataset(tokenizer, image_processor, data, tmp_path, requires_image=True)
    assert len(dataset) == len(image_answers) == 5
    sampler = ModalityLengthGroupedSampler(2, 1, dataset.modality_lengths, torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=DataCollatorForSupervisedDataset(tokenizer))
    seen = []
    for batch in loader:
        assert all(img is not None and img.shape[0] == 1 for img in batch["images"])
        seen += [tokenizer.decode(run) for labels in batch["labels"] for run in supervised_runs(labels)]
    assert sorted(seen) == sorted(image_answers)

    everything = make_dataset(tokenizer, image_processor, data, tmp_path)
    assert len(everything) == 8
    assert [n > 0 for n in everything.modality_lengths] == [k % 3 != 1 for k in range(8)]
    assert [n >= 576 for n in everything.lengths] == [k % 3 != 1 for k in range(8)]


def test_text_and_image_samples_collate_together(tokenizer, image_processor, tmp_path):
    records = [text_record("t", "Only text here."),
               image_record("one", save_image(tmp_path / "wide.png", size=(60, 20)), "One image."),
               image_record("two", [save_image(tmp_path / "a.png"), save_image(tmp_path / "b.png", color=(0, 9, 9))],
                            "Two images.")]
    records[2]["conversations"][0]["value"] = "<image>\n<image>\nDescribe both."
    data = write_json(tmp_path / "data.jsonl", records)
    dataset = make_dataset(tokenizer, image_processor, data, tmp_path, image_aspect_ratio="pad")
    items = [dataset[i] for i in range(3)]
    batch = DataCollatorForSupervisedDataset(tokenizer)(items)

    lengths = [len(x["input_ids"]) for x in items]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, (item, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == tokenizer.unk_token_id).all()  # pad = unk, LLaVA's choice
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert [(ids == IMAGE_TOKEN_INDEX).sum().item() for ids in batch["input_ids"]] == [0, 1, 2]
    assert batch["images"][0] is None
    assert [tuple(img.shape) for img in batch["images"][1:]] == [(1, 3, 336, 336), (2, 3, 336, 336)]
    padded = process_images([Image.open(tmp_path / "wide.png").convert("RGB")], image_processor, "pad")
    assert torch.equal(batch["images"][1], padded)

    assert DataCollatorForSupervisedDataset(tokenizer)([items[0], items[0]])["images"] is None


def test_image_token_subsets_reach_the_batch_per_sample_and_image(tokenizer, image_processor, tmp_path):
    one = image_record("one", save_image(tmp_path / "a.png"), "One image.")
    one["image_token_subset"] = [3, 1, 4]  # one image: the list itself
    two = image_record("two", [save_image(tmp_path / "b.png"), save_image(tmp_path / "c.png")], "Two.")
    two["conversations"][0]["value"] = "<image>\n<image>\nDescribe both."
    two["image_token_subset"] = [None, [0, 2]]
    plain = image_record("plain", "a.png", "No subset.")
    records = [one, two, plain, text_record("t", "Text.")]
    data = write_json(tmp_path / "data.json", records)
    dataset = make_dataset(tokenizer, image_processor, data, tmp_path, image_token_subsets=True)
    batch = DataCollatorForSupervisedDataset(tokenizer)([dataset[i] for i in range(4)])
    assert batch["image_token_subsets"] == [[[3, 1, 4]], [None, [0, 2]], None, None]
    # a cut that drops the second image drops its subset with it
    second_image = int((dataset[1]["input_ids"] == IMAGE_TOKEN_INDEX).nonzero()[1])
    cut = DataCollatorForSupervisedDataset(tokenizer, model_max_length=second_image)([dataset[1]])
    assert cut["images"][0].shape[0] == 1 and cut["image_token_subsets"] == [[None]]
    # without the flag the key is an unknown field, as for LLaVA's own loader
    ignoring = make_dataset(tokenizer, image_processor, data, tmp_path)
    assert "image_token_subsets" not in DataCollatorForSupervisedDataset(tokenizer)([ignoring[0], ignoring[1]])


@pytest.mark.parametrize("subset", [[1, -2], [[0], [1]], "all", [1.5], [True]])
def test_malformed_image_token_subsets_fail_when_the_dataset_is_built(tokenizer, image_processor, tmp_path, subset):
    record = image_record("odd", save_image(tmp_path / "a.png"), "One image.")
    record["image_token_subset"] = subset
    data = write_json(tmp_path / "data.json", [record])
    with pytest.raises(UserError, match="sample odd: 'image_token_subset' must hold, per image"):
        make_dataset(tokenizer, image_processor, data, tmp_path, image_token_subsets=True)


def test_truncation_that_cuts_the_answer_leaves_no_labels(tokenizer, image_processor, tmp_path):
    long_question = "Please describe " + "the red cat and the blue dog " * 20 + "?"
    record = image_record("long", save_image(tmp_path / "x.png"), "A cat.")
    record["conversations"][0]["value"] = "<image>\n" + long_question
    data = write_json(tmp_path / "data.json", [record])

    full = make_dataset(tokenizer, image_processor, data, tmp_path)[0]
    cut = make_dataset(tokenizer, image_processor, data, tmp_path, model_max_length=100)[0]
    assert len(full["input_ids"]) > 100 and (full["labels"] != IGNORE_INDEX).any()
    assert len(cut["input_ids"]) == len(cut["labels"]) == 100
    assert torch.equal(cut["input_ids"], full["input_ids"][:100])
    assert (cut["labels"] == IGNORE_INDEX).all()
    assert cut["images"].shape[0] == 1

    # Cut before the image placeholder: the image goes too, so placeholders and images stay paired.
    tiny = make_dataset(tokenizer, image_processor, data, tmp_path, model_max_length=5)[0]
    assert IMAGE_TOKEN_INDEX not in tiny["input_ids"].tolist() and tiny["images"] is None


def test_unreadable_image_stops_or_skips(tokenizer, image_processor, tmp_path):
    records = [image_record("good0", save_image(tmp_path / "good0.png"), "First."),
               image_record("broken", "broken.png", "Never seen."),
               image_record("good2", save_image(tmp_path / "good2.png", color=(1, 2, 3)), "Third.")]
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    data = write_json(tmp_path / "data.json", records)
    broken = re.escape(str(tmp_path / "broken.png"))

    with pytest.raises(UserError, match=broken):
        make_dataset(tokenizer, image_processor, data, tmp_path)[1]

    skipping = make_dataset(tokenizer, image_processor, data, tmp_path, on_bad_image="skip")
    with pytest.warns(UserWarning, match=broken):
        stand_in = skipping[1]
    assert torch.equal(stand_in["input_ids"], skipping[2]["input_ids"])
    assert torch.equal(stand_in["images"], skipping[2]["images"])

    (tmp_path / "good2.png").unlink()  # the last sample wraps around to the first
    with pytest.warns(UserWarning, match=re.escape(str(tmp_path / "good2.png"))):
        assert torch.equal(skipping[2]["images"], skipping[0]["images"])


def test_malformed_conversation_fails_when_the_dataset_is_built(tokenizer, image_processor, tmp_path):
    record = text_record("odd-one", "Fine.")
    record["conversations"].append({"from": "gpt", "value": "Twice in a row."})
    data = write_json(tmp_path / "data.json", [text_record("ok", "Fine."), record])
    with pytest.raises(UserError, match="sample odd-one: turns must alternate"):
        make_dataset(tokenizer, image_processor, data, None)


def test_check_data_args_reports_missing_paths(tmp_path):
    data = write_json(tmp_path / "data.json", [text_record("t", "Hi."), image_record("i", "x.png", "Hi.")])
    check_data_args(DataArguments(data_path=str(data), image_folder=str(tmp_path)))
    with pytest.raises(UserError, match="no such file: .*nope.json"):
        check_data_args(DataArguments(data_path=str(tmp_path / "nope.json"), image_folder=str(tmp_path)))
    with pytest.raises(UserError, match="no such folder: .*missing_images"):
        check_data_args(DataArguments(data_path=str(data), image_folder=str(tmp_path / "missing_images")))
    with pytest.raises(UserError, match="e.g. id 'i'.*no --image_folder"):
        check_data_args(DataArguments(data_path=str(data)))
    with pytest.raises(UserError, match="--on_bad_image"):
        check_data_args(DataArguments(data_path=str(data), image_folder=str(tmp_path), on_bad_image="ignore"))


def test_data_arguments_are_command_line_flags(tokenizer, image_processor, tmp_path):
    data = write_json(tmp_path / "data.json", [text_record("t", "Hi.")])
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--data_path", str(data), "--image_folder", str(tmp_path), "--requires_image", "True",
         "--image_aspect_ratio", "pad", "--on_bad_image", "skip", "--lazy_preprocess", "True"])
    assert (args.data_path, args.image_folder, args.requires_image) == (str(data), str(tmp_path), True)
    assert (args.image_aspect_ratio, args.on_bad_image, args.is_multimodal) == ("pad", "skip", False)
    module = make_supervised_data_module(tokenizer, DataArguments(data_path=str(data)), None, conv_version="v1",
                                         model_max_length=64)
    assert module["eval_dataset"] is None and len(module["train_dataset"]) == 1
    batch = module["data_collator"]([module["train_dataset"][0]])
    assert batch["images"] is None and batch["input_ids"].shape[1] <= 64


# ----------------------------------------------------------------------------- sampler
def test_modality_sampler_is_a_deterministic_grouped_permutation():
    g = torch.Generator().manual_seed(123)
    lengths = [int(n) * (1 if img else -1) for n, img in
               zip(torch.randint(1, 1000, (103,), generator=g), torch.rand(103, generator=g) < 0.6)]
    batch_size, world_size = 4, 2
    megabatch = batch_size * world_size

    def order(seed: int) -> list[int]:
        return list(ModalityLengthGroupedSampler(batch_size, world_size, lengths, torch.Generator().manual_seed(seed)))

    first = order(0)
    assert sorted(first) == list(range(len(lengths)))
    assert first == order(0) and first != order(1)
    sampler = ModalityLengthGroupedSampler(batch_size, world_size, lengths, torch.Generator().manual_seed(0))
    assert list(sampler) == first and sorted(sampler) == list(range(len(lengths)))  # next epoch: reshuffled

    n_image = sum(n > 0 for n in lengths)
    n_full = (n_image // megabatch + (len(lengths) - n_image) // megabatch) * megabatch
    for k in range(0, n_full, megabatch):
        chunk = [lengths[i] for i in first[k:k + megabatch]]
        assert all(n > 0 for n in chunk) or all(n < 0 for n in chunk)
        for rank in range(world_size):  # each rank's batch: longest first
            batch = [abs(n) for n in chunk[rank * batch_size:(rank + 1) * batch_size]]
            assert batch == sorted(batch, reverse=True)
    tail = [lengths[i] > 0 for i in first[n_full:]]
    assert tail == sorted(tail, reverse=True)  # leftover image samples, then leftover text-only ones
    assert sorted(ModalityLengthGroupedSampler(3, 1, lengths)) == list(range(len(lengths)))  # no generator


def test_group_by_length_sorts_megabatches_from_the_dataset_lengths():
    """`--train_sampling_strategy group_by_length` takes the dataset's lengths (transformers would load
    every sample to measure it) and cuts padding against a random order."""
    g = torch.Generator().manual_seed(7)
    lengths = [int(n) * (1 if img else -1) for n, img in
               zip(torch.randint(1, 1000, (400,), generator=g), torch.rand(400, generator=g) < 0.7)]

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(lengths)

        def __getitem__(self, index: int) -> None:
            raise AssertionError("the sampler must not load samples")

    def padding(order: list[int], batch_size: int = 4) -> int:
        batches = [[abs(lengths[i]) for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    def sampler(strategy: str, seed: int = 0) -> torch.utils.data.Sampler:
        args = SimpleNamespace(group_by_modality_length=False, sort_micro_batches_by_length=False,
                               train_sampling_strategy=strategy, seed=seed,
                               train_batch_size=4, gradient_accumulation_steps=1)
        return DynamicLlavaTrainer._get_train_sampler(SimpleNamespace(args=args, modality_lengths=lengths),
                                                      Unreadable())

    grouped = list(sampler("group_by_length"))
    assert sorted(grouped) == list(range(len(lengths)))
    assert grouped == list(sampler("group_by_length")) and grouped != list(sampler("group_by_length", seed=1))
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    assert padding(grouped) < padding(shuffled) / 10


def test_sorted_micro_batches_keep_random_steps_and_pad_less():
    """`--sort_micro_batches_by_length`: each optimiser step (micro-batch x accumulation) is a random draw
    of samples, longest first; its micro-batches pad less than in a random order."""
    g = torch.Generator().manual_seed(3)
    lengths = [int(n) for n in torch.randint(1, 1000, (400,), generator=g)]

    def order(seed: int = 0) -> list[int]:
        args = SimpleNamespace(group_by_modality_length=False, sort_micro_batches_by_length=True, seed=seed,
                               train_batch_size=2, gradient_accumulation_steps=4, world_size=1)
        return list(DynamicLlavaTrainer._get_train_sampler(SimpleNamespace(args=args, modality_lengths=lengths)))

    def padding(indices: list[int]) -> int:
        batches = [[lengths[i] for i in indices[k:k + 2]] for k in range(0, len(indices), 2)]
        return sum(max(b) * len(b) - sum(b) for b in batches)

    first = order()
    assert sorted(first) == list(range(len(lengths)))
    assert first == order() and first != order(seed=1)
    assert first[0] == max(range(len(lengths)), key=lengths.__getitem__)  # the longest step comes first
    steps = [first[k:k + 8] for k in range(0, len(first), 8)]
    unsorted = [step for step in steps if [lengths[i] for i in step] != sorted((lengths[i] for i in step), reverse=True)]
    assert len(unsorted) <= 1  # only the step that gave its longest sample to the first one
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    # same steps as the shuffle they come from (bar the one swapped sample): only the order inside changes
    assert sum(set(a) != set(shuffled[k:k + 8]) for k, a in zip(range(0, 400, 8), steps)) <= 2
    assert padding(first) < padding(shuffled) / 2


def test_modality_sampler_balances_ranks_and_rejects_zero_length():
    lengths = [100, 90, 80, 70, 10, 9, 8, 7]
    order = modality_grouped_indices(lengths, 4, 2, torch.Generator().manual_seed(0))
    totals = [sum(lengths[i] for i in order[:4]), sum(lengths[i] for i in order[4:])]
    assert abs(totals[0] - totals[1]) <= 20  # longest-first dealing, not [100, 90, 80, 70] on one rank
    with pytest.raises(ValueError, match="non-zero"):
        modality_grouped_indices([5, 0, -3], 1, 1, torch.Generator())
