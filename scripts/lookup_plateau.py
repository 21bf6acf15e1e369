"""Can the chain's LLM, trained from scratch, learn associative recall? A probe of the dense-target gap.

The demo's LLM (LLaMA 4 layers x 256, N(0, 0.02) init) is built with transformers' own
`LlamaForCausalLM` (not the project's model, so the result is independent of its code) and trained on
the simplest look-up there is, with no image: a listing of (shape, colour) pairs and a question about
one shape, e.g. "star purple; circle red; square red; diamond blue\nWhat color is the circle? ASSISTANT:"
-> "red". Accuracy of the teacher-forced answer on held-out listings is printed every --eval-every
steps and written to OUT/lookup_plateau.json, next to the score of guessing one of the listed colours
(what a model that reads the listing but cannot bind a colour to its shape gets).

`--recall-share F` makes that share of every batch multi-query recall rows instead: the listing, then
every listed shape again in a new order, each followed by its colour, e.g. "...\ncircle red; star
purple; ...", with every colour supervised. Each such row asks the look-up several times, with the
answer right after the name, and the held-out question accuracy shows whether that denser signal gets
the question form past the plateau.

    python scripts/lookup_plateau.py --out /tmp/plateau [--steps 1000] [--pairs 4] [--recall-share 0.5]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from dynamic_llava.constants import IGNORE_INDEX
from dynamic_llava.data.scenes import COLOURS, SHAPES
from dynamic_llava.demo.train_chain import FULL
from dynamic_llava.tiny.tokenizer import train_tiny_tokenizer

Example = tuple[list[int], list[int]]  # token ids, labels (IGNORE_INDEX where not supervised)


def _listing(rng: random.Random, pairs: int) -> tuple[list[str], list[str], str]:
    """Distinct shapes, a colour each (with replacement), and their listing "star purple; circle red; ..."."""
    shapes = rng.sample(SHAPES, pairs)
    colours = [rng.choice(COLOURS) for _ in shapes]
    return shapes, colours, "; ".join(f"{s} {c}" for s, c in zip(shapes, colours))


def examples(tokenizer, n: int, pairs: int, seed: int) -> tuple[list[Example], float]:
    """`n` question examples and the expected accuracy of answering a uniformly drawn listed colour."""
    rng = random.Random(seed)
    out, guess = [], 0.0
    for _ in range(n):
        shapes, colours, listing = _listing(rng, pairs)
        k = rng.randrange(pairs)
        guess += colours.count(colours[k]) / pairs / n
        prompt = tokenizer(f"{listing}\nWhat color is the {shapes[k]}? ASSISTANT:").input_ids
        answer = tokenizer(colours[k], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        out.append((prompt + answer, [IGNORE_INDEX] * len(prompt) + answer))
    return out, guess


def recall_examples(tokenizer, n: int, pairs: int, seed: int) -> list[Example]:
    """`n` multi-query recall rows: the listing, then each shape again (new order) with its colour supervised."""
    # Each part is tokenised on its own, so the recall part's ";" is "▁;", not the listing's ";". This is the
    # version that gets past the plateau; with the listing's own separator it stayed there (docs/RESULTS.md).
    def piece(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        shapes, colours, listing = _listing(rng, pairs)
        ids = tokenizer(listing).input_ids + piece("\n")
        labels = [IGNORE_INDEX] * len(ids)
        for k in rng.sample(range(pairs), pairs):
            name, colour, end = piece(shapes[k]), piece(f" {colours[k]}"), piece(";")
            ids += name + colour + end
            labels += [IGNORE_INDEX] * len(name) + colour + [IGNORE_INDEX] * len(end)
        out.append((ids, labels))
    return out


def batch(rows: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels and attention mask."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, :len(row_ids)] = torch.tensor(row_ids)
        labels[i, :len(row_labels)] = torch.tensor(row_labels)
        mask[i, :len(row_ids)] = 1
    return ids, labels, mask


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, test: list[Example]) -> float:
    """Share of held-out examples whose every answer token is the argmax (teacher forcing)."""
    model.eval()
    right = 0
    for start in range(0, len(test), 100):
        ids, labels, mask = batch(test[start:start + 100])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        supervised = labels[:, 1:] != IGNORE_INDEX
        hits = (predicted[:, :-1] == labels[:, 1:]) | ~supervised
        right += int(hits.all(dim=1).sum())
    model.train()
    return right / len(test)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the tokenizer and the JSON result")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pairs", type=int, default=4, help="(shape, colour) pairs per listing")
    parser.add_argument("--recall-share", type=float, default=0.0,
                        help="share of every batch given as multi-query recall rows instead of questions")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not 1 <= args.pairs <= len(SHAPES):
        print(f"error: --pairs must be in 1..{len(SHAPES)}", file=sys.stderr)
        return 2
    if not 0.0 <= args.recall_share <= 1.0:
        print("error: --recall-share must be in [0, 1]", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    train_tiny_tokenizer(args.out / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(args.out / "tokenizer")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=FULL.llm_hidden,
                         intermediate_size=4 * FULL.llm_hidden, num_hidden_layers=FULL.llm_layers,
                         num_attention_heads=FULL.llm_heads, initializer_range=FULL.llm_init_std, pad_token_id=0)
    model = LlamaForCausalLM(config).train()
    test, guess = examples(tokenizer, 600, args.pairs, seed=1)
    train, _ = examples(tokenizer, 60000, args.pairs, seed=2)
    n_recall = round(args.batch_size * args.recall_share)
    recall = recall_examples(tokenizer, 60000, args.pairs, seed=4) if n_recall else []
    print(f"guessing a listed colour: {guess:.3f} held-out accuracy")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 50))  # warm-up
    rng = random.Random(3)
    history: list[dict[str, float]] = []
    smoothed: float | None = None
    begin = time.perf_counter()
    print(f"{'step':>6}{'train loss':>12}{'held-out acc':>14}{'seconds':>9}")
    for step in range(1, args.steps + 1):
        ids, labels, mask = batch(rng.sample(recall, n_recall) + rng.sample(train, args.batch_size - n_recall))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % args.eval_every == 0 or step == args.steps:
            row = {"step": step, "train_loss": round(smoothed, 4), "heldout_accuracy": accuracy(model, test),
                   "seconds": round(time.perf_counter() - begin, 1)}
            history.append(row)
            print(f"{step:>6}{row['train_loss']:>12.3f}{row['heldout_accuracy']:>14.3f}{row['seconds']:>9.0f}",
                  flush=True)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "llm": config.to_diff_dict(),
              "listed_colour_guess_accuracy": round(guess, 4), "history": history}
    (args.out / "lookup_plateau.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
