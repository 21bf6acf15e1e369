"""LLaVA's checkpoint tools, each runnable as `python -m dynamic_llava.tools.<name>` with LLaVA's flags.

`extract_mm_projector` (the projector of a checkpoint, as stage 1's `mm_projector.bin`), `apply_delta`
(delta weights + base LLM -> full checkpoint), `consolidate` (drop the vision-tower weights DeepSpeed
saved inside a checkpoint), `merge_lora_weights` (LoRA + base -> full checkpoint). Bad input: one
message on stderr, exit code 2, nothing written.
"""
