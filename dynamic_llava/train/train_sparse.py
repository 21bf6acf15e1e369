"""Dynamic-LLaVA sparsification training (SPEC 2.3), with the flags of the reference `train_sparse.py`."""

import sys

from .train import main

if __name__ == "__main__":
    sys.exit(main(sparse=True))
