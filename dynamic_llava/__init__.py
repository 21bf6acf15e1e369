"""Dynamic-LLaVA: LLaVA-1.5 with learned vision and output-text token sparsification."""

__version__ = "0.1.0"
