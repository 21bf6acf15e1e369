"""Training end to end on generated data: Dynamic-LLaVA sparsification, the LLaVA stages, resume,
the seeds' flags, bad input, and a 2-process (gloo) run."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dynamic_llava.model.loading import load_clip, load_pretrained_model
from dynamic_llava.model.sparsity_training import gumbel_tau
from dynamic_llava.tiny.checkpoint import make_tiny_checkpoint
from dynamic_llava.tiny.vision_tower import write_tiny_clip_tower
from dynamic_llava.train.train import main, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny LLaVA and plain-LLM checkpoints with a 112-px tower (64 image tokens, for speed), 16 image
    samples whose long answers name the image's colour, and 2 text-only samples."""
    root = tmp_path_factory.mktemp("train")
    for ckpt, fmt in (("llava", "llava"), ("llm", "llm")):
        make_tiny_checkpoint(root / ckpt, fmt=fmt, seed=0)
        shutil.rmtree(root / ckpt / "vision_tower")
        write_tiny_clip_tower(root / ckpt / "vision_tower", seed=0, image_size=112)
    (root / "img").mkdir()
    rng = random.Random(0)
    records, captions = [], []
    for i in range(16):
        colour = rng.choice(COLOURS)
        Image.new("RGB", (40, 30), colour).save(root / "img" / f"{i}.png")
        answer = " ".join([f"the square is {colour}"] * 4)  # 16+ tokens: output-text decisions happen
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": answer}]})
        captions.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {colour} square"}]})
    records += [{"id": f"t{i}", "conversations": [{"from": "human", "value": "hello"},
                                                   {"from": "gpt", "value": "hi there"}]} for i in range(2)]
    (root / "data.json").write_text(json.dumps(records))
    (root / "pretrain.json").write_text(json.dumps(captions))
    return root


def _common(work: Path, out: Path) -> list[str]:
    return ["--data_path", str(work / "data.json"), "--image_folder", str(work / "img"), "--output_dir", str(out),
            "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--image_aspect_ratio", "pad",
            "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False", "--model_max_length", "512",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none",
            "--dataloader_num_workers", "0", "--save_strategy", "no", "--seed", "0"]


def _sparse_args(work: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(work / "llava"), "--version", "v1", "--requires_image", "True",
            *_common(work, out), "--learning_rate", "1e-4", "--predictor_lr", "1e-2", "--warmup_ratio", "0",
            "--lr_scheduler_type", "constant", "--vision_keep_rate", "0.2", "--output_text_keep_rate", "0.5",
            "--output_text_len_for_training", "8", "--mask_loss_weight", "100", "--gumbel_start_tau", "1.0",
            "--gumbel_end_tau", "0.1", *extra]


def test_sparsification_training_learns_the_keep_rates(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    before = load_file(work / "llava" / "model.safetensors")
    trainer = train(_sparse_args(work, out, "--num_train_epochs", "3", "--gradient_checkpointing", "True",
                                 "--report_to", "tensorboard"), sparse=True)
    assert list((out / "runs").rglob("events.out.tfevents.*"))  # offline TensorBoard logs
    logs = [entry for entry in trainer.state.log_history if "vision_keep" in entry]
    assert len(logs) == trainer.state.max_steps == 24  # 16 image samples (text-only ones filtered), batch 2
    # the regulariser pulls the actual keep rates toward the targets
    first, last = logs[:3], logs[-3:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert abs(mean(last, "vision_keep") - 0.2) < abs(mean(first, "vision_keep") - 0.2) - 0.1
    assert abs(mean(last, "output_keep") - 0.5) < 0.2
    assert mean(last, "loss") < mean(first, "loss")
    # tau decays exponentially per optimiser step; both learning rates are logged
    for entry in logs:
        assert entry["tau"] == pytest.approx(gumbel_tau(entry["step"] - 1, 24, 1.0, 0.1), rel=1e-4)
        assert entry["predictor_lr"] == pytest.approx(1e-2) and entry["learning_rate"] == pytest.approx(1e-4)
    # predictors and LLM trained, the vision tower did not
    after = load_file(out / "model.safetensors")
    assert not any(k.startswith("model.vision_tower.") for k in after)
    changed = lambda prefix: any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))  # noqa: E731
    assert changed("model.image_score_predictor.") and changed("model.output_text_score_predictor.")
    assert changed("model.layers.")
    tower = trainer.core_model.model.vision_tower.vision_tower.state_dict()
    original = load_clip(work / "llava" / "vision_tower").state_dict()
    assert all(torch.equal(tower[k], original[k]) for k in original)
    # the output is a Dynamic-LLaVA checkpoint that loads with its sparse_config
    _, model, _, _ = load_pretrained_model(out)
    assert model.sparse.vision_keep_rate == 0.2 and model.sparse.output_text_len_for_training == 8
    torch.testing.assert_close(model.model.image_score_predictor.output_mlp[-1].weight,
                               after["model.image_score_predictor.output_mlp.4.weight"])


