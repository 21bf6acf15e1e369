"""The synthetic shapes benchmark (v2): determinism, disjoint splits, local objects (one per patch) that
outnumber the token budget, held-out pairs, answers correct by construction, and the files read by the
training data pipeline, the runners and the scorers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dynamic_llava.cli import main as cli_main
from dynamic_llava.constants import IGNORE_INDEX
from dynamic_llava.data import score_synth
from dynamic_llava.data.descriptions import caption, description
from dynamic_llava.data.questions import SHORT_ANSWER_TYPES
from dynamic_llava.data.render import DISTRACTOR_GREYS, RGB, draw_object, render_scene
from dynamic_llava.data.scenes import (
    COLOURS,
    DISTRACTOR_COLOUR,
    GRID,
    HELD_OUT_PAIRS,
    JITTER,
    KEPT_PATCHES,
    SHAPES,
    SPLITS,
    Scene,
    SceneObject,
    sample_scene,
    scene_from_dict,
    split_of,
)
from dynamic_llava.data.synth import ANSWER_ALL_PROMPT, SHORT_ANSWER_SUFFIX, SynthConfig, write_dataset
from dynamic_llava.eval import eval_pope, model_vqa_loader
from dynamic_llava.eval.generation_ability import read_samples
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.train.dataset import DataArguments, LazySupervisedDataset
from dynamic_llava.train.preprocess import PromptFormat

CONFIG = SynthConfig(seed=0, image_size=112, n_train=24, n_val=6, n_test=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("synth") / "a", CONFIG)


def _generate(out: Path, config: SynthConfig) -> Path:
    write_dataset(config, out)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scenes(root: Path, split: str) -> dict[str, Scene]:
    return {row["image"]: scene_from_dict(row) for row in _jsonl(root / split / "scenes.jsonl")}


# ----------------------------------------------------------------------------- determinism, splits
def test_same_seed_same_bytes_other_seed_differs(data: Path, tmp_path: Path) -> None:
    again = _files(_generate(tmp_path / "b", CONFIG))
    assert again == _files(data)
    other = _files(_generate(tmp_path / "c", dataclasses.replace(CONFIG, seed=1)))
    assert other.keys() == again.keys()
    assert other["train/instruct.json"] != again["train/instruct.json"]
    assert other["images/test/000000.png"] != again["images/test/000000.png"]
    assert not list(tmp_path.glob(".*partial"))  # the temporary folder was renamed into place


def test_splits_share_no_scene(data: Path) -> None:
    images, keys, texts = {}, {}, {}
    for split in SPLITS:
        scenes = _scenes(data, split)
        assert len(scenes) == CONFIG.scenes(split)
        assert all(split_of(s.key) == split for s in scenes.values())
        images[split] = {hashlib.sha256((data / "images" / name).read_bytes()).hexdigest() for name in scenes}
        keys[split] = {s.key for s in scenes.values()}
        texts[split] = {description(s) for s in scenes.values()}
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not images[a] & images[b] and not keys[a] & keys[b] and not texts[a] & texts[b]


# ----------------------------------------------------------------------------- scene geometry
CHAIN_SIZE, PATCH = 112, 14  # the chain's image and patch size: GRID x GRID patches


def _mask(obj: SceneObject, size: int = CHAIN_SIZE) -> np.ndarray:
    """The pixels `obj` covers when drawn alone."""
    canvas = Image.new("L", (size, size))
    draw_object(ImageDraw.Draw(canvas), obj, size, 255)
    return np.asarray(canvas) > 0


def _cell(mask: np.ndarray, row: int, col: int) -> np.ndarray:
    return mask[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH]


def test_scenes_have_local_objects_that_outnumber_the_token_budget() -> None:
    assert CHAIN_SIZE // PATCH == GRID
    for split in SPLITS:
        for index in range(200):
            scene = sample_scene(0, split, index)
            targets, distractors = scene.targets, scene.distractors
            assert 3 <= len(targets) <= 5 and 9 <= len(distractors) <= 13
            assert len(scene.objects) > KEPT_PATCHES  # "keep every object patch" does not fit 20 % of 64
            assert len({(o.row, o.col) for o in scene.objects}) == len(scene.objects)  # one object per cell
            assert len({o.pair for o in targets}) == len(targets)
            assert all(o.colour in COLOURS for o in targets) and all(o.colour == DISTRACTOR_COLOUR for o in distractors)
            assert [(o.row, o.col) for o in scene.objects] == sorted((o.row, o.col) for o in scene.objects)
            for o in scene.objects:
                assert abs(o.x - (o.col + 0.5) / GRID) <= JITTER + 1e-4  # + rounding to 4 digits
                assert abs(o.y - (o.row + 0.5) / GRID) <= JITTER + 1e-4


def test_every_object_is_drawn_inside_its_own_patch_at_112_px(data: Path) -> None:
    for split in SPLITS:
        for scene in _scenes(data, split).values():
            for o in scene.objects:
                mask = _mask(o)
                assert _cell(mask, o.row, o.col).sum() == mask.sum() > 30, (scene.scene_id, o)
    # The jitter's extremes too, for every shape
    for shape in SHAPES:
        for dx in (-JITTER, JITTER):
            for dy in (-JITTER, JITTER):
                o = SceneObject(shape, "red", 3, 4, 4.5 / GRID + dx, 3.5 / GRID + dy)
                assert _cell(_mask(o), 3, 4).sum() == _mask(o).sum()


def test_distinct_shapes_render_differently_at_112_px() -> None:
    masks = {shape: _cell(_mask(SceneObject(shape, "red", 2, 2, 2.5 / GRID, 2.5 / GRID)), 2, 2) for shape in SHAPES}
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() >= 15, (a, b)  # of ~45-100 pixels per shape


def test_distractors_are_grey_and_lighter_than_anything_behind_them(data: Path) -> None:
    scene = next(iter(_scenes(data, "test").values()))
    image = np.asarray(render_scene(scene, CHAIN_SIZE)).astype(int)
    empty = np.asarray(render_scene(dataclasses.replace(scene, objects=()), CHAIN_SIZE))
    assert empty.max() < min(DISTRACTOR_GREYS)  # background and clutter are darker than every distractor
    for o in scene.objects:
        pixels = _cell(image, o.row, o.col)[_cell(_mask(o), o.row, o.col)]
        if o.is_target:
            assert (pixels == RGB[o.colour]).all()
        else:
            assert (pixels == pixels[0]).all() and pixels[0][0] in DISTRACTOR_GREYS and len(set(pixels[0])) == 1


def test_held_out_pairs_are_never_training_targets_nor_named_in_training(data: Path) -> None:
    assert len(HELD_OUT_PAIRS) == 5 and all(c in COLOURS and s in SHAPES for c, s in HELD_OUT_PAIRS)
    train = [sample_scene(0, "train", i) for i in range(500)]
    assert not any(o.pair in HELD_OUT_PAIRS for scene in train for o in scene.targets)
    test = [sample_scene(0, "test", i) for i in range(500)]
    seen = {o.pair for scene in test for o in scene.targets}
    assert HELD_OUT_PAIRS <= seen
    instruct = (data / "train" / "instruct.json").read_text()
    assert not any(re.search(rf"\b{c} {s}", instruct) for c, s in HELD_OUT_PAIRS)  # "colored star" is no "red star"
    stats = json.loads((data / "stats.json").read_text())
    assert sorted(map(tuple, stats["held_out_pairs"])) == sorted(HELD_OUT_PAIRS)
    assert stats["splits"]["train"]["held_out_questions"] == 0


# ----------------------------------------------------------------------------- answers by construction
def _resolve(scene: Scene, words: str) -> list[SceneObject]:
    """The targets matching a description such as "red", "colored circle" or "blue square"."""
    wanted = [w for w in words.split() if w != "colored"]
    return [o for o in scene.targets if all(w in (o.colour, o.shape) for w in wanted)]


def _one(scene: Scene, words: str) -> SceneObject:
    found = _resolve(scene, words)
    assert len(found) == 1, f"{words!r} does not name exactly one target of {scene.key}"
    return found[0]


def _place(o: SceneObject) -> str:
    """The third of the image an object is in, from its cell: rows / columns 0-2, 3-4 and 5-7 of 8."""
    third = {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2}
    vertical, horizontal = ("top", "middle", "bottom")[third[o.row]], ("left", "center", "right")[third[o.col]]
    return "center" if (vertical, horizontal) == ("middle", "center") else f"{vertical} {horizontal}"


def recompute(scene: Scene, question: str) -> tuple[str, bool]:
    """The answer to a generated question and whether it is about a held-out pair, derived from the scene
    spec independently of the generator."""
    q = question.removesuffix("\n" + SHORT_ANSWER_SUFFIX)

    def answer(value: str, *about: SceneObject) -> tuple[str, bool]:
        return value, any(o.pair in HELD_OUT_PAIRS for o in about)

    if m := re.fullmatch(r"What color is the colored (\w+)\?", q):
        return answer(_one(scene, m[1]).colour, _one(scene, m[1]))
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        return answer(_one(scene, m[1]).shape, _one(scene, m[1]))
    if m := re.fullmatch(r"How many (colored|\w+) objects are there\?|How many (colored \w+)s are there\?", q):
        found = _resolve(scene, m[1] or m[2])
        return answer(str(len(found)), *found)
    if m := re.fullmatch(r"Where is the (\w+) object\?|Where is the (colored \w+)\?", q):
        return answer(_place(_one(scene, m[1] or m[2])), _one(scene, m[1] or m[2]))
    if m := re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q):
        return ("yes" if _resolve(scene, f"{m[1]} {m[2]}") else "no"), (m[1], m[2]) in HELD_OUT_PAIRS
    raise AssertionError(f"unrecognised question {q!r}")


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_answers_are_correct_by_construction(data: Path, split: str) -> None:
    scenes = _scenes(data, split)
    questions = _jsonl(data / split / "questions.jsonl")
    answers = _jsonl(data / split / "answers.jsonl")
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in answers]
    assert {q["category"] for q in questions} == set(SHORT_ANSWER_TYPES)
    for q, a in zip(questions, answers):
        assert q["category"] == a["category"]
        assert q["text"].endswith("\n" + SHORT_ANSWER_SUFFIX)
        assert q["held_out"] == a["held_out"]
        assert recompute(scenes[q["image"]], q["text"]) == (a["answer"], a["held_out"]), q


def test_training_answers_are_correct_by_construction(data: Path) -> None:
    scenes = _scenes(data, "train")
    instruct = json.loads((data / "train" / "instruct.json").read_text())
    assert len(instruct) == CONFIG.n_train
    described = 0
    for sample in instruct:
        scene, turns = scenes[sample["image"]], sample["conversations"]
        assert turns[0]["value"].startswith("<image>\n") and sum("<image>" in t["value"] for t in turns) == 1
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            if question.endswith(SHORT_ANSWER_SUFFIX):
                assert recompute(scene, question) == (gpt["value"], False)
            else:
                assert gpt["value"] == description(scene)
                described += 1
    assert 0 < described < len(instruct)
    pretrain = json.loads((data / "train" / "pretrain.json").read_text())
    for sample in pretrain:
        human, gpt = sample["conversations"]
        assert human == {"from": "human", "value": "<image>"}
        assert gpt["value"] == caption(scenes[sample["image"]])
        assert all(o.name in gpt["value"] for o in scenes[sample["image"]].targets)


def test_answer_all_conversations_pair_each_question_with_its_answer(data: Path, tmp_path: Path) -> None:
    mixed = _generate(tmp_path / "mixed", dataclasses.replace(CONFIG, answer_all_share=0.5))
    scenes = _scenes(mixed, "train")
    plain = json.loads((data / "train" / "instruct.json").read_text())
    converted = 0
    for before, after in zip(plain, json.loads((mixed / "train" / "instruct.json").read_text())):
        if after == before:
            continue  # the share decides per scene on its own stream: the other conversations are unchanged
        converted += 1
        turns, scene = after["conversations"], scenes[after["image"]]
        assert turns[0] == {"from": "human", "value": "<image>\n" + ANSWER_ALL_PROMPT}
        pairs = re.findall(r"(.+?\?) ([\w ]+?)\.(?: |$)", turns[1]["value"])
        assert " ".join(f"{q} {a}." for q, a in pairs) == turns[1]["value"]
        assert all(recompute(scene, q)[0] == a for q, a in pairs)
        assert len(pairs) == sum(t["value"].endswith(SHORT_ANSWER_SUFFIX) for t in before["conversations"][::2])
        described = description(scene) in [t["value"] for t in before["conversations"]]
        assert turns[2:] == ([] if not described else [turns[2], {"from": "gpt", "value": description(scene)}])
    assert 0 < converted < len(plain)
    assert json.loads((mixed / "stats.json").read_text())["splits"]["train"]["answer_all"] == converted


def test_token_subsets_keep_every_target_and_skip_descriptions(data: Path, tmp_path: Path) -> None:
    subsets = _generate(tmp_path / "subsets", dataclasses.replace(CONFIG, n_train=60, token_subset_share=0.5))
    scenes = _scenes(subsets, "train")
    plain = json.loads((_generate(tmp_path / "plain", dataclasses.replace(CONFIG, n_train=60))
                        / "train" / "instruct.json").read_text())
    sizes = []
    for before, after in zip(plain, json.loads((subsets / "train" / "instruct.json").read_text())):
        subset = after.pop("image_token_subset", None)
        assert after == before  # the share decides on its own stream: the conversations are unchanged
        if subset is None:
            continue
        scene = scenes[after["image"]]
        assert description(scene) not in [t["value"] for t in after["conversations"]]  # it names the greys too
        targets = {o.row * GRID + o.col for o in scene.targets}
        assert subset == sorted(set(subset)) and targets <= set(subset) and max(subset) < GRID * GRID
        sizes.append(len(subset) - len(targets))
    assert json.loads((subsets / "stats.json").read_text())["splits"]["train"]["image_token_subsets"] == len(sizes)
    assert 10 <= len(sizes) <= 35  # about half of the ~45 conversations without a description
    assert min(sizes) < KEPT_PATCHES < max(sizes)  # budgets around 20 % and far above are drawn


def test_pope_files_and_adversarial_negatives(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pope = data / "test" / "pope"
    questions = _jsonl(pope / "questions.jsonl")
    scenes = _scenes(data, "test")
    for kind in ("random", "popular", "adversarial"):
        labels = _jsonl(pope / f"coco_pope_{kind}.json")
        assert [row["question_id"] for row in labels] == [q["question_id"] for q in questions if q["category"] == kind]
        assert sum(row["label"] == "yes" for row in labels) == len(labels) // 2  # an even number of scenes
        for row in labels:
            scene = scenes[row["image"]]
            assert recompute(scene, row["text"])[0] == row["label"]
            if kind == "adversarial" and row["label"] == "no":
                colour, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", row["text"]).groups()
                assert any(o.colour == colour or o.shape == shape for o in scene.targets)
    # eval_pope reads the layout: answering every label right gives F1 = 1 in each category
    results = tmp_path / "results.jsonl"
    by_id = {row["question_id"]: row["label"] for kind in ("random", "popular", "adversarial")
             for row in _jsonl(pope / f"coco_pope_{kind}.json")}
    results.write_text("".join(json.dumps({"question_id": q["question_id"], "text": by_id[q["question_id"]].title()})
                               + "\n" for q in questions))
    assert eval_pope.main(["--annotation-dir", str(pope), "--question-file", str(pope / "questions.jsonl"),
                           "--result-file", str(results)]) == 0
    assert capsys.readouterr().out.splitlines().count("F1 score: 1.0000") == 3


def test_stats_and_majority_baseline(data: Path) -> None:
    stats = json.loads((data / "stats.json").read_text())
    assert stats["config"]["n_test"] == CONFIG.n_test
    test_answers = _jsonl(data / "test" / "answers.jsonl")
    for category in SHORT_ANSWER_TYPES:
        row = stats["majority_baseline_test"][category]
        asked = [a for a in test_answers if a["category"] == category]
        assert stats["splits"]["test"]["questions"][category] == len(asked) == row["questions"]
        assert row["accuracy"] == sum(a["answer"] == row["answer"] for a in asked) / len(asked)


# ----------------------------------------------------------------------------- consumers of the files
@pytest.fixture(scope="module")
def loaded(tiny_llava_dir: Path):
    return load_pretrained_model(tiny_llava_dir, device="cpu", dtype="float32")


def test_descriptions_are_long(data: Path, loaded) -> None:
    tokenizer = loaded[0]
    samples = read_samples(str(data / "test" / "describe.jsonl"), str(data / "images"), None)
    assert len(samples) == CONFIG.n_test
    scenes = _scenes(data, "test")
    for sample in samples:
        assert len(sample["answer"].split()) >= 60
        assert len(tokenizer(sample["answer"], add_special_tokens=False).input_ids) >= 60
        scene = scenes[sample["image"]]
        listing = re.search(r"From top to bottom and left to right, there is (.+?)\. ", sample["answer"])[1]
        assert re.findall(r"an? (\w+ \w+) (?:at|in) the ([\w ]+?)(?:,| and |$)", listing) == [
            (o.name, o.place) for o in scene.targets]


@pytest.mark.parametrize("name, version", [("instruct.json", "v1"), ("pretrain.json", "plain")])
def test_training_json_loads_and_labels_cover_the_answers(data: Path, loaded, name: str, version: str) -> None:
    tokenizer, _, image_processor, _ = loaded
    args = DataArguments(data_path=str(data / "train" / name), is_multimodal=True, image_folder=str(data / "images"))
    dataset = LazySupervisedDataset(tokenizer, args, image_processor, PromptFormat(version), 2048)
    records = json.loads((data / "train" / name).read_text())
    for index in range(3):
        item = dataset[index]
        assert item["images"].shape[0] == 1
        runs, current = [], []
        for label in item["labels"].tolist() + [IGNORE_INDEX]:
            if label != IGNORE_INDEX:
                current.append(label)
            elif current:
                runs.append(tokenizer.decode(current, skip_special_tokens=True).strip())
                current = []
        assert runs == [turn["value"] for turn in records[index]["conversations"][1::2]]


def test_questions_run_through_the_loader_and_the_scorer(data: Path, tiny_llava_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    subset = tmp_path / "questions.jsonl"
    subset.write_text("".join((data / "test" / "questions.jsonl").read_text().splitlines(keepends=True)[:5]))
    answers = tmp_path / "answers.jsonl"
    assert model_vqa_loader.main(["--model-path", str(tiny_llava_dir), "--question-file", str(subset),
                                  "--image-folder", str(data / "images"), "--answers-file", str(answers),
                                  "--max_new_tokens", "4", "--batch-size", "5", "--device", "cpu"]) == 0
    assert len(_jsonl(answers)) == 5
    scores = tmp_path / "scores.json"
    gt = data / "test" / "answers.jsonl"
    assert score_synth.main(["--answers-file", str(answers), "--gt-file", str(gt), "--output", str(scores)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^overall: \d+\.\d\d% \(\d+/\d+\)$", out, re.MULTILINE)
    result = json.loads(scores.read_text())
    assert result["missing"] == len(_jsonl(gt)) - 5
    assert set(result["per_type"]) == set(SHORT_ANSWER_TYPES)


def test_scorer_normalises_and_counts_missing(tmp_path: Path) -> None:
    gt = [{"question_id": "a", "answer": "2", "category": "count"},
          {"question_id": "b", "answer": "yes", "category": "existence"},
          {"question_id": "c", "answer": "red", "category": "attribute"}]
    answers = [{"question_id": "a", "text": "Two."}, {"question_id": "b", "text": "No"}]
    result = score_synth.score(answers, gt)
    assert result["per_type"]["count"]["accuracy"] == 1.0
    assert result["per_type"]["existence"]["accuracy"] == 0.0
    assert result["overall"] == {"accuracy": 1 / 3, "correct": 1, "questions": 3}
    assert result["missing"] == 1
    assert "held_out" not in result  # no ground-truth row is marked
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": "zz", "text": "x"}) + "\n")
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(row) + "\n" for row in gt))
    assert score_synth.main(["--answers-file", str(tmp_path / "a.jsonl"), "--gt-file", str(tmp_path / "g.jsonl")]) == 2


def test_scorer_reports_the_held_out_pair_questions(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt = [{"question_id": "a", "answer": "2", "category": "count", "held_out": True},
          {"question_id": "b", "answer": "yes", "category": "existence", "held_out": True},
          {"question_id": "c", "answer": "red", "category": "attribute", "held_out": False}]
    answers = [{"question_id": "a", "text": "2"}, {"question_id": "b", "text": "no"},
               {"question_id": "c", "text": "red"}]
    assert score_synth.score(answers, gt)["held_out"] == {"accuracy": 0.5, "correct": 1, "questions": 2}
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in answers))
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(row) + "\n" for row in gt))
    assert score_synth.main(["--answers-file", str(tmp_path / "a.jsonl"), "--gt-file", str(tmp_path / "g.jsonl")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "held-out pairs: 50.00% (1/2)"


# ----------------------------------------------------------------------------- CLI
def test_cli_writes_and_refuses_a_non_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine
    assert cli_main(["data", "synth", "--out", str(out), "--n-train", "3", "--n-val", "2", "--n-test", "2",
                     "--image-size", "64"]) == 0
    assert "majority baseline, test count" in capsys.readouterr().out
    assert (out / "images" / "test" / "000001.png").is_file() and (out / "stats.json").is_file()
    before = _files(out)
    assert cli_main(["data", "synth", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out} exists and is not empty"
    assert _files(out) == before
