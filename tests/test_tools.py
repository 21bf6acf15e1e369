"""Checkpoint tools (extract_mm_projector, apply_delta, consolidate, merge_lora_weights) on tiny checkpoints
in the real on-disk layouts; the DeepSpeed configs and the training run scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dynamic_llava.constants import IMAGE_TOKEN_INDEX
from dynamic_llava.model.checkpoint_files import iter_shards, save_state_dict
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.tools import (
    apply_delta,
    consolidate,
    extract_mm_projector,
    merge_lora_weights,
)

REPO = Path(__file__).resolve().parents[1]
PROMPT = "A chat between a curious user and an artificial intelligence assistant. USER: "
QUESTION = "\nWhat is in the image? ASSISTANT:"
TOWER_PREFIX = "model.vision_tower.vision_tower."


# ----------------------------------------------------------------------------- helpers
def _weights(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in iter_shards(path):
        state.update(shard)
    return state


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _logits(*load_args: Path, sparse: bool | None = None) -> torch.Tensor:
    """Logits of an image prompt; in sparse mode rows of tokens the predictors dropped are not finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer, model, processor, _ = load_pretrained_model(*load_args, sparse=sparse)
    ids = tokenizer(PROMPT).input_ids + [IMAGE_TOKEN_INDEX] + tokenizer(QUESTION, add_special_tokens=False).input_ids
    array = (np.random.RandomState(0).rand(240, 320, 3) * 255).astype("uint8")
    pixels = processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.forward_full([ids], images=[pixels]).logits[0]


def _checkpoint_copy(src: Path, dst: Path) -> Path:
    """`src` without its weights (config, tokenizer, tower folder)."""
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model*.safetensors*")))