def test_llava_stages_pretrain_finetune_and_lora(work: Path, tmp_path: Path) -> None:
    llm = ["--model_name_or_path", str(work / "llm"), "--vision_tower", str(work / "llm" / "vision_tower")]
    stage1 = tmp_path / "stage1"
    common1 = [a if a != str(work / "data.json") else str(work / "pretrain.json") for a in _common(work, stage1)]
    train([*llm, "--version", "plain", "--tune_mm_mlp_adapter", "True", *common1, "--learning_rate", "1e-3",
           "--num_train_epochs", "1"])
    projector = torch.load(stage1 / "mm_projector.bin", weights_only=True)
    assert sorted(projector) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                 "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert json.loads((stage1 / "config.json").read_text())["mm_projector_type"] == "mlp2x_gelu"

    stage2 = tmp_path / "stage2"
    train([*llm, "--version", "v1", "--pretrain_mm_mlp_adapter", str(stage1 / "mm_projector.bin"),
           *_common(work, stage2), "--learning_rate", "1e-3", "--max_steps", "2", "--group_by_modality_length", "True"])
    config = json.loads((stage2 / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and "sparse_config" not in config  # a dense LLaVA-1.5
    weights = load_file(stage2 / "model.safetensors")
    assert not any("score_predictor" in k or "vision_tower" in k for k in weights)
    _, model, _, _ = load_pretrained_model(stage2, sparse=False)
    assert model.config.mm_vision_tower == str(work / "llm" / "vision_tower")

    lora = tmp_path / "lora"
    train([*llm, "--version", "v1", "--pretrain_mm_mlp_adapter", str(stage1 / "mm_projector.bin"),
           *_common(work, lora), "--learning_rate", "1e-2", "--max_steps", "2", "--lora_enable", "True",
           "--lora_r", "4", "--lora_alpha", "8", "--mm_projector_lr", "1e-3"])
    assert {"adapter_config.json", "non_lora_trainables.bin", "config.json"} <= {p.name for p in lora.iterdir()}
    non_lora = torch.load(lora / "non_lora_trainables.bin", weights_only=True)
    assert non_lora and all(k.startswith("base_model.model.model.mm_projector.") for k in non_lora)
    ids = [torch.tensor([1, 20, 30, 40])]  # text only: the difference can only come from the LoRA weights
    _, merged, _, _ = load_pretrained_model(lora, model_base=work / "llm", sparse=False)
    _, base, _, _ = load_pretrained_model(stage1, model_base=work / "llm", sparse=False)
    with torch.no_grad():
        assert (merged.forward_full(ids).logits - base.forward_full(ids).logits).abs().max() > 1e-3


def test_unfrozen_vision_tower_trains_and_travels_with_the_checkpoint(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "tower"
    tower_dir = work / "llm" / "vision_tower"
    train(["--model_name_or_path", str(work / "llm"), "--vision_tower", str(tower_dir), "--version", "v1",
           *_common(work, out), "--learning_rate", "1e-3", "--max_steps", "2", "--unfreeze_mm_vision_tower", "True"])
    assert json.loads((out / "config.json").read_text())["mm_vision_tower"] == "vision_tower"
    _, model, _, _ = load_pretrained_model(out, sparse=False)
    trained, original = model.model.vision_tower.vision_tower.state_dict(), load_clip(tower_dir).state_dict()
    assert trained.keys() == original.keys()
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    assert main(["--model_name_or_path", str(work / "llm"), "--vision_tower", str(tower_dir),
                 *_common(work, tmp_path / "x"), "--unfreeze_mm_vision_tower", "True", "--lora_enable", "True"]) == 2


def test_sorted_accumulated_micro_batches_take_the_big_batch_step(work: Path, tmp_path: Path) -> None:
    """One SGD step over 8 samples of different answer lengths: as one batch, or as 4 length-sorted
    micro-batches of 2 (each normalised by the step's target count, not its own) gives the same weights."""
    records = [{"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": " ".join(["the square is red"] * (1 + i % 5))}]} for i in range(8)]
    (tmp_path / "varied.json").write_text(json.dumps(records))

    def one_step(out: Path, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
        args = ["--model_name_or_path", str(work / "llava"), "--version", "v1", *_common(work, out),
                "--data_path", str(tmp_path / "varied.json"), "--per_device_train_batch_size", str(batch),
                "--gradient_accumulation_steps", str(accumulation), "--sort_micro_batches_by_length", "True",
                "--optim", "sgd", "--learning_rate", "0.5", "--warmup_ratio", "0", "--lr_scheduler_type",
                "constant", "--max_steps", "1", "--max_grad_norm", "0"]
        train(args)
        return load_file(out / "model.safetensors")

    whole, accumulated = one_step(tmp_path / "whole", 8, 1), one_step(tmp_path / "micro", 2, 4)
    start = load_file(work / "llava" / "model.safetensors")
    moved = [k for k in whole if not torch.equal(whole[k], start[k])]
    assert "lm_head.weight" in moved
    for key in moved:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-4, atol=1e-6)


def test_dense_training_on_image_token_subsets(work: Path, tmp_path: Path, monkeypatch) -> None:
    """`--image_token_subsets` hands each sample's subset to the model's training forward (which drops the other
    image tokens: test_training_forward); sparsification training refuses it before any work."""
    from dynamic_llava.model.llava import DynamicLlavaForCausalLM

    records = json.loads((work / "data.json").read_text())
    for i, record in enumerate(records[:16]):
        record["image_token_subset"] = list(range(i, 64, 8))
    (tmp_path / "subsets.json").write_text(json.dumps(records))
    seen: list = []
    forward = DynamicLlavaForCausalLM.forward

    def recording(self, *args, image_token_subsets=None, **kwargs):
        seen.extend(image_token_subsets or [])
        return forward(self, *args, image_token_subsets=image_token_subsets, **kwargs)

    monkeypatch.setattr(DynamicLlavaForCausalLM, "forward", recording)
    args = ["--model_name_or_path", str(work / "llava"), "--version", "v1", *_common(work, tmp_path / "dense"),
            "--data_path", str(tmp_path / "subsets.json"), "--learning_rate", "1e-3", "--num_train_epochs", "1"]
    train([*args, "--image_token_subsets", "True"])
    assert sorted(s[0][0] for s in seen if s is not None) == list(range(16))  # every image sample, once
    assert seen.count(None) == 2  # the text-only samples
    seen.clear()
    train([*args, "--image_token_subsets", "False"])
    assert not seen
    assert main(_sparse_args(work, tmp_path / "sparse", "--data_path", str(tmp_path / "subsets.json"),
                             "--image_token_subsets", "True"), sparse=True) == 2
    assert not (tmp_path / "sparse").exists()


def _noise_free_keep(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """gumbel_keep without the noise: the same decisions for a sample in any batch."""
    soft = torch.softmax(torch.log_softmax(logits.float(), dim=-1) / tau, dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 0]


def test_sparse_accumulated_micro_batches_take_the_big_batch_step(work: Path, tmp_path: Path, monkeypatch) -> None:
    """Sparsification training, one SGD step over 8 samples whose answers are short (no output decisions)
    or long: as one batch or as 4 length-sorted micro-batches of 2, the LLM and both predictors move
    alike. Each sample's keep-rate terms weigh 1/8 of the step, whatever its micro-batch's token count."""
    from dynamic_llava.model import sparsity_training

    monkeypatch.setattr(sparsity_training, "gumbel_keep", _noise_free_keep)
    records = [{"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": " ".join(["the square is red"] * (1 + i % 5))}]} for i in range(8)]
    (tmp_path / "varied.json").write_text(json.dumps(records))

    def one_step(out: Path, batch: int, accumulation: int) -> dict[str, torch.Tensor]:
        train(_sparse_args(work, out, "--data_path", str(tmp_path / "varied.json"),
                           "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps",
                           str(accumulation), "--sort_micro_batches_by_length", "True", "--optim", "sgd",
                           "--learning_rate", "0.1", "--predictor_lr", "0.1", "--max_steps", "1",
                           "--max_grad_norm", "0"), sparse=True)
        return load_file(out / "model.safetensors")

    whole, accumulated = one_step(tmp_path / "whole", 8, 1), one_step(tmp_path / "micro", 2, 4)
    start = load_file(work / "llava" / "model.safetensors")
    moved = [k for k in whole if k not in start or not torch.equal(whole[k], start[k])]
    assert "lm_head.weight" in moved
    assert any("image_score_predictor" in k for k in moved)
    assert any("output_text_score_predictor" in k for k in moved)
    for key in moved:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-4, atol=1e-6)


