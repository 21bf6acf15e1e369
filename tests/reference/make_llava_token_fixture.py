"""Write tests/fixtures/llava_tokenization.json: token ids and labels from LLaVA-1.5's own code.

Run in a SEPARATE virtual environment holding LLaVA and the transformers version it was released with,
never the project's (this script imports LLaVA, the project's tests only read its output):

    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0   # the CPU build is enough
    /work/refvenv/bin/pip install --no-deps llava-torch==1.2.2.post1
    /work/refvenv/bin/pip install transformers==4.37.2 sentencepiece protobuf tokenizers pillow \
        accelerate==0.21.0
    # the tiny SentencePiece model, made with the project's venv:
    .venv/bin/python -c "from dynamic_llava.tiny.tokenizer import train_tiny_tokenizer as t; t('/tmp/tinytok')"
    /work/refvenv/bin/python tests/reference/make_llava_token_fixture.py /tmp/tinytok \
        tests/fixtures/llava_tokenization.json
    cp /tmp/tinytok/tokenizer.model tests/fixtures/llava_tokenization.model

(transformers 4.37.2 is what Dynamic-LLaVA pins; llava-torch 1.2.2.post1 itself pins 4.36.2 with
tokenizers 0.15.0 and sentencepiece 0.1.99, which give the same file.)

LLaVA's tokenizer is `AutoTokenizer.from_pretrained(path, use_fast=False)` (the slow SentencePiece
LlamaTokenizer) with pad = unk, as in llava/train/train.py and llava/model/builder.py. Every case is run
for the three tokenizer_config.json variants checkpoints ship: `legacy: true`, `legacy: false`, and no
`legacy` key (which that transformers version reads as true).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import random
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace

# llava/__init__.py imports the whole model stack; load its submodules without it.
_spec = importlib.util.find_spec("llava")
_pkg = types.ModuleType("llava")
_pkg.__path__ = list(_spec.submodule_search_locations)
sys.modules["llava"] = _pkg

import transformers
from llava import conversation as conversation_lib
from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_PLACEHOLDER,
)
from llava.mm_utils import tokenizer_image_token
from llava.train import train as llava_train

LEGACY_VARIANTS = {"legacy_true": True, "legacy_false": False, "legacy_missing": None}
# Every template LLaVA trains with a dedicated preprocess function (v0 falls back to the v0-era one).
TRAIN_VERSIONS = ["v1", "vicuna_v1", "llava_v1", "plain", "llama_2", "llava_llama_2", "mistral_instruct",
                  "chatml_direct", "mpt"]
PROMPT_TEMPLATES = ["v0", "llava_v0", "v1", "vicuna_v1", "llava_v1", "llama_2", "llava_llama_2",
                    "mistral_instruct", "chatml_direct", "mpt", "plain"]

QUESTIONS = [
    "What is in the image?",
    "Describe the image in detail.",
    " What color is the cat?",
    "  Two leading spaces.",
    "\nA leading newline.",
    "\n\nTwo newlines, then text.",
    "Trailing space ",
    "Trailing newline\n",
    "\tA tab first.",
    "▁A literal metaspace first.",
    "Metaspace ▁ in the middle▁.",
    "▁",
    "Qu'est-ce que c'est ? café, naïve, Straße.",
    "猫はどこですか？ 图片里有什么？",
    "Emoji 🐱🚗 and ✓ marks.",
    "Answer with the option's letter from the given choices directly.\nA. red\nB. blue",
    "How many dogs are there? Answer the question using a single word or phrase.",
    "Numbers 12345 and 3.14159, -42%.",
    "Special text a</s>USER: b and <s> inside.",
    "An <unk> inside.",
    "",
    " ",
    "Multiple   inner    spaces.",
    "Ends with a colon:",
    "[0.123, 0.456, 0.789, 0.999] (box)",
]
CLEAN_QUESTIONS = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[15], QUESTIONS[16], QUESTIONS[17]]
CLEAN_ANSWERS = ["A red cat sits on the table.", "There are 3 cats, and 12 dogs!", "Yes", "B", "A small dog."]
ANSWERS = [
    "A red cat sits on the table.",
    "There are 3 cats, and 12 dogs!",
    " A leading space answer.",
    "\nA newline first.",
    "Yes",
    "猫です。",
    "The ▁ metaspace stays.",
    "It ends with </s> inside.",
    "Line one.\nLine two.\n",
    "B",
]


def make_tokenizer(source: Path, legacy: bool | None, work: Path) -> transformers.PreTrainedTokenizer:
    """LLaVA's tokenizer for the tiny SentencePiece model under one `legacy` setting."""
    folder = work / f"legacy_{legacy}"
    folder.mkdir()
    shutil.copyfile(source / "tokenizer.model", folder / "tokenizer.model")
    shutil.copyfile(source / "special_tokens_map.json", folder / "special_tokens_map.json")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("legacy", None)
    if legacy is not None:
        config["legacy"] = legacy
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, use_fast=False, model_max_length=2048,
                                                           padding_side="right")
    assert type(tokenizer).__name__ == "LlamaTokenizer"
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def placements(question: str) -> list[str]:
    """The human text with `<image>` at the front, middle, end, several times, or not at all."""
    words = question.split(" ")
    middle = " ".join(words[: len(words) // 2]) + " <image> " + " ".join(words[len(words) // 2:])
    return [
        "<image>\n" + question, question + "\n<image>", middle, "<image>" + question,
        "<image> " + question, question + " <image>", "<image><image>\n" + question,
        "<image>\n" + question + "\n<image>", question, "USER: <image> " + question,
        "Describe <image> in detail." + question,
    ]


def render(template: str, user_text: str, answer: str | None = None) -> str:
    conv = conversation_lib.conv_templates[template].copy()
    conv.append_message(conv.roles[0], user_text)
    conv.append_message(conv.roles[1], answer)
    return conv.get_prompt()


def prompt_cases(rng: random.Random) -> list[dict]:
    """Raw strings for `tokenizer_image_token`: templated prompts and bare chunks."""
    cases = []
    for question in QUESTIONS:
        for text in placements(question):
            cases.append({"template": rng.choice(PROMPT_TEMPLATES), "user": text})
    for template in PROMPT_TEMPLATES:
        for question in rng.sample(QUESTIONS, 6):
            cases.append({"template": template, "user": "<image>\n" + question})
            cases.append({"template": template, "user": rng.choice(placements(question)),
                          "answer": rng.choice(ANSWERS)})
    bare = ["USER: <image> What is it?", "Describe <image> in detail.", "<image>", "<image><image>", "",
            " ", "<image> ", " <image>", "\n<image>\n", "a</s>USER: b", "a</s> USER: b", "<s>[INST] hi [/INST]",
            "▁", "▁▁x", "x▁", "<image>▁y", "<image>\u3000z", "<unk>", "</s>", "<s>"]
    cases += [{"raw": text} for text in bare]
    return cases


def build_prompt(case: dict) -> str:
    if "raw" in case:
        return case["raw"]
    return render(case["template"], case["user"], case.get("answer"))


def renders(case: dict, build) -> bool:
    """Whether LLaVA renders this case at all (e.g. `plain` has no second separator, LLaMA-2 asserts a
    non-empty first message): cases its own code rejects are left out."""
    try:
        build(case)
    except (AssertionError, TypeError):
        return False
    return True


def request_cases(rng: random.Random) -> list[dict]:
    """Single-turn inference requests as llava/eval/run_llava.py builds them (one image)."""
    cases = []
    for template in PROMPT_TEMPLATES:
        if template == "plain":
            continue
        for question in QUESTIONS:
            cases.append({"conv_mode": template, "query": question})
        for question in rng.sample(QUESTIONS, 4):
            words = question.split(" ")
            cases.append({"conv_mode": template,
                          "query": " ".join(words[:1] + [IMAGE_PLACEHOLDER] + words[1:])})
    return cases


def request_prompt(case: dict) -> str:
    """run_llava.eval_model's query handling (mm_use_im_start_end false), then the template."""
    query = case["query"]
    if IMAGE_PLACEHOLDER in query:
        query = re.sub(IMAGE_PLACEHOLDER, DEFAULT_IMAGE_TOKEN, query)
    else:
        query = DEFAULT_IMAGE_TOKEN + "\n" + query
    return render(case["conv_mode"], query)


def train_cases(rng: random.Random) -> list[dict]:
    """LLaVA training samples: one image or none, one to three rounds, every dedicated template; the
    first 14 per template draw from every text above, the next 8 from plain ones (most of which LLaVA
    supervises), the last 4 wrap the image in <im_start> / <im_end> (tokens added to the tokenizer)."""
    cases = []
    for version in TRAIN_VERSIONS:
        for k in range(26):
            clean = k >= 14
            rounds = 1 if version == "plain" else rng.randint(1, 3)
            has_image = version == "plain" or k % 4 != 3 or k >= 22
            turns = []
            for r in range(rounds):
                question = rng.choice(CLEAN_QUESTIONS if clean else [q for q in QUESTIONS if q.strip()])
                if r == 0 and has_image:
                    question = rng.choice([p for p in placements(question) if p.count("<image>") == 1])
                answer = rng.choice(CLEAN_ANSWERS if clean else ANSWERS)
                turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            if k == 5 and version != "plain":  # plain takes exactly one human and one gpt turn
                turns.insert(0, {"from": "gpt", "value": "A leading reply that LLaVA drops."})
            cases.append({"version": version, "has_image": has_image, "im_start_end": k >= 22,
                          "conversations": turns})
    return cases


def run_train_case(case: dict, tokenizer: transformers.PreTrainedTokenizer,
                   marked: transformers.PreTrainedTokenizer) -> dict:
    """LLaVA's dataset item: preprocess_multimodal (image samples only), then preprocess. `marked` is the
    tokenizer with <im_start> / <im_end> added, as LlavaMetaForCausalLM.initialize_vision_tokenizer adds them."""
    conversation_lib.default_conversation = conversation_lib.conv_templates[case["version"]]
    tokenizer = marked if case["im_start_end"] else tokenizer
    sources = [copy.deepcopy(case["conversations"])]
    if case["has_image"]:
        args = SimpleNamespace(is_multimodal=True, mm_use_im_start_end=case["im_start_end"])
        sources = llava_train.preprocess_multimodal(sources, args)
    out = llava_train.preprocess(sources, tokenizer, has_image=case["has_image"])
    return {"input_ids": [int(x) for x in out["input_ids"][0]], "labels": [int(x) for x in out["labels"][0]]}


def main(tokenizer_dir: str, out_file: str) -> None:
    source = Path(tokenizer_dir)
    rng = random.Random(0)
    prompts = [c for c in prompt_cases(rng) if renders(c, build_prompt)]
    requests = [c for c in request_cases(rng) if renders(c, request_prompt)]
    trains = train_cases(rng)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, legacy in LEGACY_VARIANTS.items():
            tokenizer = make_tokenizer(source, legacy, Path(tmp))
            marked = copy.deepcopy(tokenizer)
            marked.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
            results[name] = {
                "resolved_legacy": bool(tokenizer.legacy),
                "prompts": [tokenizer_image_token(build_prompt(c), tokenizer) for c in prompts],
                "requests": [tokenizer_image_token(request_prompt(c), tokenizer) for c in requests],
                "train": [run_train_case(c, tokenizer, marked) for c in trains],
            }
    # A missing key reads as legacy=True: store that variant's ids once, under legacy_true.
    missing = results["legacy_missing"]
    if all(missing[key] == results["legacy_true"][key] for key in ("prompts", "requests", "train")):
        results["legacy_missing"] = {"resolved_legacy": missing["resolved_legacy"], "same_ids_as": "legacy_true"}
    fixture = {
        "generator": "tests/reference/make_llava_token_fixture.py",
        "llava": "llava-torch 1.2.2.post1",
        "transformers": transformers.__version__,
        "tokenizer_model_sha256": hashlib.sha256((source / "tokenizer.model").read_bytes()).hexdigest(),
        "prompt_cases": [dict(c, prompt=build_prompt(c)) for c in prompts],
        "request_cases": [dict(c, prompt=request_prompt(c)) for c in requests],
        "train_cases": trains,
        "variants": results,
    }
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    Path(out_file).write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"{out_file}: {len(prompts)} prompts, {len(requests)} requests, {len(trains)} training samples "
          f"x {len(LEGACY_VARIANTS)} tokenizer configs")


if __name__ == "__main__":
    main(*sys.argv[1:])
