"""`dynamic-llava data synth --out DIR`: the synthetic shapes benchmark (v2), as training data and evaluation files.

Scenes, questions and texts: `scenes.py`, `questions.py`, `descriptions.py` (small coloured targets and grey
distractors, one per patch of the tower's 8 x 8 grid at 112 px; questions about the targets only).

Layout under DIR (image paths in every file are relative to DIR/images):
- images/{train,val,test}/NNNNNN.png; {split}/scenes.jsonl: the scene specs the answers come from
- train/pretrain.json: LLaVA `plain` pre-training pairs (human "<image>", gpt a short caption)
- train/instruct.json: LLaVA instruction data, one conversation per scene: a turn per question, or (a
  share of them) every question asked and answered in one turn
- {val,test}/questions.jsonl ({question_id, image, text, category, held_out}) and answers.jsonl
  ({question_id, answer, category, held_out}) for `model_vqa_loader` and `score_synth`; `held_out`: the
  question is about a (colour, shape) pair of `scenes.HELD_OUT_PAIRS`, never a target in training
- {val,test}/pope/questions.jsonl (category = negative kind) and coco_pope_{kind}.json for `eval_pope`
- {val,test}/describe.jsonl ({question_id, image, text, answer}) for `generation_ability`
- stats.json: the held-out pairs, counts per split and type, and the majority-answer baseline per type on test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..constants import IMAGE_TOKEN_SUBSET_KEY
from ..errors import UserError
from .descriptions import DESCRIBE_PROMPTS, caption, description
from .questions import (
    NEGATIVE_KINDS,
    QA,
    SHORT_ANSWER_TYPES,
    majority_answers,
    scene_questions,
)
from .render import render_scene
from .scenes import GRID, HELD_OUT_PAIRS, SPLITS, Scene, sample_scene

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."  # LLaVA-1.5's
ANSWER_ALL_PROMPT = "Ask questions about the image and answer them."


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    seed: int = 0
    image_size: int = 192
    n_train: int = 2000
    n_val: int = 200
    n_test: int = 500
    describe_share: float = 0.5  # share of training conversations that also ask for the long description
    # Share of training conversations in one turn ("Q1? A1. Q2? A2. ..."): each answer right after its
    # question, a layout a small LLM trained from scratch learns look-up from far sooner (RESULTS.md)
    answer_all_share: float = 0.0
    # Share of the training conversations without a description that carry an `image_token_subset`: every
    # target patch (all any of their answers is about) plus a random number of the other patches, for a dense
    # training on token subsets (`train --image_token_subsets`). Descriptions also name the grey shapes.
    token_subset_share: float = 0.0

    def scenes(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]


def _image(scene: Scene) -> str:
    split, index = scene.scene_id.split("_")
    return f"{split}/{index}.png"


def _dump_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _dump_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _short_prompt(question: str) -> str:
    return f"{question}\n{SHORT_ANSWER_SUFFIX}"


def _conversation(scene: Scene, qas: list[QA], rng: random.Random, describe_share: float, answer_all: bool
                  ) -> tuple[list[dict[str, str]], bool]:
    """The short questions in random order, maybe with the description request at a random place; with
    `answer_all`, the questions and their answers in one turn, then maybe the description request.
    Returns the turns and whether the description is among them."""
    order = list(qas)
    rng.shuffle(order)
    turns = ([(ANSWER_ALL_PROMPT, " ".join(f"{qa.question} {qa.answer}." for qa in order))] if answer_all
             else [(_short_prompt(qa.question), qa.answer) for qa in order])
    described = rng.random() < describe_share
    if described:
        place = len(turns) if answer_all else rng.randint(0, len(turns))
        turns.insert(place, (rng.choice(DESCRIBE_PROMPTS), description(scene)))
    out = []
    for i, (question, answer) in enumerate(turns):
        out += [{"from": "human", "value": "<image>\n" + question if i == 0 else question},
                {"from": "gpt", "value": answer}]
    return out, described


def _token_subset(scene: Scene, rng: random.Random) -> list[int]:
    """Row-major patch indices: the scene's target patches plus other patches drawn at random, the total
    log-uniform between the number of targets and every patch (so budgets near 20 % are well covered)."""
    targets = {o.row * GRID + o.col for o in scene.targets}
    others = [i for i in range(GRID * GRID) if i not in targets]
    size = round(math.exp(rng.uniform(math.log(len(targets)), math.log(GRID * GRID))))
    return sorted(targets | set(rng.sample(others, size - len(targets))))


def _scene_record(scene: Scene) -> dict[str, Any]:
    return {"image": _image(scene), **dataclasses.asdict(scene)}


class _Split:
    """One split: its scenes are sampled and their images saved on construction; `write` adds the text files."""

    def __init__(self, config: SynthConfig, split: str, images: Path) -> None:
        self.split = split
        self.scenes: list[Scene] = []
        self.qas: list[tuple[Scene, str, QA]] = []  # (scene, question_id, qa)
        self.conversations: list[dict[str, Any]] = []
        self.described = 0  # training conversations with a description turn
        self.answer_all = 0  # training conversations with every question in one turn
        self.subsets = 0  # training conversations with an image token subset
        for index in tqdm(range(config.scenes(split)), desc=f"{split} scenes", unit="scene"):
            scene = sample_scene(config.seed, split, index)
            self.scenes.append(scene)
            render_scene(scene, config.image_size).save(images / _image(scene), format="PNG")
            rng = random.Random(f"synth-questions/{config.seed}/{scene.scene_id}")
            # Training answers never name a held-out pair (not even "no, there is none")
            qas = scene_questions(scene, index, rng, HELD_OUT_PAIRS if split == "train" else frozenset())
            self.qas += [(scene, f"{scene.scene_id}_{k}", qa) for k, qa in enumerate(qas)]
            if split == "train":
                # Its own stream, so that the other conversations do not depend on the share
                answer_all = random.Random(f"synth-form/{config.seed}/{scene.scene_id}").random() < config.answer_all_share
                turns, described = _conversation(scene, qas, rng, config.describe_share, answer_all)
                self.described += described
                self.answer_all += answer_all
                record = {"id": scene.scene_id, "image": _image(scene), "conversations": turns}
                subset_rng = random.Random(f"synth-subset/{config.seed}/{scene.scene_id}")
                if not described and subset_rng.random() < config.token_subset_share:
                    record[IMAGE_TOKEN_SUBSET_KEY] = _token_subset(scene, subset_rng)
                    self.subsets += 1
                self.conversations.append(record)

    def write(self, root: Path) -> dict[str, Any]:
        """Write the split's files under `root`; return its counts for stats.json."""
        _dump_jsonl(root / self.split / "scenes.jsonl", [_scene_record(s) for s in self.scenes])
        counts = {"scenes": len(self.scenes),
                  "questions": {t: sum(qa.category == t for _, _, qa in self.qas) for t in SHORT_ANSWER_TYPES}}
        counts["held_out_questions"] = sum(qa.held_out for _, _, qa in self.qas)  # 0 in train by construction
        if self.split == "train":
            pretrain = [{"id": s.scene_id, "image": _image(s), "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption(s)}]} for s in self.scenes]
            _dump_json(root / "train" / "pretrain.json", pretrain)
            _dump_json(root / "train" / "instruct.json", self.conversations)
            counts["describe"] = self.described
            counts["answer_all"] = self.answer_all
            counts["image_token_subsets"] = self.subsets
            return counts
        _dump_jsonl(root / self.split / "questions.jsonl", [
            {"question_id": qid, "image": _image(s), "text": _short_prompt(qa.question), "category": qa.category,
             "held_out": qa.held_out} for s, qid, qa in self.qas])
        _dump_jsonl(root / self.split / "answers.jsonl", [
            {"question_id": qid, "answer": qa.answer, "category": qa.category, "held_out": qa.held_out}
            for _, qid, qa in self.qas])
        existence = [(s, qid, qa) for s, qid, qa in self.qas if qa.category == "existence"]
        _dump_jsonl(root / self.split / "pope" / "questions.jsonl", [
            {"question_id": qid, "image": _image(s), "text": _short_prompt(qa.question), "category": qa.kind}
            for s, qid, qa in existence])
        for kind in NEGATIVE_KINDS:  # labels in the question file's order, as eval_pope pairs them
            _dump_jsonl(root / self.split / "pope" / f"coco_pope_{kind}.json", [
                {"question_id": qid, "image": _image(s), "text": qa.question, "label": qa.answer}
                for s, qid, qa in existence if qa.kind == kind])
        _dump_jsonl(root / self.split / "describe.jsonl", [
            {"question_id": f"{s.scene_id}_describe", "image": _image(s), "text": DESCRIBE_PROMPTS[0],
             "answer": description(s)} for s in self.scenes])
        counts["pope"] = {kind: sum(qa.kind == kind for _, _, qa in existence) for kind in NEGATIVE_KINDS}
        counts["describe"] = len(self.scenes)
        return counts


def majority_baseline(train: list[QA], test: list[QA]) -> dict[str, Any]:
    """Per short-answer type: the most frequent train answer and its accuracy on test; overall over test."""
    answers = majority_answers(train)
    out: dict[str, Any] = {}
    correct_total = 0
    for category in SHORT_ANSWER_TYPES:
        asked = [qa for qa in test if qa.category == category]
        correct = sum(qa.answer == answers.get(category) for qa in asked)
        correct_total += correct
        out[category] = {"answer": answers.get(category), "accuracy": correct / len(asked) if asked else None,
                         "questions": len(asked)}
    out["overall"] = {"accuracy": correct_total / len(test) if test else None, "questions": len(test)}
    return out


def generate(config: SynthConfig, root: Path) -> dict[str, Any]:
    """Write the whole dataset into the (new, empty) folder `root`; return the stats."""
    splits = {}
    for split in SPLITS:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        splits[split] = _Split(config, split, root / "images")
    stats = {
        "config": dataclasses.asdict(config),
        "held_out_pairs": sorted(HELD_OUT_PAIRS),
        "splits": {name: split.write(root) for name, split in splits.items()},
        "majority_baseline_test": majority_baseline([qa for _, _, qa in splits["train"].qas],
                                                    [qa for _, _, qa in splits["test"].qas]),
    }
    _dump_json(root / "stats.json", stats)
    return stats


def write_dataset(config: SynthConfig, out: Path) -> dict[str, Any]:
    """`generate` into a temporary sibling folder renamed to `out` when complete: never a half-written `out`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        stats = generate(config, tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.replace(tmp, out)  # replaces an empty `out` directory atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SynthConfig()
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="image side in pixels")
    parser.add_argument("--n-train", type=int, default=defaults.n_train, help="training scenes")
    parser.add_argument("--n-val", type=int, default=defaults.n_val, help="validation scenes")
    parser.add_argument("--n-test", type=int, default=defaults.n_test, help="test scenes")
    parser.add_argument("--describe-share", type=float, default=defaults.describe_share,
                        help="share of training conversations that also ask for the long description")
    parser.add_argument("--answer-all-share", type=float, default=defaults.answer_all_share,
                        help="share of training conversations that ask and answer every question in one turn")
    parser.add_argument("--token-subset-share", type=float, default=defaults.token_subset_share,
                        help="share of training conversations without a description whose image the LLM sees only "
                             "in part (its targets plus random other patches: 'image_token_subset', read by "
                             "train --image_token_subsets)")


def run(args: argparse.Namespace) -> int:
    if args.image_size < 32:
        raise UserError(f"--image-size must be >= 32, got {args.image_size}")
    for flag, value in (("--n-train", args.n_train), ("--n-val", args.n_val), ("--n-test", args.n_test)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--describe-share", args.describe_share), ("--answer-all-share", args.answer_all_share),
                        ("--token-subset-share", args.token_subset_share)):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{flag} must be in [0, 1], got {value}")
    config = SynthConfig(args.seed, args.image_size, args.n_train, args.n_val, args.n_test,
                         args.describe_share, args.answer_all_share, args.token_subset_share)
    stats = write_dataset(config, Path(args.out))
    print(f"synthetic benchmark written to {args.out}")
    for category, row in stats["majority_baseline_test"].items():
        answer = f" (always {row['answer']!r})" if category != "overall" else ""
        print(f"majority baseline, test {category}: {100 * row['accuracy']:.2f}%{answer}")
    return 0
