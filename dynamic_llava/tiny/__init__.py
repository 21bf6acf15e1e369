"""Tiny, locally generated stand-ins for the LLaVA-1.5 checkpoint parts (for tests and demos)."""
