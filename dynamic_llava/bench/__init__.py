"""Efficiency benchmarks (commands that print tables and write JSON; never timed assertions in tests).

`prefill`: prefill / decode latency and KV-cache bytes at real LLaVA-1.5 shapes with random weights,
ours dense vs ours sparse (Dynamic-LLaVA) vs transformers' `LlavaForConditionalGeneration`.
"""
