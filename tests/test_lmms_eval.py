"""lmms-eval's `--model dynamic_llava` (dynamic_llava/eval/lmms_eval_model.py) end to end, offline: the bundled demo
model on two local tasks over its sample images (tests/fixtures/lmms_tasks), in process and under
`accelerate launch` with two processes. Answers must be model_vqa_loader's, multiple-choice picks the model's own
answers, likelihoods those of the KV-cache scoring path, and the efficiency figures the runner's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # CI installs the lmms extra (.ci/run): there a missing lmms-eval is an error
    pytest.importorskip("lmms_eval")

import dynamic_llava  # noqa: E402
from dynamic_llava.eval import model_vqa_loader  # noqa: E402
from dynamic_llava.eval.generation_ability import teacher_forced_nll  # noqa: E402
from dynamic_llava.eval.lmms_eval_model import STAT_KEYS, DynamicLlava  # noqa: E402
from dynamic_llava.mm_utils import tokenizer_image_token  # noqa: E402
from dynamic_llava.model.loading import load_pretrained_model  # noqa: E402
from dynamic_llava.prompting import prepare_request  # noqa: E402

PACKAGE = Path(dynamic_llava.__file__).parent
DEMO = PACKAGE / "assets" / "demo_model"
SAMPLES = PACKAGE / "assets" / "samples"
TASKS = Path(__file__).parent / "fixtures" / "lmms_tasks"
VQA, MC = "dynamic_llava_demo_vqa", "dynamic_llava_demo_mc"
KEEP = 0.5  # not the demo model's own 0.2: the model_args must reach the model
MODEL_ARGS = f"pretrained={DEMO},conv_template=vicuna_v1,vision_keep_rate={KEEP},dtype=float32"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _efficiency(folder: Path) -> tuple[dict, list[dict]]:
    """The totals and per-request lines written under efficiency_path (lmms-eval's model folder)."""
    (totals,) = folder.glob("*/*_dynamic_llava_efficiency.json")
    (samples,) = folder.glob("*/*_dynamic_llava_efficiency_samples.jsonl")
    return json.loads(totals.read_text()), _jsonl(samples)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """model_vqa_loader's answers to the bundled questions (batch size 1), by question id."""
    answers = tmp_path_factory.mktemp("runner") / "answers.jsonl"
    assert model_vqa_loader.main([
        "--model-path", str(DEMO), "--question-file", str(SAMPLES / "questions.jsonl"), "--image-folder",
        str(SAMPLES), "--answers-file", str(answers), "--conv-mode", "vicuna_v1", "--temperature", "0",
        "--max_new_tokens", "16", "--vision-keep-rate", str(KEEP), "--device", "cpu", "--dtype", "float32"]) == 0
    return {a["question_id"]: a for a in _jsonl(answers)}


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """lmms-eval's simple_evaluate on both tasks, the model named as on the command line, batch size 4."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    out = tmp_path_factory.mktemp("lmms")
    results = simple_evaluate(model="dynamic_llava", model_args=f"{MODEL_ARGS},device=cpu,efficiency_path={out}",
                              tasks=[VQA, MC], batch_size=4, task_manager=TaskManager(include_path=str(TASKS)),
                              log_samples=True, bootstrap_iters=0)
    return results, out


def _mc_docs() -> list[dict]:
    return _jsonl(TASKS / "dynamic_llava_demo_mc.jsonl")


def test_the_entry_point_registers_the_model() -> None:
    from lmms_eval.models import get_model

    assert get_model("dynamic_llava") is DynamicLlava


def test_generate_until_gives_the_runners_answers(evaluation: tuple[dict, Path], reference: dict[str, dict]) -> None:
    results, _ = evaluation
    samples = results["samples"][VQA]
    answers = {s["doc"]["question_id"]: s["filtered_resps"][0] for s in samples}
    assert answers == {qid: a["text"] for qid, a in reference.items()}
    right = [a["text"].lower() == s["doc"]["answer"].lower() for s in samples for a in [reference[s["doc"]["question_id"]]]]
    assert results["results"][VQA]["exact_match,none"] == pytest.approx(sum(right) / len(right))
    assert 0 < sum(right) < len(right)  # the comparison covers right and wrong answers


def test_efficiency_figures_are_the_runners_and_add_up(evaluation: tuple[dict, Path],
                                                       reference: dict[str, dict]) -> None:
    results, out = evaluation
    totals, lines = _efficiency(out)
    questions = _jsonl(SAMPLES / "questions.jsonl")
    generated = {line["doc_id"]: line for line in lines if line["task"] == VQA}
    assert sorted(generated) == list(range(len(questions)))
    for doc_id, line in generated.items():
        assert {k: line[k] for k in STAT_KEYS} == {k: reference[questions[doc_id]["question_id"]]["metadata"][k]
                                                   for k in STAT_KEYS}
        assert line["image_tokens_kept"] == KEEP * line["image_tokens"]
    scored = [line for line in lines if line["task"] == MC]
    assert sorted((line["doc_id"], line["choice"]) for line in scored) == \
        [(d, c) for d, doc in enumerate(_mc_docs()) for c in range(len(doc["choices"]))]
    assert all(0 < line["kv_cache_bytes"] < line["kv_cache_bytes_dense"] for line in scored)
    assert all(line["image_tokens_kept"] == KEEP * line["image_tokens"] for line in scored)
    for scope, part in [("all", lines), *[(task, [x for x in lines if x["task"] == task]) for task in (VQA, MC)]]:
        figures = totals["all"] if scope == "all" else totals["tasks"][scope]
        assert figures["requests"] == len(part)
        assert all(figures[k] == sum(x[k] for x in part) for k in STAT_KEYS)
    assert totals["sparse_config"]["vision_keep_rate"] == KEEP
    assert results["throughput"]["avg_image_keep_ratio"] == KEEP  # also in lmms-eval's own results
    assert results["throughput"]["avg_image_tokens_kept"] == KEEP * 64


def test_multiple_choice_picks_the_models_answer_with_the_cache_paths_likelihoods(
        evaluation: tuple[dict, Path], reference: dict[str, dict]) -> None:
    results, _ = evaluation
    docs = _mc_docs()
    tokenizer, model, processor, _ = load_pretrained_model(DEMO, device="cpu", dtype="float32", vision_keep_rate=KEEP)
    picks = []
    for sample in sorted(results["samples"][MC], key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        nlls = [nll for nll, _ in sample["filtered_resps"]]
        pick = min(range(len(nlls)), key=nlls.__getitem__)
        # the answer the model generates for the same question (one token): the likeliest choice
        assert doc["choices"][pick] == reference[doc["question_id"]]["text"]
        request = prepare_request(doc["text"], [SAMPLES / doc["image"]], tokenizer, processor, model.config,
                                  "vicuna_v1")
        for choice, nll in zip(doc["choices"], nlls):
            ids = tokenizer_image_token(request.prompt + " " + choice, tokenizer, return_tensors="pt")
            cached, _, _ = teacher_forced_nll(model, request.input_ids, request.pixel_values,
                                              ids[len(request.input_ids):].tolist())
            assert nll == pytest.approx(sum(cached), abs=1e-4)
        picks.append(pick == doc["answer"])
    assert results["results"][MC]["acc,none"] == pytest.approx(sum(picks) / len(picks))
    assert 0 < sum(picks) < len(picks)  # one pick follows the model against the truth


@pytest.mark.parametrize("extra, message", [
    (",vision_keep_rate=1.5", "vision_keep_rate must be in (0, 1]"),
    (",vision_policy=oracle", "vision_policy must be one of"),
    (",colour=red", "unknown model_args for dynamic_llava: colour"),
    (",conv_template=nope", "unknown conversation template 'nope'"),
    (",dtype=float64", "unknown dtype 'float64'"),
])
def test_bad_model_args_exit_2_with_one_message(extra: str, message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        DynamicLlava.create_from_arg_string(f"pretrained={DEMO},device=cpu{extra}")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_accelerate_launch_shards_documents_and_gathers_the_figures(
        tmp_path: Path, evaluation: tuple[dict, Path]) -> None:
    with socket.socket() as probe:  # a free port for the two processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    # --multi_gpu is accelerate's torchrun launcher (--cpu alone starts one process); CPU-only processes here
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), "-m", "lmms_eval", "--model", "dynamic_llava", "--model_args",
               f"{MODEL_ARGS},efficiency_path={out}", "--include_path", str(TASKS), "--tasks", f"{VQA},{MC}",
               "--batch_size", "4", "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    single, _ = evaluation
    for task in (VQA, MC):
        (samples_file,) = out.glob(f"*/*_samples_{task}.jsonl")
        assert sorted(s["doc_id"] for s in _jsonl(samples_file)) == sorted(s["doc_id"] for s in single["samples"][task])
    (samples_file,) = out.glob(f"*/*_samples_{VQA}.jsonl")
    assert {s["doc_id"]: s["filtered_resps"] for s in _jsonl(samples_file)} == \
        {s["doc_id"]: s["filtered_resps"][0] for s in single["samples"][VQA]}
    (results_file,) = out.glob("*/*_results.json")
    results = json.loads(results_file.read_text())["results"]
    for task, metric in [(VQA, "exact_match,none"), (MC, "acc,none")]:
        assert results[task][metric] == pytest.approx(single["results"][task][metric])
    _, lines = _efficiency(out)
    assert {line["rank"] for line in lines} == {0, 1}  # each process answered its share, rank 0 wrote them all
    assert sorted((line["task"], line["doc_id"], line.get("choice")) for line in lines) == sorted(
        (line["task"], line["doc_id"], line.get("choice")) for line in _efficiency(evaluation[1])[1])
