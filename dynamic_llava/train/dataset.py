"""LLaVA's supervised data module: the JSON data file -> samples -> padded batches."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dynamic_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_SUBSET_KEY
from dynamic_llava.errors import UserError
from dynamic_llava.mm_utils import load_image, process_images
from dynamic_llava.train.preprocess import (
    PromptFormat,
    fit_to_length,
    parse_turns,
    preprocess,
)

DEFAULT_IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches


@dataclass
class DataArguments:
    """Data flags with LLaVA's names and defaults (each field is a `--flag` through HfArgumentParser)."""

    data_path: str = field(metadata={"help": "LLaVA training data: a JSON list (or JSONL) of "
                                             "{'id', 'image'?, 'conversations'}"})
    lazy_preprocess: bool = field(default=False, metadata={"help": "accepted for LLaVA's scripts; "
                                                                   "samples are always preprocessed lazily"})
    is_multimodal: bool = field(default=False, metadata={"help": "the model has a vision tower (set by the "
                                                                 "trainer); image samples need it"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the samples' 'image' paths are "
                                                                     "relative to"})
    image_aspect_ratio: str = field(default="square", metadata={"help": "square (CLIP resize + centre crop) or pad "
                                                                        "(pad to a square first, LLaVA-1.5)"})
    requires_image: bool = field(default=False, metadata={"help": "train on the samples with an image only "
                                                                  "(Dynamic-LLaVA)"})
    on_bad_image: str = field(default="stop", metadata={"help": "an unreadable image file: stop (error) or skip "
                                                                "(warn and use the next sample)"})
    image_token_subsets: bool = field(default=False, metadata={
        "help": "dense training on given image tokens: a sample's 'image_token_subset' (for one image a list of "
                "token indices, row-major over its patches; for several, one list or null per image) names the "
                "image tokens the LLM sees, the others are removed before its first layer; samples without one "
                "see every token"})


def check_data_args(data_args: DataArguments) -> None:
    """Fail early, with one clear UserError, on data settings that cannot work (no heavy work here).

    The data file is only parsed when no image folder is given, to refuse a dataset with images.
    """
    path = Path(data_args.data_path)
    if not path.is_file():
        raise UserError(f"--data_path: no such file: {path}")
    if path.suffix not in (".json", ".jsonl"):
        raise UserError(f"--data_path must be a .json or .jsonl file, got {path}")
    if data_args.image_folder is not None and not Path(data_args.image_folder).is_dir():
        raise UserError(f"--image_folder: no such folder: {data_args.image_folder}")
    if data_args.image_aspect_ratio not in ("square", "pad"):
        raise UserError(f"--image_aspect_ratio must be square or pad, got {data_args.image_aspect_ratio!r}")
    if data_args.on_bad_image not in ("stop", "skip"):
        raise UserError(f"--on_bad_image must be stop or skip, got {data_args.on_bad_image!r}")
    if data_args.image_folder is None:
        with_image = next((r for r in read_records(path) if _image_names(r)), None)
        if with_image is not None:
            raise UserError(f"{path} has samples with images (e.g. id {with_image.get('id')!r}) "
                            "but no --image_folder was given")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The samples of a LLaVA JSON list or a JSONL file (one sample per line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if path.suffix == ".jsonl":
        records = [_parse(line, f"{path}:{number}") for number, line in enumerate(text.splitlines(), 1)
                   if line.strip()]
    else:
        records = _parse(text, str(path))
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise UserError(f"{path}: expected a list of samples ({{'id', 'image'?, 'conversations'}})")
    return records


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: invalid JSON ({err})") from None


def _image_token_subsets(record: dict[str, Any], num_images: int, sample_id: str) -> list[list[int] | None] | None:
    """The record's `image_token_subset` as one entry per image (None: every token), or None without one."""
    subset = record.get(IMAGE_TOKEN_SUBSET_KEY)
    if subset is None:
        return None
    is_indices = lambda x: isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in x)
    per_image = [subset] if num_images == 1 and is_indices(subset) else subset
    if not (isinstance(per_image, list) and len(per_image) == num_images
            and all(x is None or is_indices(x) for x in per_image)):
        raise UserError(f"sample {sample_id}: {IMAGE_TOKEN_SUBSET_KEY!r} must hold, per image ({num_images}), "
                        "a list of token indices >= 0 or null (one image: the list itself)")
    return per_image


