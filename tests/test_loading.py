"""Checkpoint loading, saving and conversion on tiny checkpoints in the real layouts; dense parity with
transformers' own LLaVA and LLaMA implementations of the same weights."""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (AutoProcessor, AutoTokenizer, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                          LlavaForConditionalGeneration)

from dynamic_llava.constants import IMAGE_TOKEN_INDEX
from dynamic_llava.errors import UserError
from dynamic_llava.model.convert import convert_checkpoint
from dynamic_llava.model.llava import DynamicLlavaForCausalLM
from dynamic_llava.model.loading import load_pretrained_model, save_pretrained_llava
from dynamic_llava.model.policy import DensePolicy, make_policy
from dynamic_llava.tiny.checkpoint import make_tiny_checkpoint
from dynamic_llava.tiny.tokenizer import train_tiny_tokenizer
from transformers_reference import transformers_llama

PROMPT = "A chat between a curious user and an artificial intelligence assistant. USER: "
QUESTION = "\nWhat color is the cat? ASSISTANT:"


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _load(path: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-predictor warning is tested on its own
        return load_pretrained_model(path, **kwargs)


def _image_prompt(tokenizer) -> list[int]:
    return (tokenizer(PROMPT).input_ids + [IMAGE_TOKEN_INDEX]
            + tokenizer(QUESTION, add_special_tokens=False).input_ids)


def _pixels(processor) -> torch.Tensor:
    array = (np.random.RandomState(0).rand(240, 320, 3) * 255).astype("uint8")
    return processor(images=Image.fromarray(array), return_tensors="pt")["pixel_values"]


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


# ----------------------------------------------------------------------------- the three layouts
@pytest.mark.parametrize("fixture", ["tiny_llava_dir", "tiny_llava_nopred_dir", "tiny_hf_dir"])
def test_each_layout_loads(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    tokenizer, model, processor, context_len = _load(path)
    assert isinstance(model, DynamicLlavaForCausalLM) and not model.training
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 4
    assert model.model.vision_tower is not None and model.model.vision_tower.num_patches == 576
    assert next(model.parameters()).dtype == torch.float32
    assert processor.crop_size == {"height": 336, "width": 336}
    assert context_len == 4096
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert tokenizer.padding_side == "right"
    with torch.no_grad():
        logits = model.forward_full([_image_prompt(tokenizer)], images=[_pixels(processor)]).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits[0, -1]).all()


def test_sentencepiece_only_tokenizer_loads_the_same(tiny_llava_dir: Path, tmp_path: Path) -> None:
    """Released LLaVA-1.5 folders hold only tokenizer.model + tokenizer_config.json (no tokenizer.json)."""
    ckpt = _copy(tiny_llava_dir, tmp_path / "sp", "tokenizer*")
    train_tiny_tokenizer(ckpt)
    assert not (ckpt / "tokenizer.json").exists()
    sp_tokenizer, _, _, _ = _load(ckpt)
    tokenizer, _, _, _ = _load(tiny_llava_dir)
    for text in (PROMPT + QUESTION, "Zürich 12.5 km, ok?\n ###Human: </s>"):
        assert sp_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert sp_tokenizer.decode(sp_tokenizer(QUESTION).input_ids, skip_special_tokens=True) == QUESTION


def _reference_predictor_names() -> set[str]:
    """SPEC 2.1: the parameter names of the released Dynamic-LLaVA checkpoints."""
    image = {f"down_mlp.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    for block in (0, 1):
        prefix = f"transformer.{block}."
        image |= {prefix + "attn.qkv.weight"}
        image |= {prefix + f"{m}.{p}" for m in ("norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                  for p in ("weight", "bias")}
    image |= {f"output_mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    text = {f"output_mlp.{i}.{p}" for i in (0, 1, 3, 5, 7) for p in ("weight", "bias")}
    return ({f"model.image_score_predictor.{n}" for n in image}
            | {f"model.output_text_score_predictor.{n}" for n in text})


def test_predictor_weights_have_reference_names(tiny_llava_dir: Path) -> None:
    stored = load_file(tiny_llava_dir / "model.safetensors")
    assert {k for k in stored if "score_predictor" in k} == _reference_predictor_names()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint loads without the "freshly initialised" warning
        _, model, _, _ = load_pretrained_model(tiny_llava_dir)
    state = model.state_dict()
    assert {k for k in state if "score_predictor" in k} == _reference_predictor_names()
    for name in _reference_predictor_names():
        assert torch.equal(state[name], stored[name]), name


def test_checkpoint_without_predictors_warns_and_initialises(tiny_llava_nopred_dir: Path) -> None:
    config = json.loads((tiny_llava_nopred_dir / "config.json").read_text())
    assert "sparse_config" not in config
    assert not any("score_predictor" in k for k in load_file(tiny_llava_nopred_dir / "model.safetensors"))
    with pytest.warns(UserWarning, match="freshly initialised"):
        _, model, _, _ = load_pretrained_model(tiny_llava_nopred_dir)
    weight = model.model.image_score_predictor.down_mlp[1].weight
    assert 0.015 < weight.std().item() < 0.025
    assert torch.count_nonzero(model.model.output_text_score_predictor.output_mlp[1].bias) == 0
    assert model.sparse.use_vision_predictor  # defaults: this is the start of sparsification training


def test_dense_load_of_a_checkpoint_without_predictors_does_not_warn(tiny_llava_nopred_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, model, _, _ = load_pretrained_model(tiny_llava_nopred_dir, sparse=False)
    assert isinstance(make_policy(model), DensePolicy)


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("max_shard_size", ["5GB", "300KB"])
def test_save_load_round_trip_is_exact(tiny_llava_dir: Path, tmp_path: Path, max_shard_size: str) -> None:
    tokenizer, model, _, _ = _load(tiny_llava_dir)
    out = save_pretrained_llava(model, tokenizer, tmp_path / "saved", max_shard_size=max_shard_size)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_size == "300KB")
    assert not any(k.startswith("model.vision_tower") for f in out.glob("*.safetensors") for k in load_file(f))
    tokenizer2, model2, _, _ = _load(out)
    _assert_same_state(_state(model), _state(model2))
    assert model2.config.to_llava_dict() == model.config.to_llava_dict()
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_llava_dir / "config.json").read_text())
    text = "What is in the image? 12 cats."
    assert tokenizer2(text).input_ids == tokenizer(text).input_ids and len(tokenizer2) == len(tokenizer)


def test_save_into_existing_folder_replaces_old_weights(tiny_llava_dir: Path, tmp_path: Path) -> None:
    tokenizer, model, _, _ = _load(tiny_llava_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "trainer_state.json").write_text("{}")
    save_pretrained_llava(model, tokenizer, out, max_shard_size="300KB")
    save_pretrained_llava(model, tokenizer, out)
    assert (out / "trainer_state.json").exists()
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_llava_hf_llava_round_trip_is_exact(tiny_llava_dir: Path, tmp_path: Path) -> None:
    hf = convert_checkpoint(tiny_llava_dir, tmp_path / "hf", to="hf")
    hf_config = json.loads((hf / "config.json").read_text())
    assert hf_config["model_type"] == "llava" and hf_config["image_token_index"] == 1000
    assert hf_config["text_config"]["vocab_size"] == 1001 and "sparse_config" in hf_config
    hf_tokenizer = AutoTokenizer.from_pretrained(hf)
    assert hf_tokenizer.convert_tokens_to_ids("<image>") == 1000 and len(hf_tokenizer) == 1001
    processor = AutoProcessor.from_pretrained(hf)
    array = np.zeros((50, 70, 3), dtype="uint8")
    inputs = processor(images=Image.fromarray(array), text="USER: <image>\nHi ASSISTANT:", return_tensors="pt")
    assert (inputs["input_ids"] == 1000).sum() == 576

    back = convert_checkpoint(hf, tmp_path / "back", to="llava")
    _assert_same_state(load_file(tiny_llava_dir / "model.safetensors"), load_file(back / "model.safetensors"))
    original = json.loads((tiny_llava_dir / "config.json").read_text())
    restored = json.loads((back / "config.json").read_text())
    assert restored.pop("mm_vision_tower") == "vision_tower"
    original.pop("mm_vision_tower")
    assert restored == original
    tower_a = CLIPVisionModel.from_pretrained(tiny_llava_dir / "vision_tower").state_dict()
    tower_b = CLIPVisionModel.from_pretrained(back / "vision_tower").state_dict()
    _assert_same_state(tower_a, tower_b)
    tok_a, tok_b = AutoTokenizer.from_pretrained(tiny_llava_dir), AutoTokenizer.from_pretrained(back)
    assert len(tok_b) == len(tok_a) == 1000 and "<image>" not in tok_b.get_vocab()
    text = PROMPT + "<image>" + QUESTION
    assert tok_b(text).input_ids == tok_a(text).input_ids
    # the relative `vision_tower` resolves against the checkpoint folder
    _, model, _, _ = _load(back)
    _assert_same_state(model.model.vision_tower.vision_tower.state_dict(), tower_a)


def test_hf_layout_holds_the_same_model(tiny_llava_dir: Path, tiny_hf_dir: Path, tmp_path: Path) -> None:
    tokenizer, llava, processor, _ = _load(tiny_llava_dir)
    _, hf, _, _ = _load(tiny_hf_dir)
    assert hf.config.vocab_size == 1001 and hf.config.mm_vision_tower == "vision_tower"
    a, b = _state(llava), _state(hf)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(b.pop(name)[:1000], a.pop(name))
    _assert_same_state(a, b)
    # saving an hf-loaded model writes its tower into the checkpoint, where `mm_vision_tower` points
    out = save_pretrained_llava(hf, tokenizer, tmp_path / "from_hf", image_processor=processor)
    assert (out / "vision_tower" / "model.safetensors").exists()
    _, again, _, _ = _load(out)
    _assert_same_state(_state(hf), _state(again))


def test_sharded_bin_checkpoint_loads_the_same_weights(tiny_llava_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "bin"
    shutil.copytree(tiny_llava_dir, ckpt, ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(tiny_llava_dir / "model.safetensors")
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    # what old transformers / DeepSpeed put into real LLaVA shards, and the loader must ignore
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
             "model.vision_tower.vision_tower.vision_model.post_layernorm.weight": torch.ones(32)}
    weight_map = {}
    for i, (file, keys) in enumerate(shards.items()):
        shard = {k: state[k] for k in keys} | (extra if i == 1 else {})
        torch.save(shard, ckpt / file)
        weight_map |= {k: file for k in shard}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    # older LLaVA releases say `model_type: llava` (not `llava_llama`)
    (ckpt / "config.json").write_text(json.dumps(_config(ckpt) | {"model_type": "llava"}))
    _, from_bin, _, _ = _load(ckpt)
    _, from_safetensors, _, _ = _load(tiny_llava_dir)
    _assert_same_state(_state(from_bin), _state(from_safetensors))


# ----------------------------------------------------------------------------- dense parity with transformers
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_dense_parity_with_transformers_llava(tiny_llava_dir: Path, tmp_path: Path, kv_heads: int) -> None:
    source = tiny_llava_dir if kv_heads == 4 else make_tiny_checkpoint(tmp_path / "gqa", num_key_value_heads=2)
    tokenizer, model, processor, _ = _load(source, sparse=False)
    assert model.config.num_key_value_heads == kv_heads
    hf_dir = convert_checkpoint(source, tmp_path / "hf", to="hf")
    reference = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids, pixels = _image_prompt(tokenizer), _pixels(processor)
    expanded = []
    for token in ids:
        expanded += [reference.config.image_token_index] * 576 if token == IMAGE_TOKEN_INDEX else [token]
    with torch.no_grad():
        ours = model.forward_full([ids], images=[pixels]).logits[0]
        ref = reference(input_ids=torch.tensor([expanded]), pixel_values=pixels).logits[0, :, :1000]
    assert ours.shape == ref.shape == (len(ids) - 1 + 576, 1000)
    start = ids.index(IMAGE_TOKEN_INDEX)
    image_rows = torch.zeros(len(ref), dtype=torch.bool)
    image_rows[start:start + 576] = True
    assert _rel_err(ours[image_rows], ref[image_rows]) < 1e-4
    assert _rel_err(ours[~image_rows], ref[~image_rows]) < 1e-4
    assert ours.std() > 0.3  # random logits are spread out, not near-ties


def test_text_only_parity_with_transformers_llama(tiny_llava_dir: Path) -> None:
    tokenizer, model, _, _ = _load(tiny_llava_dir, sparse=False)
    llama = transformers_llama(model)
    ids = tokenizer(PROMPT + "Describe a red square on the table. ASSISTANT: It is small.").input_ids
    with torch.no_grad():
        ours = model.forward_full([ids]).logits[0]
        ref = llama(torch.tensor([ids])).logits[0]
    assert _rel_err(ours, ref) < 1e-4


# ----------------------------------------------------------------------------- options
def test_sparse_overrides_and_dtype(tiny_llava_dir: Path) -> None:
    _, model, _, _ = _load(tiny_llava_dir, vision_keep_rate=0.3)
    policy = make_policy(model)
    assert policy.vision_keep_rate == 0.3 and policy.vision_rule == "predictor"
    _, model, _, _ = _load(tiny_llava_dir, sparse=False)
    assert isinstance(make_policy(model), DensePolicy)
    _, model, _, _ = _load(tiny_llava_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(UserError, match="dtype"):
        _load(tiny_llava_dir, dtype="int3")
    with pytest.raises(UserError, match="vision_keep_rate"):
        _load(tiny_llava_dir, vision_keep_rate=1.5)


def test_projector_only_checkpoint_over_base_llm(tiny_llava_nopred_dir: Path, tmp_path: Path) -> None:
    state = load_file(tiny_llava_nopred_dir / "model.safetensors")
    base, stage1 = tmp_path / "vicuna", tmp_path / "stage1"
    shutil.copytree(tiny_llava_nopred_dir, base, ignore=shutil.ignore_patterns("model.safetensors", "vision_tower"))
    llama_config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(llama_config | {"model_type": "llama"}))
    save_file({k: v for k, v in state.items() if "mm_projector" not in k}, base / "model.safetensors")
    stage1.mkdir()
    shutil.copy(tiny_llava_nopred_dir / "config.json", stage1)
    torch.save({k: v for k, v in state.items() if "mm_projector" in k}, stage1 / "mm_projector.bin")
    _, model, _, _ = _load(stage1, model_base=base)
    _, reference, _, _ = _load(tiny_llava_nopred_dir)
    a, b = _state(model), _state(reference)
    _assert_same_state({k: v for k, v in a.items() if "predictor" not in k},
                       {k: v for k, v in b.items() if "predictor" not in k})
    with pytest.raises(UserError, match="model_base"):
        _load(base)


def _lora_folder(tiny_llava_dir: Path, tmp_path: Path) -> Path:
    lora = tmp_path / "lora"
    lora.mkdir()
    shutil.copy(tiny_llava_dir / "config.json", lora)
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "target_modules": ["q_proj", "v_proj"]}))
    return lora


def test_lora_without_peft_says_how_to_install(tiny_llava_dir: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("peft") is not None:
        pytest.skip("peft is installed")
    with pytest.raises(UserError, match="pip install peft"):
        _load(_lora_folder(tiny_llava_dir, tmp_path), model_base=tiny_llava_dir)


def test_lora_merges_with_peft(tiny_llava_dir: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    _, model, _, _ = _load(tiny_llava_dir)
    reference = _state(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    lora = _lora_folder(tiny_llava_dir, tmp_path)
    peft_model.save_pretrained(lora)
    projector = {f"base_model.model.{k}": v + 1 for k, v in reference.items() if "mm_projector" in k}
    torch.save(projector, lora / "non_lora_trainables.bin")
    merged = peft_model.merge_and_unload().state_dict()
    _, loaded, _, _ = _load(lora, model_base=tiny_llava_dir)
    state = _state(loaded)
    for name, value in state.items():
        if "mm_projector" in name:
            assert torch.equal(value, reference[name] + 1)
        elif not name.startswith("model.vision_tower"):
            assert torch.allclose(value, merged[name], atol=1e-6), name
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"],
                           reference["model.layers.0.self_attn.q_proj.weight"])


# ----------------------------------------------------------------------------- bad checkpoints
def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _copy(src: Path, dst: Path, *ignore: str, **config_updates) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*ignore) if ignore else None)
    if config_updates:
        (dst / "config.json").write_text(json.dumps(_config(dst) | config_updates))
    return dst


def test_bad_checkpoints_raise_user_error(tiny_llava_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tmp_path / "does-not-exist", "does-not-exist"),
        (empty, "config.json is missing"),
        (_copy(tiny_llava_dir, tmp_path / "bert", model_type="bert"), "'bert'"),
        (_copy(tiny_llava_dir, tmp_path / "no_weights", "model.safetensors"), "no weight files"),
        (_copy(tiny_llava_dir, tmp_path / "no_tok", "tokenizer*"), "no tokenizer"),
        (_copy(tiny_llava_dir, tmp_path / "wide", hidden_size=128), "wrong shape"),
    ]
    broken = _copy(tiny_llava_dir, tmp_path / "broken_index")
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    cases.append((broken, "gone.safetensors"))
    for path, message in cases:
        with pytest.raises(UserError, match=message) as info:
            _load(path)
        if path.exists():
            assert str(path) in str(info.value)


