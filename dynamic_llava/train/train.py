"""Training entry point: LLaVA's stages (`train` / `train_mem`) and Dynamic-LLaVA's sparsification
training (`train_sparse`), one code path.

    python -m dynamic_llava.train.train_mem  ...   # stage 1 (--tune_mm_mlp_adapter) or stage 2
    python -m dynamic_llava.train.train_sparse ... # Dynamic-LLaVA (SPEC 2.3)

Runs single-process or under `deepspeed`, `torchrun` (DDP / FSDP) and `accelerate launch` unchanged:
distribution is the Trainer's. Bad input fails with one message (exit code 2) before any heavy work.
"""

from __future__ import annotations

import gc
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from ..errors import UserError, require_extra
from ..model.checkpoint_files import save_torch_state, write_llava_config
from ..model.llava import DynamicLlavaForCausalLM
from ..model.sparsity_training import SparsityTraining, masked_attention_function, use_masked_attention
from .arguments import ModelArguments, SparseArguments, TrainingArguments
from .dataset import DataArguments, check_data_args, make_supervised_data_module
from .model_setup import add_lora, build_model, check_model_args, set_trainable
from .trainer import DynamicLlavaTrainer, GumbelTemperature


def parse_args(argv: Sequence[str] | None) -> tuple[ModelArguments, DataArguments, TrainingArguments, SparseArguments]:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, SparseArguments))
    try:
        model_args, data_args, training_args, sparse_args = parser.parse_args_into_dataclasses(
            args=list(argv) if argv is not None else None)
    except ValueError as err:  # TrainingArguments' own validation of flag combinations
        raise UserError(str(err)) from None
    return model_args, data_args, training_args, sparse_args


def _check_reporting(training_args: TrainingArguments) -> None:
    report_to = training_args.report_to or []
    if "wandb" in report_to:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--report_to wandb needs wandb: pip install wandb (WANDB_MODE=offline works "
                            "without network), or use --report_to tensorboard / none") from None


def train(argv: Sequence[str] | None = None, sparse: bool = False) -> DynamicLlavaTrainer:
    """Parse LLaVA / Dynamic-LLaVA flags, train, and save into --output_dir. Returns the finished trainer."""
    # transformers' own error for a missing accelerate is a traceback asking for transformers[torch]
    require_extra("accelerate")
    model_args, data_args, training_args, sparse_args = parse_args(argv)
    if training_args.lora_enable:
        require_extra("peft")
    check_model_args(model_args)
    check_data_args(data_args)
    _check_reporting(training_args)
    if training_args.lora_enable and model_args.tune_mm_mlp_adapter:
        raise UserError("--lora_enable and --tune_mm_mlp_adapter exclude each other (stage 1 trains the projector)")
    if sparse and data_args.image_token_subsets:
        raise UserError("--image_token_subsets trains the dense model; Dynamic-LLaVA's sparsification training "
                        "chooses the image tokens itself")
    if model_args.unfreeze_mm_vision_tower and (training_args.lora_enable or model_args.tune_mm_mlp_adapter):
        raise UserError("--unfreeze_mm_vision_tower needs a full-model run (its output carries the tower), "
                        "not --lora_enable or --tune_mm_mlp_adapter")

    model, tokenizer, image_processor = build_model(model_args, training_args, data_args.image_aspect_ratio,
                                                    sparse_args if sparse else None)
    model.sparsity_training = (SparsityTraining(sparse_args.gumbel_start_tau, sparse_args.image_decision)
                               if sparse else None)
    use_masked_attention(model, masked_attention_function(sparse_args.masked_attention, sparse_args.keep_gradient))
    if sparse and sparse_args.masked_attention == "flex" and training_args.device.type != "cuda":
        warnings.warn("--masked_attention flex has fused kernels only on CUDA; on "
                      f"{training_args.device.type} it runs FlexAttention's unfused math path, which keeps "
                      "[B, H, T, T] scores per layer (use blocked there)", stacklevel=2)
    set_trainable(model, model_args, training_args, sparse)
    data_args.is_multimodal = True
    data_module = make_supervised_data_module(tokenizer, data_args, image_processor,
                                              conv_version=model_args.version,
                                              model_max_length=training_args.model_max_length,
                                              mm_use_im_start_end=model_args.mm_use_im_start_end)
    trained = add_lora(model, training_args) if training_args.lora_enable else model
    trainer = DynamicLlavaTrainer(
        model=trained, args=training_args, processing_class=tokenizer, core_model=model,
        image_processor=image_processor,
        lengths=data_module["train_dataset"].modality_lengths, **data_module)
    trainer.add_callback(GumbelTemperature(model, sparse_args.gumbel_start_tau, sparse_args.gumbel_end_tau))
    _report_parallelism(trainer)
    trainer.train(resume_from_checkpoint=_resume_point(training_args))
    trainer.save_state()
    out = Path(training_args.output_dir)
    if model_args.tune_mm_mlp_adapter:
        _save_projector(trainer, model, out)
    elif training_args.lora_enable:
        _save_lora(trainer, model, out, sparse)
    else:
        trainer.save_model(str(out))
    return trainer


