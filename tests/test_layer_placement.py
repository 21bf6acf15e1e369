"""A model split over several devices (`place_layers`, `load_pretrained_model(devices=...)`, the worker's
`--num-gpus`): the placement table, each part and each layer's KV cache on its device, and the same tokens
and logits as the unsplit model. No GPU here: "devices" are all "cpu", or "cpu" and "meta" where only
placement (not computation) is checked."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from dynamic_llava.constants import IMAGE_TOKEN_INDEX
from dynamic_llava.errors import UserError
from dynamic_llava.generation import GenerationConfig, generate
from dynamic_llava.model.config import DynamicLlavaConfig
from dynamic_llava.model.decoder import RotaryEmbedding
from dynamic_llava.model.llava import DynamicLlavaForCausalLM, balanced_layer_devices
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.model.policy import SparsityOptions, make_policy
from dynamic_llava.serve.options import gpu_devices

CPU, META = torch.device("cpu"), torch.device("meta")


@pytest.mark.parametrize("layers, n_devices, counts", [
    (40, 2, [20, 20]),  # 13B on two GPUs
    (32, 3, [10, 11, 11]),  # the extra layers go to the later devices (the first also holds tower and embeddings)
    (4, 1, [4]),
    (5, 4, [1, 1, 1, 2]),
])
def test_placement_table_is_contiguous_and_balanced(layers: int, n_devices: int, counts: list[int]) -> None:
    devices = [f"cuda:{i}" for i in range(n_devices)]
    table = balanced_layer_devices(layers, devices)
    assert len(table) == layers
    assert table == sorted(table, key=lambda d: d.index)  # contiguous blocks in device order
    assert [table.count(torch.device(d)) for d in devices] == counts


def test_placement_needs_a_device() -> None:
    with pytest.raises(UserError):
        balanced_layer_devices(4, [])


def _tiny(device: torch.device | str = "cpu") -> DynamicLlavaForCausalLM:
    config = DynamicLlavaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, mm_hidden_size=16,
                                sparse_config=dict(d_model=32, nhead=4, dim_feedforward=64))
    with torch.device(device):
        return DynamicLlavaForCausalLM(config).eval()


def test_each_part_and_each_cache_layer_lives_on_its_device() -> None:
    model = _tiny()
    assert model.place_layers(["cpu", "meta"]) == [CPU, CPU, META, META]
    inner = model.model
    for first in (inner.embed_tokens, inner.mm_projector, inner.image_score_predictor,
                  inner.output_text_score_predictor, inner.rotary):
        assert {t.device for t in (*first.parameters(), *first.buffers())} == {CPU}
    for last in (inner.norm, model.lm_head):
        assert {p.device for p in last.parameters()} == {META}
    assert [{p.device for p in layer.parameters()} for layer in inner.layers] == [{CPU}, {CPU}, {META}, {META}]
    cache = model.new_cache(2, capacity=3)
    assert [(layer.k.device, layer.v.device, layer.positions.device, layer.lengths.device)
            for layer in cache.layers] == [(d, d, d, d) for d in (CPU, CPU, META, META)]
    cache.select(torch.tensor([1]))  # rows from the batch's device reach every layer
    assert [layer.k.shape[0] for layer in cache.layers] == [1] * 4


@pytest.mark.parametrize("devices", [["cpu", "meta"], ["cpu", "meta", "meta", "meta"]])  # boundary after / before
def test_hidden_states_and_per_token_tensors_cross_to_the_next_device_at_the_boundary(devices: list[str]) -> None:
    """A prefill through layers on the CPU then on "meta" (a second device that computes shapes only): each
    layer receives its input, rotary tables, positions and lengths on its own device, and its cache there.
    Meta cannot finish the step (values are read), so only the layers reached are checked: at least the
    first one past the boundary (the boundary falls after / before sparse_layer = 2)."""
    model = _tiny()
    table = model.place_layers(devices)
    seen: dict[int, set[torch.device]] = {}
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda module, args, index=index: seen.__setitem__(
            index, {t.device for t in args[:5]} | {args[5].k.device}))
    batch = model.embed([torch.tensor([1, 5, 6, 7, 8])], None)
    with contextlib.suppress(RuntimeError, NotImplementedError):
        model.step(batch, model.new_cache(1), make_policy(model, SparsityOptions(sparse=False)))
    assert set(range(table.index(META) + 1)) <= set(seen)
    assert all(devices == {table[index]} for index, devices in seen.items())


def test_a_meta_built_model_is_materialised_on_its_devices() -> None:
    model = _tiny("meta")
    model.place_layers(["cpu", "cpu"])
    assert {p.device for p in model.parameters()} == {CPU}
    fresh = RotaryEmbedding(model.config.head_dim, model.config.rope_theta)
    assert torch.equal(model.model.rotary.inv_freq, fresh.inv_freq)  # recomputed, not left uninitialised


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir: Path):
    """The tiny checkpoint unsplit, and split over two devices (both the CPU)."""
    tokenizer, whole, _, _ = load_pretrained_model(tiny_llava_dir)
    _, split, _, _ = load_pretrained_model(tiny_llava_dir, devices=["cpu", "cpu"])
    return tokenizer, whole, split


def _inputs(tokenizer, model: DynamicLlavaForCausalLM) -> tuple[list[list[int]], list[torch.Tensor]]:
    size = model.model.vision_tower.vision_tower.config.image_size
    prompts, images = [], []
    for i, text in enumerate(["What is in the picture?", "Describe it in detail, please."]):
        ids = tokenizer(text).input_ids
        prompts.append(ids[:2] + [IMAGE_TOKEN_INDEX] + ids[2:])
        images.append(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(i)))
    return prompts, images


def test_split_load_places_layers_and_matches_the_unsplit_model(loaded) -> None:
    tokenizer, whole, split = loaded
    n = whole.config.num_hidden_layers
    assert whole.layer_devices is None and split.layer_devices == balanced_layer_devices(n, ["cpu", "cpu"])
    for (name, a), (_, b) in zip(whole.state_dict().items(), split.state_dict().items()):
        assert torch.equal(a, b), name
    prompts, images = _inputs(tokenizer, whole)
    with torch.inference_mode():
        for options in (SparsityOptions(sparse=False), SparsityOptions()):
            a = whole.forward_full(prompts, images, make_policy(whole, options))
            b = split.forward_full(prompts, images, make_policy(split, options))
            assert torch.equal(a.keep, b.keep)
            assert torch.equal(a.logits.nan_to_num(), b.logits.nan_to_num())
        config = GenerationConfig(max_new_tokens=6, temperature=0.0)
        # the checkpoint's predictors, and H2O (which evicts from the caches of the later layers)
        for options in (SparsityOptions(), SparsityOptions(output_policy="h2o", output_text_keep_rate=0.3)):
            ours = generate(split, tokenizer, prompts, images, config, make_policy(split, options))
            reference = generate(whole, tokenizer, prompts, images, config, make_policy(whole, options))
            assert [r.token_ids for r in ours] == [r.token_ids for r in reference]
            assert [r.kv_cache_bytes for r in ours] == [r.kv_cache_bytes for r in reference]


def test_split_cache_layers_follow_the_table(loaded) -> None:
    _, _, split = loaded
    cache = split.new_cache(1)
    assert [layer.k.device for layer in cache.layers] == split.layer_devices


def test_num_gpus_names_cuda_devices_or_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpu_devices(1, "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpu_devices(2, None) == gpu_devices(2, "cuda") == ["cuda:0", "cuda:1"]
    with pytest.raises(UserError, match="only 2 GPU"):
        gpu_devices(3, None)
    with pytest.raises(UserError, match="leave --device unset or cuda"):
        gpu_devices(2, "cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="only 0 GPU"):
        gpu_devices(2, None)
