"""LLaVA-1.5 at a real shape with random weights, and its inputs: what the benches time.

Created on the meta device, materialised once on the target device and filled from a small seeded random
pool (seconds, not minutes; a forward pass's speed does not depend on the weight values). transformers'
`LlavaForConditionalGeneration` of the same shape can be built around the very same parameters (checked by
data_ptr). Also here: seeded v1.5-shaped prompts with one image, ours' and transformers' prefill, greedy
decoding with the KV cache one timed token at a time (`Decoder`), and the calibration that makes the random
output-text predictor keep about half of the generated tokens. Used by `bench prefill`, `bench decode` and
`bench train-step`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..constants import IMAGE_TOKEN_INDEX
from ..errors import UserError
from ..model.batch import OUTPUT, TokenBatch
from ..model.cache import SparseKVCache
from ..model.config import DynamicLlavaConfig
from ..model.decoder import RMSNorm, RotaryEmbedding
from ..model.llava import DynamicLlavaForCausalLM, StepOutput
from ..model.policy import AttentionProbe, SparsityOptions, TokenPolicy, make_policy
from ..model.vision import CLIPVisionTower
from .attention_kernels import attention_kernels
from .device import timed
from .shapes import VOCAB, Shape

# transformers needs an in-vocab placeholder id to share our 32000-row embedding (llava-hf appends
# <image> as id 32000 to a 32064-row table); the random prompt text never uses it.
REF_IMAGE_TOKEN = VOCAB - 1
PROMPT_PREFIX = 35  # BOS + v1.5 system prompt + " USER:" (LLaMA tokenizer), then <image>, then the rest
_POOL_SIZE = 1_000_003  # prime, so consecutive rows of a weight get different windows of the pool
_INIT_STD = 0.02
# The two settings every benchmark compares: dense LLaVA-1.5 and the checkpoint's Dynamic-LLaVA
DENSE, SPARSE = SparsityOptions(sparse=False), SparsityOptions()


def make_policies(model: DynamicLlavaForCausalLM) -> dict[str, TokenPolicy]:
    """The model's token policies for DENSE and SPARSE, by name ("dense", "sparse")."""
    return {"dense": make_policy(model, DENSE), "sparse": make_policy(model, SPARSE)}


# ----------------------------------------------------------------------------- models
def build_model(shape: Shape, dtype: torch.dtype, seed: int = 0,
                device: torch.device | str = "cpu") -> DynamicLlavaForCausalLM:
    """Our model with the CLIP tower attached, random weights, one copy, materialised directly on `device`
    (a 13B shape on a GPU never passes through host RAM)."""
    device = torch.device(device)
    config = DynamicLlavaConfig(vocab_size=VOCAB, mm_hidden_size=shape.vision["hidden_size"],
                                sparse_config=shape.sparse, **shape.llm)
    with torch.device("meta"):
        model = DynamicLlavaForCausalLM(config)
        clip = CLIPVisionModel(CLIPVisionConfig(**shape.vision))
        model.model.vision_tower = CLIPVisionTower(clip, config.mm_vision_select_layer, config.mm_vision_select_feature)
    model = model.to(dtype)
    _check_memory(model, device)
    model = model.to_empty(device=device).eval()
    _fill_random(model, seed)
    # Buffers are not weights: recompute them (to_empty left them uninitialised; inv_freq stays fp32).
    model.model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta).to(device)
    embeddings = clip.embeddings
    embeddings.position_ids.copy_(torch.arange(embeddings.num_positions)[None])
    return model


def _check_memory(model: nn.Module, device: torch.device) -> None:
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[0], f"memory on {device}"
    else:
        available, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "RAM"
    if needed > 0.9 * available:
        raise UserError(f"the weights need {needed / 2**30:.1f} GiB but only {available / 2**30:.1f} GiB of {where} "
                        "is free: use a smaller --shape (or bfloat16)")


