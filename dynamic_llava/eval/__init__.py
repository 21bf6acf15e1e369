"""Evaluation entry points (LLaVA module names)."""