def test_resume_from_checkpoint_continues_exactly(work: Path, tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = lambda out: _sparse_args(work, out, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")  # noqa: E731
    train(args(straight), sparse=True)
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")  # as if stopped after step 2
    trainer = train([*args(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-2")], sparse=True)
    assert trainer.state.global_step == 4
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    last = lambda run: [e for e in json.loads((run / "trainer_state.json").read_text())["log_history"] if "tau" in e][-1]  # noqa: E731
    assert last(resumed) == last(straight)


def test_the_seed_command_parses_with_its_meaning(work: Path, tmp_path: Path) -> None:
    script = (ROOT / "scripts" / "train_dynamic_llava_7b.sh").read_text()
    flags = script[script.index("--deepspeed"):].replace("\\\n", " ").split()
    flags = [f for f in flags if f != '"$@"']
    values = {"--model_name_or_path": str(work / "llava"), "--data_path": str(work / "data.json"),
              "--image_folder": str(work / "img"), "--output_dir": str(tmp_path / "o")}
    for i, flag in enumerate(flags[:-1]):
        if flag in values:
            flags[i + 1] = values[flag]
        if flag == "--deepspeed":
            flags[i + 1] = str(ROOT / "scripts" / "zero3.json")
    flags = [f.strip('"') for f in flags]
    if "--deepspeed" in flags:  # DeepSpeed is not needed to check the meaning of the other flags
        i = flags.index("--deepspeed")
        del flags[i:i + 2]
    model_args, data_args, training_args, sparse_args = parse_args(flags)
    assert training_args.predictor_lr == 2e-4 and training_args.warmup_steps == 0.03
    assert training_args.eval_strategy == "no" and training_args.gradient_checkpointing
    assert sparse_args.vision_keep_rate == 0.2 and sparse_args.output_text_keep_rate == 0.5
    assert sparse_args.output_text_len_for_training == 50 and sparse_args.mask_loss_weight == 100.0
    assert data_args.requires_image and model_args.mm_projector_type == "mlp2x_gelu"


def test_predictor_lr_defaults_to_the_reference_not_the_llm_lr(work: Path, tmp_path: Path) -> None:
    """A hand-written run without --predictor_lr trains the predictors at the reference's 3e-4."""
    _, _, training_args, _ = parse_args(["--model_name_or_path", str(work / "llava"), *_common(work, tmp_path / "o"),
                                         "--learning_rate", "5e-6"])
    assert training_args.predictor_lr == 3e-4 and training_args.learning_rate == 5e-6


_FAKE_DEEPSPEED = """#!{python}
# Stands in for the `deepspeed` launcher (not installable here): runs the module in this process,
# without the --deepspeed config. Everything else on the script's command line reaches the trainer.
import runpy, sys
args = sys.argv[1:]
assert args[0] == "--module", args
module, rest = args[1], args[2:]
if "--deepspeed" in rest:
    i = rest.index("--deepspeed")
    del rest[i:i + 2]
sys.argv = [module, *rest]
runpy.run_module(module, run_name="__main__")
"""


def test_the_seed_script_runs(work: Path, tmp_path: Path) -> None:
    """scripts/train_dynamic_llava_7b.sh with its paths filled in, two steps on the tiny model."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "deepspeed"
    launcher.write_text(_FAKE_DEEPSPEED.format(python=sys.executable))
    launcher.chmod(0o755)
    out = tmp_path / "seed"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MODEL_PATH": str(work / "llava"),
           "DATA_PATH": str(work / "data.json"), "IMAGE_FOLDER": str(work / "img"),
           "VISION_TOWER": str(work / "llava" / "vision_tower"), "OUTPUT_DIR": str(out), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", "scripts/train_dynamic_llava_7b.sh", "--max_steps", "2",
                             "--per_device_train_batch_size", "2", "--report_to", "none",
                             "--dataloader_num_workers", "0"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    _, model, _, _ = load_pretrained_model(out)
    assert model.sparse.vision_keep_rate == 0.2 and model.sparse.output_text_len_for_training == 50


@pytest.mark.parametrize("broken, message", [
    ("--data_path", "does-not-exist.json"), ("--image_folder", "no-such-folder"),
    ("--model_name_or_path", "no-such-model")])
def test_missing_inputs_fail_fast_with_one_message(work: Path, tmp_path: Path, capsys, broken: str,
                                                   message: str) -> None:
    args = _sparse_args(work, tmp_path / "out", "--max_steps", "1")
    args[args.index(broken) + 1] = str(tmp_path / message)
    assert main(args, sparse=True) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_two_sample_orders_at_once_are_refused(work: Path, tmp_path: Path, capsys) -> None:
    args = _sparse_args(work, tmp_path / "out", "--max_steps", "1", "--group_by_modality_length", "True",
                        "--sort_micro_batches_by_length", "True")
    assert main(args, sparse=True) == 2
    err = capsys.readouterr().err
    assert "choose one" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


_LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                 "127.0.0.1", "--master_port", "29531", "-m"],
    # the multi-GPU launcher runs on the CPU when there is no GPU (its --cpu mode wants an MPI hostfile)
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_ip", "127.0.0.1", "--main_process_port", "29532", "-m"],
}


@pytest.mark.parametrize("launcher", sorted(_LAUNCHERS))
def test_two_process_gloo_run_writes_the_same_kind_of_checkpoint(work: Path, tmp_path: Path, launcher: str) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    command = [*_LAUNCHERS[launcher], "dynamic_llava.train.train_sparse", *_sparse_args(work, out, "--max_steps", "2")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es), MULTI_CPU" in result.stderr  # DDP, not two lone processes
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert state["epoch"] == pytest.approx(0.5)  # 2 ranks x batch 2 x 2 steps = half of the 16 image samples
    _, model, _, _ = load_pretrained_model(out)
    assert model.sparse.output_text_len_for_training == 8


def test_deepspeed_zero3_two_processes(work: Path, tmp_path: Path) -> None:
    """The seeds' engine: DeepSpeed ZeRO-3 (CPU accelerator, gloo) under torchrun, full weights gathered on save."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}  # DeepSpeed compiles its CPU comm op here
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
               "127.0.0.1", "--master_port", "29533", "-m", "dynamic_llava.train.train_sparse",
               *_sparse_args(work, out, "--max_steps", "2", "--bf16", "True", "--mm_use_im_patch_token", "False",
                             "--deepspeed", str(ROOT / "scripts" / "zero3.json"))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training on 2 process(es), DEEPSPEED" in result.stderr
    before, after = load_file(work / "llava" / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}  # not partitions
    assert any(not torch.equal(after[k].float(), before[k].float()) for k in before if "score_predictor" in k)
    _, model, _, _ = load_pretrained_model(out)
    assert model.sparse.output_text_len_for_training == 8
