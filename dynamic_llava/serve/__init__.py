"""Serving: controller, model workers, an OpenAI-compatible API and an interactive CLI chat, all sparsified.

The controller and workers speak LLaVA's (FastChat's) HTTP protocol; see docs/SERVING.md.
"""
