"""Model configuration: the LLaMA decoder, the LLaVA multimodal keys and Dynamic-LLaVA's `sparse_config`.

`DynamicLlavaConfig` serialises to the original LLaVA-1.5 `config.json` layout (a LlamaConfig plus
`mm_*` keys, `model_type: llava_llama`) with `sparse_config` as a plain dict, as the reference does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig

from ..errors import UserError


@dataclass
class SparseConfig:
    """Dynamic-LLaVA switches and sizes (SPEC 2.1), facts of the checkpoint saved as `config.sparse_config`:
    which predictors it has, their sizes, and the keep rates and sparse_layer it was trained with. A run's
    own choices (other rates, rules, dense) are `policy.SparsityOptions`, applied by `make_policy`."""

    use_vision_predictor: bool = True
    vision_keep_rate: float = 0.2
    use_text_predictor: bool = True
    use_output_text_predictor: bool = True
    output_text_keep_rate: float = 0.5
    output_text_len_for_training: int = 50
    use_instruct_predictor: bool = False
    instruct_keep_rate: float = 0.7
    instruct_len_for_training: int = 25
    sparse_layer: int = 2
    d_model: int = 512
    nhead: int = 8
    dim_feedforward: int = 2048
    num_layers: int = 2
    mask_loss_weight: float = 100.0

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "SparseConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def sparsify_vision(self) -> bool:
        return self.use_vision_predictor

    @property
    def sparsify_output_text(self) -> bool:
        return self.use_text_predictor and self.use_output_text_predictor

    def replace(self, **fields: Any) -> "SparseConfig":
        """A copy with these fields replaced (None = unchanged): what sparsification training writes."""
        updates = {k: v for k, v in fields.items() if v is not None}
        unknown = set(updates) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UserError(f"unknown sparse_config keys: {sorted(unknown)}")
        new = dataclasses.replace(self, **updates)
        new.validate()
        return new

    def validate(self) -> None:
        for name in ("vision_keep_rate", "output_text_keep_rate", "instruct_keep_rate"):
            rate = getattr(self, name)
            if not 0.0 < float(rate) <= 1.0:
                raise UserError(f"{name} must be in (0, 1], got {rate}")
        if self.sparse_layer < 0:
            raise UserError(f"sparse_layer must be >= 0, got {self.sparse_layer}")


# LLaMA keys kept in config.json, with LLaMA-7B defaults.
_LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    head_dim=None,
    hidden_act="silu",
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    attention_bias=False,
    mlp_bias=False,
)

# The LLaVA multimodal keys of a released LLaVA-1.5 checkpoint, with v1.5 defaults.
_MM_DEFAULTS: dict[str, Any] = dict(
    mm_vision_tower="openai/clip-vit-large-patch14-336",
    mm_hidden_size=1024,
    mm_projector_type="mlp2x_gelu",
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    mm_patch_merge_type="flat",
    image_aspect_ratio="pad",
    mm_use_im_start_end=False,
    mm_use_im_patch_token=False,
    tokenizer_padding_side="right",
    tokenizer_model_max_length=2048,
    use_mm_proj=True,
    tune_mm_mlp_adapter=False,
    freeze_mm_mlp_adapter=False,
)


class DynamicLlavaConfig(PretrainedConfig):
    model_type = "llava_llama"

    def __init__(self, sparse_config: dict[str, Any] | SparseConfig | None = None, **kwargs: Any) -> None:
        for key, default in {**_LLAMA_DEFAULTS, **_MM_DEFAULTS}.items():
            setattr(self, key, kwargs.pop(key, default))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        rope_params = kwargs.pop("rope_parameters", None) or {}
        self.rope_theta = float(rope_params.get("rope_theta", self.rope_theta))
        for key, rope in (("rope_parameters", rope_params), ("rope_scaling", kwargs.pop("rope_scaling", None) or {})):
            if rope.get("rope_type", rope.get("type")) not in (None, "default"):
                raise UserError(f"{key} {rope} is not supported (only default RoPE with rope_theta)")
        if isinstance(sparse_config, SparseConfig):
            sparse_config = sparse_config.to_dict()
        self.sparse_config = SparseConfig.from_dict(sparse_config).to_dict()
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def sparse(self) -> SparseConfig:
        return SparseConfig.from_dict(self.sparse_config)

    def to_llava_dict(self) -> dict[str, Any]:
        """The config.json of the original LLaVA layout (loadable by the LLaVA code base)."""
        out: dict[str, Any] = {
            "architectures": ["LlavaLlamaForCausalLM"],
            "model_type": "llava_llama",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": False,
            "torch_dtype": str(getattr(self, "dtype", None) or "float32").replace("torch.", ""),
            "use_cache": True,
            "pretraining_tp": 1,
            "initializer_range": 0.02,
        }
        for key in {**_LLAMA_DEFAULTS, **_MM_DEFAULTS}:
            out[key] = getattr(self, key)
        out["sparse_config"] = dict(self.sparse_config)
        return out