def _report_parallelism(trainer: DynamicLlavaTrainer) -> None:
    """Say how the run is distributed (launchers can silently fall back to something else)."""
    distributed_type = trainer.accelerator.distributed_type
    if trainer.args.fsdp and distributed_type.name != "FSDP":
        warnings.warn(f"--fsdp was given but accelerate runs {distributed_type.name} here (it enables FSDP only on "
                      "GPU-like devices); training continues without sharding", stacklevel=2)
    if trainer.args.should_log:
        print(f"training on {trainer.args.world_size} process(es), {distributed_type.name}, "
              f"device {trainer.args.device}", file=sys.stderr)


def _resume_point(training_args: TrainingArguments) -> str | bool | None:
    """--resume_from_checkpoint PATH, or True / "latest" for the newest checkpoint-* in --output_dir."""
    value = training_args.resume_from_checkpoint
    if value is None:
        return None
    if str(value).lower() in ("true", "latest"):
        if not list(Path(training_args.output_dir).glob("checkpoint-*")):
            raise UserError(f"--resume_from_checkpoint {value}: no checkpoint-* in {training_args.output_dir}")
        return True
    if not Path(value).is_dir():
        raise UserError(f"--resume_from_checkpoint {value} does not exist")
    return str(value)


def _gathered(named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """CPU copies of parameters, gathered first when DeepSpeed ZeRO-3 has partitioned them."""
    partitioned = [p for p in named.values() if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            return {k: v.detach().cpu().clone() for k, v in named.items()}
    return {k: v.detach().cpu().clone() for k, v in named.items()}


def _save_projector(trainer: DynamicLlavaTrainer, model: DynamicLlavaForCausalLM, out: Path) -> None:
    """Stage 1 writes what LLaVA's does: config.json and mm_projector.bin (`model.mm_projector.*` only)."""
    state = _gathered({k: p for k, p in model.named_parameters() if k.startswith("model.mm_projector.")})
    if trainer.args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        write_llava_config(out, model.config, sparse=False, dtype=model.lm_head.weight.dtype)
        save_torch_state(state, out / "mm_projector.bin")


def _save_lora(trainer: DynamicLlavaTrainer, model: DynamicLlavaForCausalLM, out: Path, sparse: bool) -> None:
    """LoRA adapter (peft files), the other trained weights as non_lora_trainables.bin, and config.json:
    the folder `load_pretrained_model(out, model_base=...)` and merge_lora_weights read."""
    non_lora = _gathered({f"base_model.model.{k}": p for k, p in model.named_parameters()
                          if p.requires_grad and "lora_" not in k})
    trainer.save_model(str(out))
    if trainer.args.should_save:
        write_llava_config(out, model.config, sparse, model.lm_head.weight.dtype)
        save_torch_state(non_lora, out / "non_lora_trainables.bin")


def main(argv: Sequence[str] | None = None, sparse: bool = False) -> int:
    try:
        train(argv, sparse)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        # A gloo process group left to interpreter shutdown can abort the process after a finished run:
        # wait for every rank, drop the Trainer's references to the group, then destroy it.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            gc.collect()
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
