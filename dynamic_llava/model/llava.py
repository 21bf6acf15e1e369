"""The Dynamic-LLaVA model: multimodal embedding, and the sparse forward used by prefill and decoding.

One forward handles every inference mode (SPEC 2.2): the new tokens of a batch run through layers
0..K-1 in full; at layer K (the policy's `sparse_layer`) the token policy picks the tokens that stay;
those (plus each sample's last token, which produces the logits) are gathered, keeping their original
RoPE positions, and run through layers K..L-1. The KV cache records only what stays. Prefill, decoding
with the cache (one new token per step) and decoding without it (the whole sequence each step, on a
fresh cache) are the same call with different inputs.

Parameter names follow the original LLaVA-1.5 checkpoints (`model.layers.*`, `model.mm_projector.*`,
`lm_head`) and the Dynamic-LLaVA reference (`model.image_score_predictor.*`,
`model.output_text_score_predictor.*`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..errors import UserError
from .batch import IMAGE, OUTPUT, PAD_POSITION, TEXT, TokenBatch
from .cache import SparseKVCache
from .config import DynamicLlavaConfig, SparseConfig
from .decoder import DecoderLayer, RMSNorm, RotaryEmbedding
from .policy import AttentionProbe, SparsityOptions, TokenPolicy, image_token_index, make_policy
from .predictors import ImageScorePredictor, TokenScorePredictor, init_predictor_weights
from .projector import build_projector
from .sparsity_training import SparsityTraining, decide
from .vision import CLIPVisionTower


def balanced_layer_devices(num_layers: int, devices: Sequence[str | torch.device]) -> list[torch.device]:
    """Which device each decoder layer lives on when a model is split over `devices` (a model larger than
    one GPU): contiguous blocks in device order, as equal as possible; the num_layers % N extra layers go
    to the last devices, because the first one also holds the embeddings, vision tower, projector and
    predictors (the last one holds only the final norm and lm_head besides its layers)."""
    devices = [torch.device(d) for d in devices]
    if not devices:
        raise UserError("a layer placement needs at least one device")
    base, extra = divmod(num_layers, len(devices))
    counts = [base + (i >= len(devices) - extra) for i in range(len(devices))]
    return [device for device, count in zip(devices, counts) for _ in range(count)]


def _place(module: nn.Module, device: torch.device) -> None:
    """Move `module` to `device`; one still on the meta device is materialised there, uninitialised
    (the loader fills it), so a large model never exists whole on one device."""
    if any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        module.to_empty(device=device)
    else:
        module.to(device)


class _Carrier:
    """The per-token tensors every layer needs besides its input, copied once to each device the layers of
    a split model live on (no copy at all when there is one device)."""

    def __init__(self, *tensors: torch.Tensor | None) -> None:
        self.home = next(t for t in tensors if t is not None).device
        self.copies = {self.home: tensors}

    def on(self, device: torch.device) -> tuple[torch.Tensor | None, ...]:
        if device not in self.copies:
            self.copies[device] = tuple(None if t is None else t.to(device) for t in self.copies[self.home])
        return self.copies[device]


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, V] next-token logits (or [B, T, V] for every new token if asked)
    keep: torch.Tensor  # [B, T] the policy's decision for each new token (in input order)


class DynamicLlavaModel(nn.Module):
    """Everything under the `model.` prefix of a LLaVA checkpoint."""

    def __init__(self, config: DynamicLlavaConfig) -> None:
        super().__init__()
        sparse = config.sparse
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.mm_projector = build_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)
        self.vision_tower: CLIPVisionTower | None = None  # attached by the loader; not part of the checkpoint
        self.image_score_predictor = ImageScorePredictor(
            config.hidden_size, sparse.d_model, sparse.nhead, sparse.dim_feedforward, sparse.num_layers)
        self.output_text_score_predictor = TokenScorePredictor(config.hidden_size, sparse.d_model)
        if sparse.use_instruct_predictor:
            self.instruct_score_predictor = TokenScorePredictor(config.hidden_size, sparse.d_model)
        self.gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable


class DynamicLlavaForCausalLM(PreTrainedModel):
    config_class = DynamicLlavaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]
    accepts_loss_kwargs = True  # Trainer counts a step's targets across accumulated batches (num_items_in_batch)

    def __init__(self, config: DynamicLlavaConfig) -> None:
        super().__init__(config)
        self.model = DynamicLlavaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # None: the training forward is dense LLaVA; set by sparsification training (train_sparse).
        self.sparsity_training: SparsityTraining | None = None
        # What `make_policy(model)` builds from when given no options: set once, by the loader's arguments.
        self.sparsity_options = SparsityOptions()
        # The device of each decoder layer once `place_layers` split the model; None: all on one device.
        self.layer_devices: list[torch.device] | None = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # ----------------------------------------------------------------- configuration
    @property
    def sparse(self) -> SparseConfig:
        """The checkpoint's `sparse_config` (what training used; policies are built by `make_policy`)."""
        return self.config.sparse

    def reinit_predictors(self) -> None:
        for name in ("image_score_predictor", "output_text_score_predictor", "instruct_score_predictor"):
            if hasattr(self.model, name):
                init_predictor_weights(getattr(self.model, name))

    # ----------------------------------------------------------------- placement
    def place_layers(self, devices: Sequence[str | torch.device]) -> list[torch.device]:
        """Split the model over `devices` (e.g. ["cuda:0", "cuda:1"] for a 13B on two 24 GB GPUs) and return
        the placement table (layer i on table[i], see `balanced_layer_devices`): embeddings, vision tower,
        projector, predictors and rotary tables on the first device, final norm and lm_head on the last.
        Each layer's KV cache is allocated beside it (`new_cache`); `step` moves hidden states across the
        boundaries. Parts still on the meta device are materialised directly on their device."""
        if getattr(self.config, "tie_word_embeddings", False):
            raise UserError("a model whose lm_head shares the embedding weights cannot be split over devices")
        table = balanced_layer_devices(len(self.model.layers), devices)
        first, last = torch.device(devices[0]), torch.device(devices[-1])
        for name, module in self.model.named_children():
            if name != "layers":
                _place(module, last if name == "norm" else first)
        for layer, device in zip(self.model.layers, table):
            _place(layer, device)
        _place(self.lm_head, last)
        # a non-persistent buffer: recomputed rather than read (to_empty leaves it uninitialised)
        self.model.rotary = RotaryEmbedding(self.config.head_dim, self.config.rope_theta).to(first)
        self.layer_devices = table
        return table

    def _layer_devices(self, like: torch.Tensor) -> list[torch.device]:
        return self.layer_devices or [like.device] * len(self.model.layers)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head(norm(h)) on the head's device, returned on h's."""
        return self.lm_head(self.model.norm(h.to(self.lm_head.weight.device))).to(h.device)

    # ----------------------------------------------------------------- embedding
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> projected image features [n, N, C]."""
        if self.model.vision_tower is None:
            raise UserError("this model has no vision tower attached; load it with load_pretrained_model")
        features = self.model.vision_tower(pixel_values)
        return self.model.mm_projector(features.to(self.lm_head.weight.dtype))

    def embed(self, input_ids: Sequence[Sequence[int] | torch.Tensor],
              images: Sequence[torch.Tensor | None] | None = None,
              generated_counts: Sequence[int] | None = None) -> TokenBatch:
        """Prompts (token ids with IMAGE_TOKEN_INDEX placeholders) and per-sample pixels -> TokenBatch.

        images[i] is a [n_i, 3, H, W] tensor (or None) for the n_i placeholders of prompt i. The last
        generated_counts[i] tokens of prompt i are earlier generated output (decoding without cache).
        """
        ids = [torch.as_tensor(x, dtype=torch.long).flatten() for x in input_ids]
        images = list(images) if images is not None else [None] * len(ids)
        if len(images) != len(ids):
            raise UserError(f"got {len(images)} image entries for {len(ids)} prompts")
        counts = [int((x == IMAGE_TOKEN_INDEX).sum()) for x in ids]
        for i, (n, img) in enumerate(zip(counts, images)):
            n_img = 0 if img is None else img.shape[0]
            if n != n_img:
                raise UserError(f"prompt {i} has {n} <image> placeholder(s) but {n_img} image(s) were given")
        device = self.model.embed_tokens.weight.device
        pixels = [img for img in images if img is not None and img.shape[0] > 0]
        features = self.encode_images(torch.cat(pixels)) if pixels else None
        pieces, kinds, image_ids = [], [], []
        next_image = 0
        for x in ids:
            x = x.to(device)
            segments, seg_kinds, seg_images = [], [], []
            bounds = [-1] + (x == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist() + [len(x)]
            for start, stop in zip(bounds[:-1], bounds[1:]):
                text = x[start + 1:stop]
                segments.append(self.model.embed_tokens(text))
                seg_kinds.append(torch.full((len(text),), TEXT, device=device))
                seg_images.append(torch.full((len(text),), -1, device=device))
                if stop < len(x):
                    feats = features[next_image]
                    segments.append(feats)
                    seg_kinds.append(torch.full((len(feats),), IMAGE, device=device))
                    seg_images.append(torch.full((len(feats),), next_image, device=device))
                    next_image += 1
            pieces.append(torch.cat(segments))
            kinds.append(torch.cat(seg_kinds))
            n_generated = generated_counts[len(kinds) - 1] if generated_counts else 0
            if n_generated:
                kinds[-1][-n_generated:] = OUTPUT
            image_ids.append(torch.cat(seg_images))
        return _right_pad(pieces, kinds, image_ids)

    def embed_generated(self, token_ids: torch.Tensor, positions: torch.Tensor) -> TokenBatch:
        """One generated token per sample ([B]) at its true positions ([B]) -> TokenBatch of length 1."""
        b = token_ids.shape[0]
        device = token_ids.device
        return TokenBatch(
            embeds=self.model.embed_tokens(token_ids[:, None]),
            positions=positions[:, None],
            lengths=torch.ones(b, dtype=torch.long, device=device),
            kinds=torch.full((b, 1), OUTPUT, device=device),
            image_ids=torch.full((b, 1), -1, device=device),
        )

    # ----------------------------------------------------------------- forward
    def new_cache(self, batch_size: int, capacity: int = 0) -> SparseKVCache:
        cfg = self.config
        weight = self.lm_head.weight
        return SparseKVCache(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim,
                             weight.dtype, self.layer_devices or weight.device, capacity)

    def step(self, batch: TokenBatch, cache: SparseKVCache, policy: TokenPolicy | None = None,
             all_logits: bool = False) -> StepOutput:
        """Run the new tokens of `batch` through the model, updating `cache` (see module docstring).

        Returns next-token logits per sample, or with `all_logits` logits for every new token in input
        order (rows of tokens dropped at sparse_layer are NaN: they never reached the head). With an
        evicting policy (H2O) and a non-empty cache, layers >= sparse_layer evict after their commit.
        """
        policy = policy or make_policy(self)
        sparse_layer = policy.sparse_layer
        # H2O evicts cached generated tokens; other policies have no eviction and keep fused attention.
        eviction = policy.eviction
        track = False
        if eviction is not None:
            track = bool((cache.layers[0].lengths > 0).any())  # at prefill (empty cache) H2O does nothing
            if not track and bool(((batch.kinds == OUTPUT) & batch.valid).any()):
                raise UserError("output_policy 'h2o' evicts entries of the KV cache: it needs decoding with the "
                                "cache (use_cache=True); choose another output policy to decode without it")
        h = batch.embeds
        home, placement = h.device, self._layer_devices(h)
        cos, sin = self.model.rotary(batch.positions, h.dtype)
        probe_input = h
        early, late = slice(None, sparse_layer), slice(sparse_layer, None)
        carry = _Carrier(cos, sin, batch.positions, batch.lengths)
        for layer, layer_cache, device in zip(self.model.layers[early], cache.layers[early], placement[early]):
            probe_input = h = h.to(device)
            layer_cos, layer_sin, positions, lengths = carry.on(device)
            h = layer(h, layer_cos, layer_sin, positions, lengths, layer_cache)
            layer_cache.commit(lengths)
        probe = self._attention_probe(probe_input, batch, cos, sin, sparse_layer)
        h = h.to(home)  # the policy, its predictors and the batch live on the first device
        keep = policy.select(h, batch, probe) & batch.valid if sparse_layer < len(self.model.layers) else batch.valid
        processed = keep | (batch.is_last & batch.valid)
        sub, order = _gather_processed(batch, h, processed)  # kept ones precede a dropped last token
        h, n_processed = sub.embeds, sub.lengths
        n_kept = keep.sum(1)
        cos, sin = self.model.rotary(sub.positions, h.dtype)
        generated = sub.kinds == OUTPUT if track else None
        carry = _Carrier(cos, sin, sub.positions, sub.lengths, n_kept, generated)
        for layer, layer_cache, device in zip(self.model.layers[late], cache.layers[late], placement[late]):
            if track:
                layer_cache.track_attention()
            h = h.to(device)
            layer_cos, layer_sin, positions, lengths, layer_kept, layer_generated = carry.on(device)
            h = layer(h, layer_cos, layer_sin, positions, lengths, layer_cache)
            layer_cache.commit(layer_kept, layer_generated)
            if track:
                eviction.evict(layer_cache)
        h = self.model.norm(h.to(self.lm_head.weight.device))
        if all_logits:
            logits = self.lm_head(h).to(home)
            full = logits.new_full((*batch.positions.shape, logits.shape[-1]), float("nan"))
            rows = torch.arange(order.shape[1], device=order.device)[None, :] < n_processed[:, None]
            sample_idx = torch.arange(order.shape[0], device=order.device)[:, None].expand_as(order)
            full[sample_idx[rows], order[rows]] = logits[rows]
            return StepOutput(full, keep)
        last = h[torch.arange(h.shape[0], device=h.device), n_processed.to(h.device) - 1]
        return StepOutput(self.lm_head(last).to(home), keep)

    def _attention_probe(self, layer_input: torch.Tensor, batch: TokenBatch, cos: torch.Tensor,
                         sin: torch.Tensor, sparse_layer: int) -> AttentionProbe | None:
        """FastV's signal at layer sparse_layer - 1 (whose input is `layer_input`), computed only if asked;
        None when tokens are dropped before the first layer (no layer has attended yet).

        Covers the tokens of this forward: the prompt, when image tokens are being ranked at prefill."""
        if sparse_layer == 0:
            return None
        layer = self.model.layers[sparse_layer - 1]
        device, home = layer.input_layernorm.weight.device, batch.embeds.device
        return lambda: layer.last_token_attention(*(t.to(device) for t in (
            layer_input, cos, sin, batch.positions, batch.lengths))).to(home)

    def forward_full(self, input_ids: Sequence[Sequence[int] | torch.Tensor],
                     images: Sequence[torch.Tensor | None] | None = None,
                     policy: TokenPolicy | None = None) -> StepOutput:
        """Logits for every token of each prompt (one pass, no cache kept): for parity checks."""
        batch = self.embed(input_ids, images)
        return self.step(batch, self.new_cache(batch.embeds.shape[0]), policy, all_logits=True)

    def forward_masked(self, input_ids: Sequence[Sequence[int] | torch.Tensor],
                       images: Sequence[torch.Tensor | None] | None = None,
                       policy: TokenPolicy | None = None) -> StepOutput:
        """Like `forward_full` but nothing is removed: from sparse_layer on, the policy's dropped tokens
        are hidden as keys by the training-time masked softmax (each token still sees itself)."""
        policy = policy or make_policy(self)
        batch = self.embed(input_ids, images)
        sparse_layer = policy.sparse_layer
        probe_layer = max(sparse_layer - 1, 0)
        probe_input = self._train_layers(batch, 0, probe_layer, None)
        h = self._train_layers(batch, probe_layer, sparse_layer, None, probe_input)
        cos, sin = self.model.rotary(batch.positions, h.dtype)
        probe = self._attention_probe(probe_input, batch, cos, sin, sparse_layer)
        keep = policy.select(h, batch, probe) & batch.valid
        h = self._train_layers(batch, sparse_layer, len(self.model.layers), keep.to(h.dtype), h)
        return StepOutput(self._logits(h), keep)

    # ----------------------------------------------------------------- training
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                images: Sequence[torch.Tensor | None] | torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | int | None = None,
                num_samples_in_step: torch.Tensor | int | None = None,
                image_token_subsets: Sequence[Sequence[Sequence[int] | None] | None] | None = None
                ) -> TrainingOutput:
        """Training forward (what `Trainer` calls): right-padded `input_ids` [B, T] with IMAGE_TOKEN_INDEX
        placeholders, `labels` aligned with them, per-sample `images` -> loss.

        Dense LLaVA training by default; with `sparsity_training` set, Dynamic-LLaVA's masked view
        (SPEC 2.3): sampled keep decisions at sparse_layer, masked softmax in the later layers, and
        loss = LM loss + mask_loss_weight x keep-rate regulariser.

        When an optimiser step accumulates several batches, `num_items_in_batch` is the step's target
        count and `num_samples_in_step` its sample count: the LM loss is then this batch's summed loss
        over the former and the regulariser its samples' summed terms over the latter, so the step's
        losses add up to one big batch's (each sample's regulariser weighs 1/B of the step, whatever its
        batch's token count). Without them both are this batch's means.

        `image_token_subsets` (dense training only): per sample, None or per image the indices of the image
        tokens the LLM sees (None: all); the others are removed before the first layer, the rest keep their
        RoPE positions, as when a policy drops them at sparse_layer 0 in inference.
        """
        ids, label_rows = _unpad(input_ids, labels, attention_mask)
        batch = self.embed(ids, _per_sample_images(images, ids))
        expanded = _expand_labels(batch, ids, label_rows)
        if image_token_subsets is not None:
            if self.sparsity_training is not None:
                raise UserError("image token subsets train the dense model; Dynamic-LLaVA's sparsification "
                                "training chooses the image tokens itself")
            batch, expanded = _keep_image_tokens(batch, expanded, _per_image_subsets(image_token_subsets, ids))
        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        if max_length and batch.embeds.shape[1] > max_length:
            batch, expanded = batch.truncate(max_length), expanded[:, :max_length]
        sparse = self.sparse  # training's keep rates and sparse_layer: the checkpoint's
        sparse_layer = min(sparse.sparse_layer, len(self.model.layers))
        h = self._train_layers(batch, 0, sparse_layer, None)
        decisions = None
        if self.sparsity_training is not None and sparse_layer < len(self.model.layers):
            decisions = decide(h, batch, expanded, sparse, self.model.image_score_predictor,
                               self.model.output_text_score_predictor, self.sparsity_training.tau,
                               self.sparsity_training.image_decision)
        keep, decided = (decisions.keep, decisions.decided) if decisions is not None else (None, None)
        h = self._train_layers(batch, sparse_layer, len(self.model.layers), keep, h, decided)
        logits = self._logits(h)
        targets = expanded[:, 1:].masked_fill(~batch.valid[:, 1:], IGNORE_INDEX)
        n_targets = (targets != IGNORE_INDEX).sum()
        # Summed then divided: a batch whose answers were all truncated away gives 0, not NaN.
        summed = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
        lm_loss = summed / n_targets.clamp(min=1)  # this batch's mean, also what is logged
        target_count = n_targets if num_items_in_batch is None else num_items_in_batch
        loss = summed / torch.as_tensor(target_count, device=summed.device).clamp(min=1)
        if decisions is None:
            return TrainingOutput(loss=loss, logits=logits, lm_loss=lm_loss.detach())
        sample_count = len(ids) if num_samples_in_step is None else num_samples_in_step
        regulariser = decisions.mask_loss_sum / torch.as_tensor(sample_count, device=summed.device).clamp(min=1)
        loss = loss + sparse.mask_loss_weight * regulariser
        return TrainingOutput(loss=loss, logits=logits, lm_loss=lm_loss.detach(), **decisions.stats)

    def _train_layers(self, batch: TokenBatch, start: int, stop: int, keep: torch.Tensor | None,
                      h: torch.Tensor | None = None, decided: torch.Tensor | None = None) -> torch.Tensor:
        """Layers start..stop-1 over whole sequences without a cache (activation checkpointing if enabled);
        the result is on the batch's device. `keep` / `decided`: see TrainingDecisions."""
        h = batch.embeds if h is None else h
        home = batch.embeds.device
        carry = _Carrier(*self.model.rotary(batch.positions, h.dtype), keep, batch.valid, decided)
        for layer, device in zip(self.model.layers[start:stop], self._layer_devices(h)[start:stop]):
            h = h.to(device)
            cos, sin, layer_keep, valid, layer_decided = carry.on(device)
            if self.model.gradient_checkpointing and self.training:
                h = checkpoint(layer.forward_train, h, cos, sin, layer_keep, valid, layer_decided, use_reentrant=False)
            else:
                h = layer.forward_train(h, cos, sin, layer_keep, valid, layer_decided)
        return h.to(home)


