"""The multimodal projector between CLIP features and the LLM embedding space (LLaVA `mm_projector`)."""

from __future__ import annotations

import re

from torch import nn

from ..errors import UserError


def build_projector(projector_type: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """`linear`, `mlp{N}x_gelu` (Linear, then N-1 x (GELU, Linear); v1.5 uses N=2) or `identity`.

    Sequential indices match LLaVA's, so weights are `mm_projector.0.*`, `mm_projector.2.*`, ...
    """
    if projector_type == "linear":
        return nn.Linear(mm_hidden_size, hidden_size)
    if projector_type == "identity":
        if mm_hidden_size != hidden_size:
            raise UserError(f"identity projector needs mm_hidden_size == hidden_size ({mm_hidden_size} != {hidden_size})")
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if match is None:
        raise UserError(f"unknown mm_projector_type {projector_type!r} (linear, mlp2x_gelu, identity)")
    modules: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(1, int(match.group(1))):
        modules += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    return nn.Sequential(*modules)