def test_missing_and_unexpected_weights_are_listed(tiny_llava_dir: Path, tmp_path: Path) -> None:
    state = load_file(tiny_llava_dir / "model.safetensors")
    missing = _copy(tiny_llava_dir, tmp_path / "missing", "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, missing / "model.safetensors")
    with pytest.raises(UserError, match="missing weights model.norm.weight"):
        _load(missing)
    extra = _copy(tiny_llava_dir, tmp_path / "extra", "model.safetensors")
    save_file(state | {"model.surprise.weight": torch.ones(2)}, extra / "model.safetensors")
    with pytest.raises(UserError, match="unexpected weights model.surprise.weight"):
        _load(extra)


def test_missing_vision_tower_is_named(tiny_llava_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(tiny_llava_dir, tmp_path / "ckpt", mm_vision_tower="someorg/clip-not-downloaded")
    with pytest.raises(UserError, match="someorg/clip-not-downloaded") as info:
        _load(ckpt)
    assert "HF_HOME" in str(info.value) and "vision_tower" in str(info.value)
    _, model, _, _ = _load(ckpt, vision_tower=tiny_llava_dir / "vision_tower")  # supplied by hand
    assert model.config.mm_vision_tower == str((tiny_llava_dir / "vision_tower").resolve())


def test_vision_tower_from_the_local_hf_cache(tiny_llava_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0" * 40
    repo = cache / "models--someorg--tiny-clip"
    shutil.copytree(tiny_llava_dir / "vision_tower", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    ckpt = _copy(tiny_llava_dir, tmp_path / "ckpt", mm_vision_tower="someorg/tiny-clip")
    _, model, _, _ = _load(ckpt)
    _, reference, _, _ = _load(tiny_llava_dir)
    _assert_same_state(_state(model), _state(reference))


# ----------------------------------------------------------------------------- the tiny factory
def test_tiny_checkpoint_is_deterministic_and_llava_compatible(tiny_llava_dir: Path, tmp_path: Path) -> None:
    same = make_tiny_checkpoint(tmp_path / "same", seed=0)
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    data = (tiny_llava_dir / "model.safetensors").read_bytes()
    assert (same / "model.safetensors").read_bytes() == data
    assert (other / "model.safetensors").read_bytes() != data
    config = _config(tiny_llava_dir)
    # what the original LLaVA code reads
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["model_type"] == "llava_llama"
    assert Path(config["mm_vision_tower"]).is_absolute()
    assert (config["mm_projector_type"], config["mm_hidden_size"]) == ("mlp2x_gelu", 32)
    assert config["mm_vision_select_layer"] == -2 and config["mm_vision_select_feature"] == "patch"
    assert (tiny_llava_dir / "tokenizer.model").exists()  # LLaVA's slow tokenizer needs the SentencePiece file
    vision_keys = load_file(tiny_llava_dir / "vision_tower" / "model.safetensors")
    assert all(k.startswith("vision_model.") for k in vision_keys)


def test_original_llava_class_structure_loads_the_tiny_checkpoint(tiny_llava_dir: Path) -> None:
    """What LLaVA's `LlavaLlamaForCausalLM.from_pretrained` does, rebuilt from transformers parts: a
    LlamaForCausalLM whose `model` also owns `mm_projector`, config class `llava_llama`."""
    from torch import nn

    class LlavaConfigLike(LlamaConfig):
        model_type = "llava_llama"

    class LlavaLlamaLike(LlamaForCausalLM):
        config_class = LlavaConfigLike

        def __init__(self, config: LlavaConfigLike) -> None:
            super().__init__(config)
            self.model.mm_projector = nn.Sequential(nn.Linear(config.mm_hidden_size, config.hidden_size), nn.GELU(),
                                                    nn.Linear(config.hidden_size, config.hidden_size))

    model, info = LlavaLlamaLike.from_pretrained(tiny_llava_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all("score_predictor" in key for key in info["unexpected_keys"])  # Dynamic-LLaVA's additions only
    CLIPVisionModel.from_pretrained(_config(tiny_llava_dir)["mm_vision_tower"])
    _, ours, _, _ = load_pretrained_model(tiny_llava_dir, sparse=False)
    ids = [1, 5, 9, 33, 70, 2]
    with torch.no_grad():
        theirs = model.eval()(torch.tensor([ids])).logits[0]
        mine = ours.forward_full([ids]).logits[0]
    assert (mine - theirs).abs().max() / theirs.abs().max() < 1e-5


def test_checkpoint_trained_with_the_instruction_predictor_warns(tmp_path: Path) -> None:
    """The instruction predictor (the paper's ablation) is not run here: loading such a checkpoint says so."""
    path = make_tiny_checkpoint(tmp_path / "instruct", seed=0, use_instruct_predictor=True)
    with pytest.warns(UserWarning, match="instruction predictor"):
        _, model, _, _ = load_pretrained_model(path)
    assert model.sparse.use_instruct_predictor
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dense load runs no predictor at all: nothing to warn about
        load_pretrained_model(path, sparse=False)