@dataclass
class TrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    vision_mask_loss: torch.Tensor | None = None
    output_mask_loss: torch.Tensor | None = None
    vision_keep: torch.Tensor | None = None  # actual kept fraction of image tokens
    output_keep: torch.Tensor | None = None  # actual kept fraction of eligible answer tokens


def _unpad(input_ids: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    rows = range(input_ids.shape[0])
    if attention_mask is None:
        ids = [input_ids[i] for i in rows]
    else:
        ids = [input_ids[i][attention_mask[i].bool()] for i in rows]
    if labels is None:
        return ids, [torch.full_like(x, IGNORE_INDEX) for x in ids]
    if attention_mask is None:
        return ids, [labels[i] for i in rows]
    return ids, [labels[i][attention_mask[i].bool()] for i in rows]


def _per_sample_images(images: Sequence[torch.Tensor | None] | torch.Tensor | None,
                       ids: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Accept LLaVA's stacked [B, 3, H, W] (one image per sample that has a placeholder) or a list."""
    if images is None:
        return [None] * len(ids)
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return [images[i:i + 1] if bool((x == IMAGE_TOKEN_INDEX).any()) else None for i, x in enumerate(ids)]
    return [None if img is None else (img[None] if img.dim() == 3 else img) for img in images]


def _per_image_subsets(subsets: Sequence[Sequence[Sequence[int] | None] | None],
                       ids: list[torch.Tensor]) -> list[Sequence[int] | None]:
    """Per-sample subsets -> one entry per image of the batch, in batch order (None: every token)."""
    if len(subsets) != len(ids):
        raise UserError(f"got image token subsets for {len(subsets)} samples, the batch has {len(ids)}")
    flat: list[Sequence[int] | None] = []
    for i, (sample, x) in enumerate(zip(subsets, ids)):
        n_images = int((x == IMAGE_TOKEN_INDEX).sum())
        sample = [None] * n_images if sample is None else list(sample)
        if len(sample) != n_images:
            raise UserError(f"sample {i} has {n_images} image(s) but {len(sample)} image token subset(s)")
        flat += sample
    return flat


def _keep_image_tokens(batch: TokenBatch, labels: torch.Tensor, subsets: list[Sequence[int] | None]
                       ) -> tuple[TokenBatch, torch.Tensor]:
    """The batch and its labels [B, T] without the image tokens outside each image's subset (kept tokens in
    their order, with their positions)."""
    keep = batch.valid.clone()
    if any(subset is not None for subset in subsets):
        samples, slots = image_token_index(batch)
        n_tokens = slots.shape[1]
        for image, subset in enumerate(subsets):
            if subset is None:
                continue
            index = torch.as_tensor(subset, dtype=torch.long, device=keep.device)
            if index.numel() and not (0 <= int(index.min()) and int(index.max()) < n_tokens):
                raise UserError(f"an image token subset holds an index outside 0..{n_tokens - 1}")
            row = torch.zeros(n_tokens, dtype=torch.bool, device=keep.device)
            keep[samples[image], slots[image]] = row.index_fill(0, index, True)
    kept, order = _gather_processed(batch, batch.embeds, keep)
    return kept, labels.gather(1, order)


def _gather_processed(batch: TokenBatch, h: torch.Tensor, processed: torch.Tensor) -> tuple[TokenBatch, torch.Tensor]:
    """The tokens where `processed` [B, T], first and in their original order, with their positions and their
    hidden states `h` [B, T, C]; and the gather index [B, T'] (slot of each kept token in the input)."""
    lengths = processed.sum(1)
    order = torch.sort((~processed).to(torch.int8), dim=1, stable=True).indices[:, : int(lengths.max())]
    return batch.gather(order, lengths, h.gather(1, order[..., None].expand(-1, -1, h.shape[-1]))), order


def _expand_labels(batch: TokenBatch, ids: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """Labels aligned with the embedded batch: image tokens and padding are IGNORE_INDEX."""
    expanded = torch.full(batch.kinds.shape, IGNORE_INDEX, dtype=torch.long, device=batch.kinds.device)
    text_slots = (batch.kinds == TEXT) & batch.valid  # row-major, so samples' text tokens come in order
    values = torch.cat([y[x != IMAGE_TOKEN_INDEX] for x, y in zip(ids, labels)]).to(expanded.device)
    return expanded.masked_scatter(text_slots, values)


def _right_pad(embeds: list[torch.Tensor], kinds: list[torch.Tensor], image_ids: list[torch.Tensor]) -> TokenBatch:
    lengths = torch.tensor([len(e) for e in embeds], device=embeds[0].device)
    t = int(lengths.max())
    pad = lambda xs, value: torch.stack([torch.cat([x, x.new_full((t - len(x), *x.shape[1:]), value)]) for x in xs])
    valid = torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]
    positions = torch.where(valid, torch.arange(t, device=lengths.device)[None, :], PAD_POSITION)
    return TokenBatch(pad(embeds, 0.0), positions, lengths, pad(kinds, TEXT), pad(image_ids, -1))
