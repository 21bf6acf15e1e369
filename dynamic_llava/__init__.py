"""Dynamic-LLaVA: LLaVA-1.5 with learned vision and output-text token sparsification.

The main entry points for Python users are importable from here. Each is imported on first use (module
`__getattr__`), so `import dynamic_llava` loads neither torch nor transformers and no submodule imports this
package's namespace back.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# exported name -> the module (relative to this package) that defines it
_EXPORTS = {
    "load_pretrained_model": ".model.loading",
    "DynamicLlavaForCausalLM": ".model.llava",
    "SparseConfig": ".model.config",
    "prepare_request": ".prompting",
    "GenerationConfig": ".generation",
    "GenerationResult": ".generation",
    "generate": ".generation",
    "stream_generate": ".generation",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:  # AttributeError also lets `from . import submodule` fall back to the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
