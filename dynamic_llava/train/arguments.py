"""Command-line arguments of the training entry points, with the flag names and defaults of LLaVA's
`train.py` and Dynamic-LLaVA's `train_sparse.py` (each field is a `--flag` through HfArgumentParser).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields

import torch
import transformers

from ..constants import IMAGE_DECISIONS
from ..errors import UserError
from ..model.sparsity_training import KEEP_GRADIENTS, MASKED_ATTENTION, masked_attention_function

# Later transformers 5 releases renamed --gradient_checkpointing(_kwargs) to --activation_checkpointing(_kwargs)
# and warn on the old names, which LLaVA's scripts use; 5.0 knows only the old ones.
_CHECKPOINTING_RENAMED = "activation_checkpointing" in {f.name for f in fields(transformers.TrainingArguments)}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "LLaVA / Dynamic-LLaVA checkpoint, or a plain LLaMA-family "
                                              "LLM (Vicuna) for stage-1 pre-training"})
    version: str = field(default="v0", metadata={"help": "conversation template (v0, v1, plain, mpt, llama_2, ...)"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the LLM"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    vision_tower: str | None = field(default=None, metadata={"help": "CLIP tower: local folder or cached Hub id"})
    mm_vision_select_layer: int = field(default=-1, metadata={"help": "CLIP hidden layer used as image features"})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "stage-1 mm_projector.bin"})
    mm_projector_type: str = field(default="linear", metadata={"help": "linear, mlp{N}x_gelu or identity"})
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "wrap image tokens in <im_start>/<im_end>"})
    mm_use_im_patch_token: bool = field(default=True, metadata={"help": "add the <im_patch> token (LLaVA v0)"})
    mm_patch_merge_type: str = field(default="flat", metadata={"help": "only flat (LLaVA-1.5)"})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch (drop CLS) or cls_patch"})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={
        "help": "train the vision tower too (LLaVA-NeXT's flag; for towers without CLIP pre-training); it is "
                "then saved inside the checkpoint as vision_tower/"})


@dataclass
class SparseArguments:
    """Dynamic-LLaVA's switches (SPEC 2.1 / 2.3); the defaults are the paper's."""

    use_vision_predictor: bool = field(default=True, metadata={"help": "learn which image tokens to keep"})
    use_text_predictor: bool = field(default=True, metadata={"help": "allow text sparsification at all"})
    use_output_text_predictor: bool = field(default=True, metadata={"help": "learn which answer tokens to keep"})
    use_instruct_predictor: bool = field(default=False, metadata={"help": "instruction-text predictor (ablation; "
                                                                    "not supported in training)"})
    vision_keep_rate: float = field(default=0.2, metadata={"help": "target kept fraction of image tokens"})
    output_text_keep_rate: float = field(default=0.5, metadata={"help": "target kept fraction of answer tokens"})
    output_text_len_for_training: int = field(default=50, metadata={"help": "answers shorter than this keep all "
                                                                           "tokens and add no regulariser term"})
    sparse_layer: int = field(default=2, metadata={"help": "first decoder layer that sees the reduced token set "
                                                                 "(0: tokens are dropped before the first layer)"})
    mask_loss_weight: float = field(default=100.0, metadata={"help": "weight of the keep-rate regulariser"})
    gumbel_start_tau: float = field(default=1.0, metadata={"help": "Gumbel-Softmax temperature at step 0"})
    gumbel_end_tau: float = field(default=0.1, metadata={"help": "temperature at the last step (exponential decay)"})
    masked_attention: str = field(default="blocked", metadata={
        "choices": list(MASKED_ATTENTION),
        "help": "masked-softmax attention of the layers from sparse_layer on: blocked (score blocks recomputed in "
                "backward, any device) or flex (FlexAttention, fused kernels on CUDA, torch >= 2.9; the same values "
                "and gradients)"})
    keep_gradient: str = field(default="exact", metadata={
        "choices": list(KEEP_GRADIENTS),
        "help": "dL/dkeep of a dropped token: exact (the masked softmax's derivative, as the reference; unbounded "
                "when the token outscores every kept one) or bounded (the change of the attention output when the "
                "token is added back)"})
    image_decision: str = field(default="gumbel", metadata={
        "choices": list(IMAGE_DECISIONS),
        "help": "how training picks image tokens: gumbel (each token kept where its Gumbel-perturbed keep margin is "
                "above 0, the regulariser pulling the share to vision_keep_rate, as the reference) or top_k (exactly "
                "the floor(vision_keep_rate x N) tokens with the largest perturbed margins, as inference keeps; "
                "gradient around the cut)"})

    def __post_init__(self) -> None:
        # this torch lacks flex, or a name is wrong: UserError before any work
        masked_attention_function(self.masked_attention, self.keep_gradient)
        if self.image_decision not in IMAGE_DECISIONS:
            raise UserError(f"image decision must be one of {', '.join(IMAGE_DECISIONS)}, got {self.image_decision!r}")

    def sparse_config(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in (
            "use_vision_predictor", "use_text_predictor", "use_output_text_predictor", "use_instruct_predictor",
            "vision_keep_rate", "output_text_keep_rate", "output_text_len_for_training", "sparse_layer",
            "mask_loss_weight")}


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    model_max_length: int = field(default=512, metadata={"help": "sequences are truncated to this many tokens"})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "keep the projector frozen"})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "learning rate of the projector"})
    # The reference's default when the flag is absent (its scripts pass 2e-4); the LLM's 5e-6 would train
    # the fresh predictors 40x too slowly
    predictor_lr: float = field(default=3e-4, metadata={"help": "learning rate of the Dynamic-LLaVA predictors"})
    predictor_weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the predictors"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "batches of one modality each"})
    sort_micro_batches_by_length: bool = field(default=False, metadata={
        "help": "with --gradient_accumulation_steps N: each optimiser step still draws its samples at random, "
                "ordered by length so that each of its N batches pads only to its own longest (same gradient, "
                "less padding)"})
    lora_enable: bool = field(default=False, metadata={"help": "train LoRA adapters on the LLM (peft)"})
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_weight_path: str = field(default="")
    lora_bias: str = field(default="none")
    bits: int = field(default=16, metadata={"help": "only 16 (bf16 / fp16 / fp32) is supported"})
    cache_dir: str | None = field(default=None)
    evaluation_strategy: str | None = field(default=None, metadata={"help": "old name of --eval_strategy"})
    warmup_ratio: float | None = field(default=None, metadata={"help": "warmup as a fraction of all steps "
                                                                       "(old name; --warmup_steps takes a ratio too)"})

    def __post_init__(self) -> None:
        # Flags transformers 5 renamed, as the seeds' scripts spell them.
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        if _CHECKPOINTING_RENAMED:
            for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                             ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
                if getattr(self, old) is not None and getattr(self, new) is None:
                    setattr(self, new, getattr(self, old))
                    setattr(self, old, None)  # transformers mirrors the new value back into it
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        if self.tf32 and not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8):
            warnings.warn("--tf32 needs an Ampere or newer GPU; ignored here", stacklevel=2)
            self.tf32 = None
        if not torch.cuda.is_available() and not torch.backends.mps.is_available():
            # Without it transformers neither accepts bf16 on CPU nor sets up DDP under torchrun: each
            # process would silently train alone.
            self.use_cpu = True
        if self.bits != 16:
            raise UserError("--bits 4/8 (bitsandbytes quantised training) is not supported; use --bits 16")
        if self.sort_micro_batches_by_length and self.group_by_modality_length:
            raise UserError("--sort_micro_batches_by_length and --group_by_modality_length each set the sample "
                            "order; choose one")
        if self.lora_bias not in ("none", "all", "lora_only"):
            raise UserError(f"--lora_bias must be none, all or lora_only, got {self.lora_bias!r}")
        super().__post_init__()
