"""The bundled demo model (dynamic_llava/assets/demo_model): it loads from the package alone, is small, keeps
20 % of the image tokens, and answers the questions about the bundled sample images (this checks the shipped
weights); `dynamic-llava ask` uses it when no --model-path is given."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from dynamic_llava.cli import main as cli_main
from dynamic_llava.data.score_synth import score
from dynamic_llava.demo.export import BUNDLED_MODEL, BUNDLED_SAMPLES, SAMPLE_QUESTIONS
from dynamic_llava.eval.io import read_jsonl
from dynamic_llava.generation import GenerationConfig, generate
from dynamic_llava.model.checkpoint_files import open_tokenizer
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.prompting import prepare_request
from dynamic_llava.train.preprocess import PromptFormat, preprocess

# Questions the shipped model answers correctly; a retrained export may change them. The attribute one ("What
# color is the colored triangle?" -> red) and the count one ("How many red objects" -> 2) are not the prior's
# answers; the existence ones take both answers ("Is there a blue circle?" -> no, "Is there a yellow triangle?"
# -> yes). No position question is among them: the shipped model gets 1 of the 8 sample ones (it is weak on
# positions). With the accuracy floor they pin the weights.
FIXED = {"test_000002_1", "test_000002_3", "test_000002_7", "test_000000_6"}
MIN_ACCURACY = 0.7  # on the 36 bundled sample questions (the shipped model, run K0: 27 / 36 = 0.75; A1T's 22)


@pytest.fixture(scope="module")
def answers() -> dict[str, tuple[str, dict]]:
    """question_id -> (answer text, efficiency stats) for every bundled sample question."""
    tokenizer, model, processor, _ = load_pretrained_model(BUNDLED_MODEL)
    out = {}
    for question in read_jsonl(BUNDLED_SAMPLES / SAMPLE_QUESTIONS):
        request = prepare_request(question["text"], [BUNDLED_SAMPLES / question["image"]], tokenizer, processor,
                                  model.config, "llava_v1")
        result = generate(model, tokenizer, [request.input_ids], [request.pixel_values],
                          GenerationConfig(max_new_tokens=8, stop_strings=[request.stop]))[0]
        out[question["question_id"]] = (result.text.strip(), result.efficiency_stats())
    return out


def test_bundled_model_is_small_and_self_contained() -> None:
    size = sum(f.stat().st_size for f in BUNDLED_MODEL.rglob("*") if f.is_file())
    assert size < 16 * 2**20
    config = json.loads((BUNDLED_MODEL / "config.json").read_text())
    assert config["mm_vision_tower"] == "vision_tower"  # inside the folder, not a path of the machine it came from
    assert config["sparse_config"]["vision_keep_rate"] == 0.2
    assert config["sparse_config"]["output_text_keep_rate"] == 0.5


def test_bundled_tokenizer_supervises_every_reply_of_a_multi_turn_conversation() -> None:
    """Fine-tuning the bundled model: both replies of a two-round `v1` conversation are supervised. The
    first bundled model shipped tokenizer.json alone, which reads as legacy=False; LLaVA's round counting
    then misses by one token per later round and masked every multi-turn sample ("tokenization mismatch").
    The folder carries tokenizer.model with legacy=True, as LLaVA (use_fast=False) loads it."""
    tokenizer = open_tokenizer(BUNDLED_MODEL)
    assert (BUNDLED_MODEL / "tokenizer.model").is_file() and tokenizer.legacy
    conversation = [{"from": "human", "value": "<image>\nWhat shape is the red object?"},
                    {"from": "gpt", "value": "circle"},
                    {"from": "human", "value": "How many colored objects are there?"},
                    {"from": "gpt", "value": "3"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mismatch warns and masks the sample
        _, labels = preprocess(conversation, 1, tokenizer, PromptFormat(conv_version="v1"), "two_rounds")
    supervised = tokenizer.decode([i for i in labels.tolist() if i >= 0])
    assert supervised.split() == ["circle</s>", "3</s>"]


def test_bundled_model_answers_the_fixed_questions(answers: dict[str, tuple[str, dict]]) -> None:
    truth = {q["question_id"]: q for q in read_jsonl(BUNDLED_SAMPLES / SAMPLE_QUESTIONS)}
    for question_id in FIXED:
        assert answers[question_id][0].lower().rstrip(".") == truth[question_id]["answer"], truth[question_id]["text"]
    assert {truth[q]["category"] for q in FIXED} == {"attribute", "count", "existence"}


def test_bundled_model_accuracy_on_all_sample_questions(answers: dict[str, tuple[str, dict]]) -> None:
    result = score([{"question_id": q, "text": text} for q, (text, _) in answers.items()],
                   read_jsonl(BUNDLED_SAMPLES / SAMPLE_QUESTIONS))
    assert result["overall"]["accuracy"] >= MIN_ACCURACY
    # Dynamic-LLaVA at 20 %: floor(0.2 x 64) = 12 image tokens in every answer
    assert {stats["image_tokens_kept"] for _, stats in answers.values()} == {12}


def test_ask_without_model_path_uses_the_bundled_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    question = next(q for q in read_jsonl(BUNDLED_SAMPLES / SAMPLE_QUESTIONS) if q["question_id"] in FIXED)
    mask = tmp_path / "mask.png"
    assert cli_main(["ask", "--image-file", str(BUNDLED_SAMPLES / question["image"]), "--query", question["text"],
                     "--temperature", "0", "--json", "--save-mask", str(mask)]) == 0
    reply = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reply["answer"].lower().rstrip(".") == question["answer"]
    assert reply["image_tokens_kept"] == 12 and reply["vision_keep_rate"] == 0.2
    with Image.open(mask) as picture:
        assert picture.size == (336, 336)