def _save_bin_shards(state: dict[str, torch.Tensor], out: Path, shards: int = 2) -> None:
    """Sharded `pytorch_model-*.bin` files with their index, as DeepSpeed / old transformers save them."""
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        keys = names[i::shards]
        torch.save({k: state[k] for k in keys}, out / file)
        weight_map |= dict.fromkeys(keys, file)
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _run_tool(tool: ModuleType, argv: list[str | Path], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = tool.main([str(a) for a in argv])
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- extract_mm_projector
@pytest.mark.parametrize("fmt", ["safetensors", "sharded-bin", "legacy-bin"])
def test_extract_mm_projector_writes_exactly_the_projector(tiny_llava_dir: Path, tmp_path: Path, fmt: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    state = load_file(tiny_llava_dir / "model.safetensors")
    ckpt = tiny_llava_dir
    if fmt == "sharded-bin":
        ckpt = _checkpoint_copy(tiny_llava_dir, tmp_path / "bin")
        _save_bin_shards(state, ckpt)
    elif fmt == "legacy-bin":  # the pre-zip torch format cannot be memory-mapped
        ckpt = _checkpoint_copy(tiny_llava_dir, tmp_path / "bin")
        torch.save(state, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    out = tmp_path / "stage1" / "mm_projector.bin"
    code, err = _run_tool(extract_mm_projector, ["--model-path", ckpt, "--output", out], capsys)
    assert code == 0, err
    projector = torch.load(out, weights_only=True)
    expected = {k: v for k, v in state.items() if k.startswith("model.mm_projector.")}
    assert sorted(expected) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    _assert_same(projector, expected)
    assert [p.name for p in out.parent.iterdir()] == ["mm_projector.bin"]  # no temp file left behind


# ----------------------------------------------------------------------------- apply_delta
def _quantized(tensor: torch.Tensor) -> torch.Tensor:
    """Multiples of 2^-12 below 2^8: float32 sums and differences of these are exact, so base + (target -
    base) must give back the target bit for bit."""
    return (tensor.clamp(-100, 100) * 4096).round() / 4096


@pytest.mark.parametrize("extra_rows", [0, 3])
def test_apply_delta_reproduces_the_target(tiny_llava_dir: Path, tmp_path: Path, extra_rows: int,
                                           capsys: pytest.CaptureFixture) -> None:
    target = {k: _quantized(v) for k, v in load_file(tiny_llava_dir / "model.safetensors").items()}
    # The base: a plain LLaMA (no projector, no predictors), `extra_rows` fewer vocabulary rows, sharded .bin.
    generator = torch.Generator().manual_seed(1)
    base = {}
    for name, tensor in target.items():
        if "mm_projector" in name or "predictor" in name:
            continue
        shape = list(tensor.shape)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            shape[0] -= extra_rows
        base[name] = _quantized(torch.randn(shape, generator=generator) * 0.1)
    base["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # only in the base: ignored
    base_dir = tmp_path / "llama"
    base_dir.mkdir()
    _save_bin_shards(base, base_dir)
    (base_dir / "config.json").write_text(json.dumps(
        json.loads((tiny_llava_dir / "config.json").read_text()) | {"model_type": "llama"}))

    delta = {}
    for name, tensor in target.items():
        delta[name] = tensor.clone()
        if name in base:
            delta[name][: base[name].shape[0]] -= base[name]
    delta_dir = _checkpoint_copy(tiny_llava_dir, tmp_path / "delta")
    save_state_dict(delta, delta_dir, max_shard_size="300KB")
    assert (delta_dir / "model.safetensors.index.json").is_file()

    out = tmp_path / "llava"
    # LLaVA's README spells the flags --base/--target/--delta (argparse prefixes of the full names)
    flags = ["--base", "--target", "--delta"] if extra_rows else ["--base-model-path", "--target-model-path",
                                                                  "--delta-path"]
    code, err = _run_tool(apply_delta, [flags[0], base_dir, flags[1], out, flags[2], delta_dir], capsys)
    assert code == 0, err
    _assert_same(_weights(out), target)
    assert json.loads((out / "config.json").read_text()) == json.loads((delta_dir / "config.json").read_text())
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == sorted(
        p.name for p in delta_dir.glob("model-*.safetensors"))
    assert torch.isfinite(_logits(out)[-1]).all()


def test_apply_delta_refuses_a_base_of_other_shapes(tiny_llava_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    base_dir = tmp_path / "llama"
    base_dir.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(8, 8)}, base_dir / "model.safetensors")
    out = tmp_path / "out"
    code, err = _run_tool(apply_delta, ["--base-model-path", base_dir, "--target-model-path", out,
                                        "--delta-path", tiny_llava_dir], capsys)
    assert code == 2 and "q_proj" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


# ----------------------------------------------------------------------------- consolidate
def test_consolidate_strips_the_tower_deepspeed_saved(tiny_llava_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    state = load_file(tiny_llava_dir / "model.safetensors")
    tower = load_file(tiny_llava_dir / "vision_tower" / "model.safetensors")
    saved = state | {TOWER_PREFIX + k: v for k, v in tower.items()}
    saved["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    src = _checkpoint_copy(tiny_llava_dir, tmp_path / "deepspeed")
    _save_bin_shards(saved, src, shards=3)

    out = tmp_path / "consolidated"
    code, err = _run_tool(consolidate, ["--src", src, "--dst", out], capsys)
    assert code == 0, err
    _assert_same(_weights(out), state)
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    torch.testing.assert_close(_logits(out), _logits(tiny_llava_dir), rtol=0, atol=0, equal_nan=True)

    # nothing to strip: the same weights again
    again = tmp_path / "again"
    code, err = _run_tool(consolidate, ["--src", tiny_llava_dir, "--dst", again], capsys)
    assert code == 0, err
    _assert_same(_weights(again), state)


# ----------------------------------------------------------------------------- merge_lora_weights
def _lora_checkpoint(base: Path, out: Path) -> Path:
    """A LoRA folder as LLaVA's LoRA training writes it: PEFT adapter files, `non_lora_trainables.bin`
    (the trained projector, with PEFT's `base_model.model.` prefix) and the model's config.json."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, model, _, _ = load_pretrained_model(base)
    projector = {f"base_model.model.{k}": v.detach() + 0.5 for k, v in model.state_dict().items()
                 if "mm_projector" in k}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter change something
                param.normal_(std=0.1, generator=torch.Generator().manual_seed(2))
    lora.save_pretrained(out)
    torch.save(projector, out / "non_lora_trainables.bin")
    shutil.copy(base / "config.json", out)
    return out


@pytest.mark.parametrize("fixture", ["tiny_llava_dir", "tiny_llava_nopred_dir"])
def test_merge_lora_weights_gives_the_lora_logits(fixture: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  request: pytest.FixtureRequest) -> None:
    base = request.getfixturevalue(fixture)
    dynamic = fixture == "tiny_llava_dir"  # else a plain LLaVA-1.5 LoRA: no predictors in or out
    lora = _lora_checkpoint(base, tmp_path / "lora")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in lora.iterdir()}
    out = tmp_path / "merged"
    with warnings.catch_warnings():
        # the predictors' fresh initialisation is not reported: they are not saved for plain LLaVA
        warnings.filterwarnings("error", message=".*predictor weights")
        code, err = _run_tool(merge_lora_weights, ["--model-path", lora, "--model-base", base,
                                                   "--save-model-path", out], capsys)
    assert code == 0, err
    assert not (out / "adapter_config.json").exists()
    sparse = None if dynamic else False  # random fresh predictors differ per load: compare dense logits
    merged, lora_logits, base_logits = (_logits(out, sparse=sparse), _logits(lora, base, sparse=sparse),
                                        _logits(base, sparse=sparse))
    torch.testing.assert_close(merged, lora_logits, rtol=0, atol=1e-5, equal_nan=True)
    assert not torch.allclose(merged[-1], base_logits[-1], atol=1e-2)
    assert ("sparse_config" in json.loads((out / "config.json").read_text())) is dynamic
    assert any("predictor" in k for k in _weights(out)) is dynamic
    if not dynamic:
        return
    half = tmp_path / "merged-bf16"
    code, err = _run_tool(merge_lora_weights, ["--model-path", lora, "--model-base", base,
                                               "--save-model-path", half, "--dtype", "bfloat16"], capsys)
    assert code == 0, err
    assert {t.dtype for t in _weights(half).values()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("tool, flags", [
    (extract_mm_projector, ["--model-path", "{missing}", "--output", "{out}/mm_projector.bin"]),
    (apply_delta, ["--base-model-path", "{missing}", "--target-model-path", "{out}", "--delta-path", "{missing}"]),
    (consolidate, ["--src", "{missing}", "--dst", "{out}"]),
    (merge_lora_weights, ["--model-path", "{missing}", "--model-base", "{missing}", "--save-model-path", "{out}"]),
])
def test_missing_input_is_one_message_and_exit_2(tool: ModuleType, flags: list[str], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    argv = [f.format(missing=tmp_path / "missing", out=tmp_path / "out") for f in flags]
    code, err = _run_tool(tool, argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing" in err
    assert not any(tmp_path.iterdir())


def test_python_m_entry_point_reports_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dynamic_llava.tools.consolidate", "--src", str(tmp_path / "none"),
                             "--dst", str(tmp_path / "out")], check=False, capture_output=True,
                            text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- DeepSpeed configs
@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_deepspeed_configs(name: str, stage: int) -> None:
    config = json.loads((REPO / "scripts" / f"{name}.json").read_text())
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    # the HF Trainer fills these from its own arguments
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == config["fp16"]["enabled"] == "auto"
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offloaded = name.endswith("offload")
    for key in ("offload_optimizer", "offload_param"):
        assert (zero.get(key) == {"device": "cpu", "pin_memory": True}) is offloaded


# ----------------------------------------------------------------------------- run scripts
# Training flags spelled in the seeds (Dynamic-LLaVA's and LLaVA's READMEs), plus the LoRA ones of LLaVA-1.5.
SEED_FLAGS = {
    "deepspeed", "model_name_or_path", "version", "data_path", "image_folder", "vision_tower", "mm_projector_type",
    "mm_vision_select_layer", "mm_use_im_start_end", "mm_use_im_patch_token", "image_aspect_ratio",
    "group_by_modality_length", "requires_image", "bf16", "output_dir", "num_train_epochs",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "evaluation_strategy", "save_strategy", "save_steps", "save_total_limit", "learning_rate", "weight_decay",
    "predictor_lr", "predictor_weight_decay", "warmup_ratio", "lr_scheduler_type", "logging_steps", "tf32",
    "model_max_length", "gradient_checkpointing", "dataloader_num_workers", "lazy_preprocess", "report_to",
    "mask_loss_weight", "gumbel_start_tau", "gumbel_end_tau", "use_vision_predictor", "use_text_predictor",
    "use_output_text_predictor", "use_instruct_predictor", "vision_keep_rate", "output_text_keep_rate",
    "output_text_len_for_training", "tune_mm_mlp_adapter", "pretrain_mm_mlp_adapter",
    "lora_enable", "lora_r", "lora_alpha", "mm_projector_lr",
}
# Dynamic-LLaVA's run/train_dynamic_llava_7b.sh, flag by flag (13b: the same with 13b paths).
DYNAMIC_7B = {
    "deepspeed": "./scripts/zero3.json", "model_name_or_path": "./checkpoints/llava-v1.5-7b", "version": "v1",
    "data_path": "./playground/data/llava_v1_5_mix665k.json", "image_folder": "./playground/data",
    "vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": "-2", "mm_use_im_start_end": "False", "mm_use_im_patch_token": "False",
    "image_aspect_ratio": "pad", "group_by_modality_length": "False", "requires_image": "True", "bf16": "True",
    "output_dir": "./results/dynamic-llava-7b", "num_train_epochs": "1.0", "per_device_train_batch_size": "8",
    "per_device_eval_batch_size": "4", "gradient_accumulation_steps": "1", "evaluation_strategy": "no",
    "save_strategy": "steps", "save_steps": "40000", "save_total_limit": "1", "learning_rate": "5e-6",
    "weight_decay": "0.", "predictor_lr": "2e-4", "predictor_weight_decay": "0.", "warmup_ratio": "0.03",
    "lr_scheduler_type": "cosine", "logging_steps": "1", "tf32": "True", "model_max_length": "2048",
    "gradient_checkpointing": "True", "dataloader_num_workers": "4", "lazy_preprocess": "True", "report_to": "wandb",
    "mask_loss_weight": "100.0", "gumbel_start_tau": "1.0", "gumbel_end_tau": "0.1", "use_vision_predictor": "True",
    "use_text_predictor": "True", "use_output_text_predictor": "True", "use_instruct_predictor": "False",
    "vision_keep_rate": "0.2", "output_text_keep_rate": "0.5", "output_text_len_for_training": "50",
}
SCRIPTS = {
    "train_dynamic_llava_7b.sh": ("train_sparse", DYNAMIC_7B),
    "train_dynamic_llava_13b.sh": ("train_sparse", DYNAMIC_7B | {"model_name_or_path": "./checkpoints/llava-v1.5-13b",
                                                                 "output_dir": "./results/dynamic-llava-13b"}),
    "v1_5/pretrain.sh": ("train_mem", {"deepspeed": "./scripts/zero2.json", "version": "plain",
                                       "tune_mm_mlp_adapter": "True", "mm_projector_type": "mlp2x_gelu",
                                       "learning_rate": "1e-3", "per_device_train_batch_size": "32"}),
    "v1_5/finetune.sh": ("train_mem", {"deepspeed": "./scripts/zero3.json", "version": "v1",
                                       "pretrain_mm_mlp_adapter": "./checkpoints/llava-v1.5-13b-pretrain/mm_projector.bin",
                                       "learning_rate": "2e-5", "image_aspect_ratio": "pad"}),
    "v1_5/finetune_lora.sh": ("train_mem", {"lora_enable": "True", "lora_r": "128", "lora_alpha": "256",
                                            "mm_projector_lr": "2e-5", "learning_rate": "2e-4",
                                            "deepspeed": "./scripts/zero3.json"}),
}


def _launch(script: Path, tmp_path: Path, *args: str, **env: str) -> list[str]:
    """The arguments the script passes to `deepspeed` (a stub on PATH that prints them, one per line)."""
    stub = tmp_path / "bin" / "deepspeed"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "OUTPUT_DIR", "DATA_PATH")}
    result = subprocess.run(["bash", str(script), *args], check=False, capture_output=True, text=True, cwd=REPO,
                            env=clean | env | {"PATH": f"{stub.parent}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_run_scripts_use_the_seed_flags(name: str, tmp_path: Path) -> None:
    script = REPO / "scripts" / name
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert "set -euo pipefail" in script.read_text()
    module, expected = SCRIPTS[name]
    argv = _launch(script, tmp_path)
    assert argv[:2] == ["--module", f"dynamic_llava.train.{module}"]
    flags = {}
    for i, arg in enumerate(argv[2:], start=2):
        if arg.startswith("--"):
            assert arg[2:] not in flags, f"{arg} given twice"
            flags[arg[2:]] = argv[i + 1]
    assert set(flags) <= SEED_FLAGS, set(flags) - SEED_FLAGS
    assert {k: flags.get(k) for k in expected} == expected
    if module == "train_sparse":
        assert flags == expected  # the seed's command exactly
    assert (REPO / flags["deepspeed"]).is_file()


def test_run_script_paths_and_extra_flags_are_overridable(tmp_path: Path) -> None:
    argv = _launch(REPO / "scripts" / "train_dynamic_llava_7b.sh", tmp_path, "--gradient_accumulation_steps", "2",
                   MODEL_PATH="/ckpt/llava", OUTPUT_DIR="/out dir")
    assert argv[argv.index("--model_name_or_path") + 1] == "/ckpt/llava"
    assert argv[argv.index("--output_dir") + 1] == "/out dir"
    assert argv[-2:] == ["--gradient_accumulation_steps", "2"]
