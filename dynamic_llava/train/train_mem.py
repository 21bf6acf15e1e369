"""LLaVA's `train_mem.py`: the LLaVA stages with the fastest attention available.

Attention here is always PyTorch's scaled_dot_product_attention, which picks FlashAttention /
memory-efficient kernels on GPUs that have them, so this is the same entry point as `train`.
"""

import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main())
