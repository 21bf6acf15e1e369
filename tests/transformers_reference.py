"""transformers' own LLaMA holding a Dynamic-LLaVA model's LLM weights: the independent reference of parity tests."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM


def transformers_llama(model) -> LlamaForCausalLM:
    cfg = model.config
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False)).eval()
    state = {k: v for k, v in model.state_dict().items()
             if k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.", "lm_head."))}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    return llama
