"""The model shapes benchmarks run at: real LLaVA-1.5 sizes (random weights) and a tiny one."""

from __future__ import annotations

from dataclasses import dataclass, field

VOCAB = 32000

_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14)


@dataclass(frozen=True)
class Shape:
    llm: dict[str, int]
    vision: dict[str, int]
    sparse: dict[str, int] = field(default_factory=dict)  # sparse_config overrides (defaults: SPEC 2.1)


SHAPES: dict[str, Shape] = {
    "llava-1.5-7b": Shape(dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32), _CLIP_L_336),
    "llava-1.5-13b": Shape(dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40), _CLIP_L_336),
    # Same pipeline and token counts (576 patches, 115 kept), tiny widths: a few seconds.
    "tiny": Shape(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
                  dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       image_size=336, patch_size=14),
                  dict(d_model=64, nhead=4, dim_feedforward=128)),
}
