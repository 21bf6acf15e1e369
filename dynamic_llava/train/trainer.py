"""`transformers.Trainer` for LLaVA and Dynamic-LLaVA: optimiser groups (projector and predictors with
their own learning rates), the modality-grouped sampler, the Gumbel temperature schedule, per-step
sparsity logging, and checkpoints in the LLaVA layout (no vision-tower weights inside).

Distribution (DeepSpeed ZeRO-2/3, DDP, FSDP) is the Trainer's; nothing here depends on it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..model.checkpoint_files import CheckpointParts, CLIPImageProcessor, write_llava_checkpoint
from ..model.layouts import is_predictor_key
from ..model.llava import DynamicLlavaForCausalLM
from ..model.sparsity_training import gumbel_tau
from .sampler import ModalityLengthGroupedSampler, StepSortedSampler

_STATS = ("lm_loss", "vision_mask_loss", "output_mask_loss", "vision_keep", "output_keep")
_VISION_TOWER = "model.vision_tower."


class GumbelTemperature(TrainerCallback):
    """tau = start x (end / start)^(step / total) at every optimiser step (resumes exactly: a function of
    the global step only)."""

    def __init__(self, model: DynamicLlavaForCausalLM, start: float, end: float) -> None:
        self.model, self.start, self.end = model, start, end

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        if self.model.sparsity_training is not None:
            self.model.sparsity_training.tau = gumbel_tau(state.global_step, state.max_steps, self.start, self.end)


class SparsityProgress(ProgressCallback):
    """The progress bar shows loss, keep rates and tau instead of printing every log dict."""

    _SHOWN = {"loss": "loss", "lm_loss": "lm", "vision_keep": "img_keep", "output_keep": "out_keep", "tau": "tau"}

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {short: f"{logs[key]:.3g}" for key, short in self._SHOWN.items() if key in logs}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)
            if "train_runtime" in logs:
                self.training_bar.write(json.dumps({k: round(v, 4) for k, v in logs.items()}))


class DynamicLlavaTrainer(Trainer):
    def __init__(self, *args: Any, core_model: DynamicLlavaForCausalLM, lengths: list[int] | None = None,
                 image_processor: CLIPImageProcessor | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.core_model = core_model  # the model under any peft / DDP / DeepSpeed wrapper
        self.image_processor = image_processor  # written with the tower when it travels in the checkpoint
        self.modality_lengths = lengths
        self._step_samples: torch.Tensor | None = None  # samples of the current optimiser step (get_batch_samples)
        self._stat_sums: dict[str, float] = defaultdict(float)
        self._stat_counts: dict[str, int] = defaultdict(int)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(SparsityProgress)

    # ----------------------------------------------------------------- data order
    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        lengths = self.modality_lengths
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        batch_size = self.args.train_batch_size * self.args.gradient_accumulation_steps
        generator = torch.Generator().manual_seed(self.args.seed)
        if self.args.group_by_modality_length:
            return ModalityLengthGroupedSampler(batch_size, self.args.world_size, lengths, generator=generator)
        if self.args.sort_micro_batches_by_length:
            return StepSortedSampler([abs(n) for n in lengths], batch_size * self.args.world_size, generator)
        if self.args.train_sampling_strategy == "group_by_length":
            # Given no lengths, transformers would load every sample (its images too) to measure it
            return LengthGroupedSampler(batch_size, lengths=[abs(n) for n in lengths], generator=generator)
        return super()._get_train_sampler(train_dataset)

    # ----------------------------------------------------------------- optimiser
    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """Groups: LLM (weight decay / none), projector at --mm_projector_lr, predictors at --predictor_lr
        with --predictor_weight_decay. Each group is named so its learning rate can be logged."""
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        args = self.args
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[str, dict[str, Any]] = {}

        def add(name: str, param: torch.nn.Parameter, lr: float, weight_decay: float) -> None:
            groups.setdefault(name, {"params": [], "lr": lr, "weight_decay": weight_decay, "name": name})
            groups[name]["params"].append(param)

        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if is_predictor_key(_strip_wrappers(name)):
                add("predictor", param, args.predictor_lr, args.predictor_weight_decay)
            elif "mm_projector." in name and args.mm_projector_lr is not None:
                suffix = "" if name in decay else "_no_decay"
                add("projector" + suffix, param, args.mm_projector_lr, args.weight_decay if name in decay else 0.0)
            else:
                suffix = "" if name in decay else "_no_decay"
                add("llm" + suffix, param, args.learning_rate, args.weight_decay if name in decay else 0.0)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(list(groups.values()), **optimizer_kwargs)
        return self.optimizer

    # ----------------------------------------------------------------- loss and logging
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Also counts the step's samples (over all ranks when the Trainer counts its targets so), which
        the keep-rate regulariser averages over (SPEC 2.3: each sample weighs 1/B of the step)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        samples = torch.tensor(sum(len(b["input_ids"]) for b in batch_samples), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            samples = self.accelerator.gather(samples).sum()
        self._step_samples = samples
        return batch_samples, num_items_in_batch

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        accumulating = model.training and self.args.gradient_accumulation_steps > 1
        if accumulating and num_items_in_batch is not None:
            # the whole step's target and sample counts, so that the step's batches add up to one batch's loss
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch, "num_samples_in_step": self._step_samples}
        outputs = model(**inputs)
        if accumulating and num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # the count is over all ranks, whose gradients DDP averages
            outputs["loss"] = outputs["loss"] * self.accelerator.num_processes
        if model.training:
            for key in _STATS:
                value = outputs.get(key)
                if value is not None:
                    self._stat_sums[key] += float(value)
                    self._stat_counts[key] += 1
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training-step log: add the averages since the previous one
            for key, total in self._stat_sums.items():
                logs[key] = round(total / self._stat_counts[key], 6)
            self._stat_sums.clear()
            self._stat_counts.clear()
            if self.core_model.sparsity_training is not None:
                logs["tau"] = round(self.core_model.sparsity_training.tau, 6)
            if self.optimizer is not None:
                for group in self.optimizer.param_groups:
                    if group.get("name") in ("predictor", "projector"):
                        logs[f"{group['name']}_lr"] = group["lr"]
        super().log(logs, start_time)

    # ----------------------------------------------------------------- saving
    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Full models are written in the LLaVA layout (`write_llava_checkpoint`: no vision-tower weights
        beside the LLM's, tokenizer); peft models go through the Trainer (adapter files)."""
        if self.core_model is not self.accelerator.unwrap_model(self.model):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        out = Path(output_dir or self.args.output_dir)
        model = self.core_model
        state = state_dict if state_dict is not None else model.state_dict()
        sparse = model.sparsity_training is not None
        parts = CheckpointParts(model.config, {}, self.processing_class, None, {}, self.image_processor,
                                has_sparse_config=sparse)
        tower = model.model.vision_tower
        if tower is not None:
            if any(p.requires_grad for p in tower.parameters()):
                model.config.mm_vision_tower = "vision_tower"  # a trained tower travels inside the checkpoint
            prefix = _VISION_TOWER + "vision_tower."
            parts.tower_config = tower.vision_tower.config
            parts.tower_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        parts.state = {k: v.contiguous() for k, v in state.items() if not k.startswith(_VISION_TOWER)}
        if not sparse:  # a dense LLaVA: no predictor weights, no sparse_config
            parts.state = {k: v for k, v in parts.state.items() if not is_predictor_key(k)}
        write_llava_checkpoint(parts, out, dtype=model.lm_head.weight.dtype)
        torch.save(self.args, os.path.join(out, "training_args.bin"))


def _strip_wrappers(name: str) -> str:
    """Parameter name without peft's `base_model.model.` prefix."""
    return name.removeprefix("base_model.model.")