def _image_names(record: dict[str, Any]) -> list[str]:
    """The sample's image file names: its 'image' entry is absent, one name, or a list of names."""
    image = record.get("image")
    if image is None:
        return []
    names = [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise UserError(f"sample {record.get('id')!r}: 'image' must be a file name or a list of file names")
    return names


class LazySupervisedDataset(Dataset):
    """LLaVA training samples, tokenised and image-processed when accessed.

    Each item is `dict(input_ids=LongTensor[T], labels=LongTensor[T], images=FloatTensor[n, 3, H, W] or
    None)`, cut to `model_max_length` tokens (an image placeholder counts as one token), with
    `image_token_subsets` (per image of the record, token indices or None; None without a subset) under
    `--image_token_subsets`. Conversations (and subsets) are validated when the dataset is built, so
    malformed data fails before training starts.
    """

    def __init__(self, tokenizer: Any, data_args: DataArguments, image_processor: Any, prompt_format: PromptFormat,
                 model_max_length: int, image_tokens: int = DEFAULT_IMAGE_TOKENS) -> None:
        self.tokenizer = tokenizer
        self.data_args = data_args
        self.image_processor = image_processor
        self.prompt_format = prompt_format
        self.model_max_length = model_max_length
        records = read_records(Path(data_args.data_path))
        ids = [str(r.get("id", i)) for i, r in enumerate(records)]
        keep = []
        for i, (record, sample_id) in enumerate(zip(records, ids)):
            num_images = len(_image_names(record))
            parse_turns(record.get("conversations"), num_images, prompt_format.mm_use_im_start_end, sample_id)
            if data_args.image_token_subsets:
                _image_token_subsets(record, num_images, sample_id)
            if num_images:
                self._check_image_support(sample_id)
            if num_images or not data_args.requires_image:
                keep.append(i)
        if not keep:
            kind = "samples with an image (--requires_image)" if data_args.requires_image else "samples"
            raise UserError(f"{data_args.data_path}: no {kind}")
        # One entry per kept sample: indices 0..len-1 map to distinct samples, each seen once per epoch.
        self.records = [records[i] for i in keep]
        self.sample_ids = [ids[i] for i in keep]
        self.image_tokens = image_tokens

    def _check_image_support(self, sample_id: str) -> None:
        missing = [what for what, ok in (
            ("a vision tower (DataArguments.is_multimodal is False)", self.data_args.is_multimodal),
            ("an --image_folder", self.data_args.image_folder is not None),
            ("an image processor", self.image_processor is not None),
        ) if not ok]
        if missing:
            raise UserError(f"sample {sample_id} has an image, but there is no {missing[0]}")

    def __len__(self) -> int:
        return len(self.records)

    @cached_property
    def _lengths(self) -> list[int]:
        # Computed on first use only: counting words takes seconds on LLaVA-1.5's 665k samples.
        return [sum(len(turn["value"].split()) for turn in r["conversations"])
                + len(_image_names(r)) * self.image_tokens for r in self.records]

    @property
    def lengths(self) -> list[int]:
        """Rough token count per sample (words, plus the image tokens of each image)."""
        return list(self._lengths)

    @property
    def modality_lengths(self) -> list[int]:
        """`lengths`, negated for text-only samples (never 0, so the sign always tells the modality)."""
        return [n if _image_names(r) else -max(n, 1) for n, r in zip(self._lengths, self.records)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        # on_bad_image="skip": the next sample (wrapping around) whose images all load stands in.
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                images = self._images(i)
            except UserError as err:
                if self.data_args.on_bad_image == "stop":
                    raise
                warnings.warn(f"{err}; skipped (on_bad_image=skip), using another sample", stacklevel=2)
                continue
            return self._sample(i, images)
        raise UserError(f"{self.data_args.data_path}: no sample has readable images")

    def _images(self, index: int) -> torch.Tensor | None:
        names = _image_names(self.records[index])
        if not names:
            return None
        try:
            pil = [load_image(Path(self.data_args.image_folder, name)) for name in names]
        except UserError as err:
            raise UserError(f"sample {self.sample_ids[index]}: {err}") from None
        return process_images(pil, self.image_processor, self.data_args.image_aspect_ratio)

    def _sample(self, index: int, images: torch.Tensor | None) -> dict[str, Any]:
        num_images = 0 if images is None else images.shape[0]
        input_ids, labels = preprocess(self.records[index]["conversations"], num_images, self.tokenizer,
                                       self.prompt_format, self.sample_ids[index])
        input_ids, labels, images = fit_to_length(input_ids, labels, images, self.model_max_length)
        sample: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "images": images}
        if self.data_args.image_token_subsets:
            sample["image_token_subsets"] = _image_token_subsets(self.records[index], num_images, self.sample_ids[index])
        return sample


@dataclass
class DataCollatorForSupervisedDataset:
    """Samples -> a right-padded batch.

    `dict(input_ids=[B, T] padded with the pad id (unk when the tokenizer has none, LLaVA's choice),
    labels=[B, T] padded with IGNORE_INDEX, attention_mask=[B, T] bool, images=list of B entries
    ([n_i, 3, H, W] or None) or None when no sample has an image)`. IMAGE_TOKEN_INDEX stays in
    `input_ids`: the model expands it. With `model_max_length`, longer samples are cut as the dataset does.
    Samples read with `--image_token_subsets` add `image_token_subsets` (per sample: None, or per image kept
    by the cut, its token indices or None) when one of them has a subset.
    """

    tokenizer: Any
    model_max_length: int | None = None

    def __post_init__(self) -> None:
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.unk_token_id
        if self.pad_token_id is None:
            raise UserError("the tokenizer has neither a pad nor an unk token to pad batches with")

    def __call__(self, instances: list[dict[str, Any]]) -> dict[str, Any]:
        samples = [(x["input_ids"], x["labels"], x.get("images")) for x in instances]
        if self.model_max_length is not None:
            samples = [fit_to_length(*s, self.model_max_length) for s in samples]
        width = max(len(ids) for ids, _, _ in samples)
        input_ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), width), dtype=torch.bool)
        for row, (ids, lab, _) in enumerate(samples):
            input_ids[row, :len(ids)] = ids
            labels[row, :len(lab)] = lab
            attention_mask[row, :len(ids)] = True
        images = [img for _, _, img in samples]
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "images": images if any(img is not None for img in images) else None}
        subsets = [x.get("image_token_subsets") for x in instances]
        if any(subset is not None for subset in subsets):
            batch["image_token_subsets"] = [None if subset is None else subset[:0 if img is None else img.shape[0]]
                                            for subset, img in zip(subsets, images)]
        return batch


def make_supervised_data_module(tokenizer: Any, data_args: DataArguments, image_processor: Any, conv_version: str,
                                model_max_length: int, mm_use_im_start_end: bool = False,
                                image_tokens: int = DEFAULT_IMAGE_TOKENS) -> dict[str, Any]:
    """What LLaVA's trainer takes: `dict(train_dataset=..., eval_dataset=None, data_collator=...)`."""
    check_data_args(data_args)
    prompt_format = PromptFormat(conv_version, mm_use_im_start_end)
    dataset = LazySupervisedDataset(tokenizer, data_args, image_processor, prompt_format, model_max_length,
                                    image_tokens)
    return {"train_dataset": dataset, "eval_dataset": None,
            "data_collator": DataCollatorForSupervisedDataset(tokenizer, model_max_length)}