@torch.no_grad()
def _fill_random(model: nn.Module, seed: int) -> None:
    """Weights N(0, 0.02) tiled from a seeded pool at a random offset per tensor; biases 0, norm scales 1."""
    generator = torch.Generator().manual_seed(seed)
    pool32 = torch.randn(_POOL_SIZE, generator=generator) * _INIT_STD
    pools: dict[torch.dtype, torch.Tensor] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                param.zero_()
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                param.fill_(1.0)
            else:
                if param.dtype not in pools:  # the same values on every device (drawn on the CPU)
                    pools[param.dtype] = pool32.to(param.device, param.dtype)
                pool = pools[param.dtype]
                flat, start, done = param.view(-1), int(torch.randint(_POOL_SIZE, (1,), generator=generator)), 0
                while done < flat.numel():
                    take = min(flat.numel() - done, _POOL_SIZE - start)
                    flat[done:done + take].copy_(pool[start:start + take])
                    done, start = done + take, 0


def build_reference(model: DynamicLlavaForCausalLM) -> LlavaForConditionalGeneration:
    """transformers' LLaVA of the same shape, sharing every parameter with `model` (no second copy)."""
    cfg = model.config
    clip = model.model.vision_tower.vision_tower
    text_config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    config = LlavaConfig(vision_config=clip.config, text_config=text_config, image_token_index=REF_IMAGE_TOKEN,
                         vision_feature_layer=cfg.mm_vision_select_layer, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", multimodal_projector_bias=True)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        ref = LlavaForConditionalGeneration(config)
    ours = model.model
    ref.model.vision_tower = clip
    ref.model.multi_modal_projector.linear_1 = ours.mm_projector[0]
    ref.model.multi_modal_projector.linear_2 = ours.mm_projector[2]
    lm = ref.model.language_model
    lm.embed_tokens = ours.embed_tokens
    for theirs, mine in zip(lm.layers, ours.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(theirs.self_attn, name, getattr(mine.self_attn, name))
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(theirs.mlp, name, getattr(mine.mlp, name))
        theirs.input_layernorm.weight = mine.input_layernorm.weight
        theirs.post_attention_layernorm.weight = mine.post_attention_layernorm.weight
    lm.norm.weight = ours.norm.weight
    lm.rotary_emb = LlamaRotaryEmbedding(lm.config).to(model.lm_head.weight.device)
    ref.lm_head = model.lm_head
    ref.eval()
    _check_shared(ref, model)
    return ref


def _check_shared(ref: nn.Module, model: nn.Module) -> None:
    ours = {p.data_ptr() for p in model.parameters()}
    for name, tensor in [*ref.named_parameters(), *ref.named_buffers()]:
        if tensor.is_meta:
            raise RuntimeError(f"transformers reference: {name} was left on the meta device")
    unshared = [name for name, p in ref.named_parameters() if p.data_ptr() not in ours]
    if unshared:
        raise RuntimeError(f"transformers reference holds its own copy of {unshared[:3]}...")
    if ref.model.language_model.config._attn_implementation != "sdpa":
        raise RuntimeError("transformers reference does not use sdpa attention")


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    prompts: list[torch.Tensor]  # ours: ids with one IMAGE_TOKEN_INDEX placeholder
    images: list[torch.Tensor]  # ours: [1, 3, H, W] per sample
    input_ids: torch.Tensor  # transformers: [B, T], the image expanded to N placeholder ids
    pixel_values: torch.Tensor  # transformers: [B, 3, H, W]
    attention_mask: torch.Tensor
    text_tokens: int
    image_tokens: int


def make_inputs(batch_size: int, text_tokens: int, vision: dict[str, int], seed: int,
                device: torch.device | str = "cpu") -> Inputs:
    """B copies of one v1.5-shaped prompt: BOS + system + USER: <image> question ASSISTANT: (random ids)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, REF_IMAGE_TOKEN, (text_tokens,), generator=generator)
    text[0] = 1  # BOS
    split = min(PROMPT_PREFIX, max(1, text_tokens // 2))
    n_image = (vision["image_size"] // vision["patch_size"]) ** 2
    prompt = torch.cat([text[:split], torch.tensor([IMAGE_TOKEN_INDEX]), text[split:]])
    expanded = torch.cat([text[:split], torch.full((n_image,), REF_IMAGE_TOKEN), text[split:]])
    pixels = torch.randn(1, 3, vision["image_size"], vision["image_size"], generator=generator)
    prompt, expanded, pixels = prompt.to(device), expanded.to(device), pixels.to(device)
    return Inputs(prompts=[prompt] * batch_size, images=[pixels] * batch_size,
                  input_ids=expanded[None].repeat(batch_size, 1), pixel_values=pixels.repeat(batch_size, 1, 1, 1),
                  attention_mask=torch.ones(batch_size, len(expanded), dtype=torch.long, device=device),
                  text_tokens=text_tokens, image_tokens=n_image)


# ----------------------------------------------------------------------------- running
def ours_prefill(model: DynamicLlavaForCausalLM, inputs: Inputs, policy: TokenPolicy
                 ) -> tuple[TokenBatch, SparseKVCache, StepOutput]:
    """What `generate` does before its first token: embed (vision tower + projector) and one step."""
    batch = model.embed(inputs.prompts, inputs.images)
    cache = model.new_cache(len(inputs.prompts))
    return batch, cache, model.step(batch, cache, policy)


def reference_prefill(ref: LlavaForConditionalGeneration, inputs: Inputs) -> Any:
    return ref(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values,
               attention_mask=inputs.attention_mask, use_cache=True, logits_to_keep=1)


class Decoder:
    """Greedy decoding with the KV cache via `model.step`, one timed token at a time."""

    def __init__(self, model: DynamicLlavaForCausalLM, inputs: Inputs, policy: TokenPolicy) -> None:
        self.model, self.policy, self.device = model, policy, model.lm_head.weight.device
        batch, self.cache, out = ours_prefill(model, inputs, policy)
        self.prompt_lengths = batch.lengths.clone()
        self.prompt_kept = out.keep.sum(1)  # text + kept image tokens
        self.prefill_bytes = int(self.cache.bytes_per_sample().sum())
        self.tokens = out.logits.argmax(-1)
        self.positions = batch.lengths.clone()
        self.outputs_kept = torch.zeros_like(self.positions)
        self.fed = 0  # generated tokens the cache accounts for (decoded or filled)
        self.seconds: list[float] = []

    def step(self) -> None:
        def one_step() -> torch.Tensor:
            out = self.model.step(self.model.embed_generated(self.tokens, self.positions), self.cache, self.policy)
            self.tokens = out.logits.argmax(-1)
            return out.keep

        keep, seconds = timed(self.device, one_step)
        self.seconds.append(seconds)
        self.outputs_kept += keep[:, 0]
        self.positions += 1
        self.fed += 1

    def recorded_step(self) -> dict[str, int]:
        """One more step after the measurement, its time discarded: the SDPA kernels it reaches."""
        _, kernels = attention_kernels(self.step)
        self.seconds.pop()
        return kernels

    def replicate(self, batch_size: int) -> None:
        """Turn a batch-1 state into `batch_size` identical samples (costs as much to decode as distinct
        ones, without a batch-sized prefill)."""
        rows = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.cache.select(rows)
        for name in ("prompt_lengths", "prompt_kept", "tokens", "positions", "outputs_kept"):
            setattr(self, name, getattr(self, name)[rows])
        self.prefill_bytes *= batch_size

    @torch.no_grad()
    def fill(self, n_generated: int, n_kept: int, sparse_layer: int, seed: int = 0) -> None:
        """Append the cache entries `n_generated` more generated tokens leave behind, of which `n_kept` enter
        the layers >= sparse_layer (random K/V at the cached entries' scale, true positions), and move on as
        if they had been decoded: a step's cost depends on how many entries each layer holds, not on what
        they hold, so long outputs can be timed without decoding every token first."""
        generator = torch.Generator().manual_seed(seed)
        b = len(self.positions)
        every = torch.arange(n_generated)
        kept = (torch.arange(n_kept) * n_generated) // max(n_kept, 1)  # spread evenly over the span
        for index, layer in enumerate(self.cache.layers):
            offsets = every if index < sparse_layer else kept
            n = len(offsets)
            if n == 0:
                continue
            used = layer.k[:, :, :int(layer.lengths.max())]
            scale = float(used.float().std())
            # drawn on the CPU (the same values on every device), then moved beside the layer's cache
            k = (torch.randn(b, used.shape[1], n, used.shape[3], generator=generator) * scale).to(used)
            v = (torch.randn(b, used.shape[1], n, used.shape[3], generator=generator) * scale).to(used)
            positions = self.positions.to(used.device)[:, None] + offsets.to(used.device)[None, :]
            n_new = torch.full((b,), n, dtype=torch.long, device=used.device)
            layer.write(k, v, positions, n_new)
            layer.commit(n_new)
        self.positions += n_generated
        self.outputs_kept += n_kept
        self.fed += n_generated

    def kv_report(self, sparse_layer: int) -> dict[str, Any]:
        """KV bytes, and whether every layer holds exactly the expected entries."""
        lengths = self.cache.lengths()  # [L, B]
        late_expected = self.prompt_kept + self.outputs_kept  # text + kept image + kept output tokens
        ok = bool((lengths[:sparse_layer] == self.prompt_lengths + self.fed).all()
                  and (lengths[sparse_layer:] == late_expected).all())
        per_entry = self.cache.bytes_per_entry()
        return {
            "kv_cache_bytes": int(lengths.sum()) * per_entry,
            "kv_cache_bytes_sparse_layers": int(lengths[sparse_layer:].sum()) * per_entry,
            "kv_cache_bytes_after_prefill": self.prefill_bytes,
            "kv_cache_allocated_bytes": sum(layer.k.nbytes + layer.v.nbytes for layer in self.cache.layers),
            "entries_per_sparse_layer": lengths[sparse_layer:].float().mean(0).tolist(),
            "output_tokens_kept": self.outputs_kept.tolist(),
            "entries_check": ok,
        }


class _Recorder:
    """A policy wrapper that records the hidden states of generated tokens entering sparse_layer."""

    def __init__(self, policy: TokenPolicy) -> None:
        self.policy = policy
        self.sparse_layer, self.eviction = policy.sparse_layer, policy.eviction
        self.hidden: list[torch.Tensor] = []

    def select(self, hidden: torch.Tensor, batch: TokenBatch, probe: AttentionProbe | None = None) -> torch.Tensor:
        self.hidden.append(hidden[(batch.kinds == OUTPUT) & batch.valid])
        return self.policy.select(hidden, batch, probe)


@torch.no_grad()
def calibrate_output_predictor(model: DynamicLlavaForCausalLM, inputs: Inputs, n_tokens: int) -> str:
    """Rescale the random output-text predictor's last Linear so keep-logit - drop-logit has unit spread
    and zero median over the generated tokens of a calibration decode: about half are kept."""
    recorder = _Recorder(make_policy(model, SparsityOptions(output_sparsity=False)))
    decoder = Decoder(model, inputs, recorder)
    for _ in range(n_tokens):
        decoder.step()
    head = model.model.output_text_score_predictor.output_mlp
    logits = head(torch.cat(recorder.hidden)).float()
    margin = logits[:, 0] - logits[:, 1]
    spread = float(margin.std()) if margin.numel() > 1 else 0.0
    scale = 1.0 / spread if spread > 0 else 1.0
    last = head[-1]
    last.weight.mul_(scale)
    last.bias.mul_(scale)
    last.bias[0] -= float(margin.median()) * scale
    return (f"no trained output-text predictor exists: random predictor whose last Linear was rescaled "
            f"(x{scale:.3g}) and its keep bias shifted so that keep-logit > drop-logit for half of the "
            f"{margin.numel()} generated tokens of a greedy calibration decode of the same prompt "
            f"(output sparsification off)")
