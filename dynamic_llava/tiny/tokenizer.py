"""Train a tiny LLaMA-style SentencePiece tokenizer locally (no download)."""

from __future__ import annotations

import io
import json
import pathlib
import random
from collections.abc import Iterator

import sentencepiece as spm

_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_COLOURS = "red green blue yellow orange purple pink brown black white grey gray gold silver".split()
_SHAPES = "circle square triangle rectangle star heart diamond oval cube sphere cone line dot".split()
_NOUNS = (
    "image picture photo cat dog car bus tree house man woman child person table chair book cup "
    "street sky water road field sign window door ball bird horse boat plane phone computer food "
    "plate pizza kitchen room building city train bike shirt hat dress umbrella clock flower"
).split()
_ADJECTIVES = "small large big tiny old new bright dark happy tall short round empty full wooden".split()
_VERBS = "is are has shows contains holds sits stands looks runs rides eats wears carries".split()
_PLACES = "on the table|in the room|near the tree|under the sky|next to the car|at the beach".split("|")
_QUESTIONS = (
    "What is in the image?|What color is the {n}?|How many {n}s are there?|Where is the {n}?|"
    "Describe the image in detail.|Is there a {a} {n} in the picture?|What shape is the {n}?|"
    "Answer the question using a single word or phrase.|What is the man doing?|Why is the {n} {c}?"
).split("|")
_FUNCTION_WORDS = (
    "the a an of and or but to in on at with for from by as it this that these those there here "
    "yes no not very also some any all each one two three four five six seven eight nine ten"
).split()
_PUNCT = [".", ",", "!", "?", ";", ":", "'", '"', "(", ")", "-", "/", "#", "*", "%", "&"]


def _sentence(rng: random.Random) -> str:
    """One procedurally generated sentence mixing the template, vocabulary, numbers and punctuation."""
    n, c, a, s = rng.choice(_NOUNS), rng.choice(_COLOURS), rng.choice(_ADJECTIVES), rng.choice(_SHAPES)
    kind = rng.randrange(8)
    if kind == 0:
        question = rng.choice(_QUESTIONS).format(n=n, c=c, a=a)
        return f"{_SYSTEM} USER: <image>\n{question} ASSISTANT:"
    if kind == 1:
        question = rng.choice(_QUESTIONS).format(n=n, c=c, a=a)
        return f"###Human: {question}###Assistant: The {n} is {c}."
    if kind == 2:
        return f"The {a} {c} {n} {rng.choice(_VERBS)} a {s} {rng.choice(_PLACES)}."
    if kind == 3:
        count, other = rng.randrange(1000), rng.randrange(100)
        return f"There are {count} {n}s and {other} {c} {s}s{rng.choice(_PUNCT)}"
    if kind == 4:
        question, answer = rng.choice(_QUESTIONS).format(n=n, c=c, a=a), rng.choice(["Yes", "No"])
        return f"{question} {answer}, it {rng.choice(_VERBS)} {c}."
    if kind == 5:
        words = rng.choices(_FUNCTION_WORDS + _NOUNS + _COLOURS + _SHAPES, k=rng.randint(4, 14))
        return " ".join(words).capitalize() + rng.choice(_PUNCT)
    if kind == 6:
        box = ", ".join(f"{rng.random():.3f}" for _ in range(4))
        return f"[{box}] ({n}: {rng.randint(-50, 50)}%)"
    return f"USER: {n.title()} {rng.choice(_PUNCT)} ASSISTANT: {a} {s}, {c}{rng.choice(_PUNCT)}</s>"


def _corpus(num_sentences: int = 4000, seed: int = 0) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(num_sentences):
        yield _sentence(rng)


def _tokenizer_config() -> dict:
    """tokenizer_config.json modelled on the one released with liuhaotian/llava-v1.5-7b, except `legacy`.

    `legacy: true` (as a config without the key reads in LLaVA's transformers): with `legacy: false`,
    LLaVA's preprocess_v1 shifts each later round's token count by one, a correction made for LLaMA's
    vocabulary that this tiny one does not fit ("USER" after "</s>" is two pieces here, "▁USER" one), so
    LLaVA-exact labels would mask every multi-round v1 sample.
    """

    def added(content: str) -> dict:
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": added("</s>"),
        "legacy": True,
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": added("<unk>"),
    }


def _special_tokens_map() -> dict:
    plain = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    return {
        "bos_token": {"content": "<s>", **plain},
        "eos_token": {"content": "</s>", **plain},
        "unk_token": {"content": "<unk>", **plain},
    }


def train_tiny_tokenizer(out_dir: pathlib.Path, vocab_size: int = 1000) -> None:
    """Write a deterministic LLaMA-convention SentencePiece BPE tokenizer (byte fallback) to `out_dir`."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_corpus(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        # Determinism: one thread, no sampling/shuffling of the input sentences.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(_special_tokens_map(), indent=2) + "\n")
