"""The generation-loop additions the servers need: per-sample configs, on_finish, and Session (KV cache kept
across chat turns), checked against independent references."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from dynamic_llava.errors import UserError
from dynamic_llava.generation import (
    GenerationConfig,
    Session,
    decode_step,
    expanded_length,
    finish,
    generate,
    prefill,
    stream_generate,
)
from dynamic_llava.model.batch import OUTPUT
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.model.policy import SparsityOptions, make_policy
from dynamic_llava.prompting import prepare_request
from dynamic_llava.serve.cli import Chat

SAMPLE = Image.new("RGB", (40, 30), (200, 30, 30))


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_llava_dir)
    return tokenizer, model, processor


@pytest.fixture(scope="module")
def request_batch(loaded):
    tokenizer, model, processor = loaded
    questions = [("What is in the image?", [SAMPLE]), ("Say something.", []), ("Describe it in detail.", [SAMPLE])]
    reqs = [prepare_request(q, imgs, tokenizer, processor, model.config, "llava_v1") for q, imgs in questions]
    return [r.input_ids for r in reqs], [r.pixel_values for r in reqs]


def _policy(model, **options):
    return make_policy(model, SparsityOptions(**options))


def test_per_sample_configs_equal_each_sample_alone(loaded, request_batch) -> None:
    tokenizer, model, _ = loaded
    prompts, images = request_batch
    free = generate(model, tokenizer, prompts[1:2], images[1:2], GenerationConfig(max_new_tokens=10, eos_token_id=-1))
    stop = free[0].text[4:6]
    assert stop.strip()
    configs = [GenerationConfig(max_new_tokens=4, eos_token_id=-1),
               GenerationConfig(max_new_tokens=10, stop_strings=[stop], eos_token_id=-1),
               GenerationConfig(max_new_tokens=7, eos_token_id=-1)]
    together = generate(model, tokenizer, prompts, images, configs)
    for prompt, image, config, result in zip(prompts, images, configs, together):
        alone = generate(model, tokenizer, [prompt], [image], config)[0]
        assert (result.token_ids, result.finish_reason, result.output_keep, result.kv_cache_bytes) == (
            alone.token_ids, alone.finish_reason, alone.output_keep, alone.kv_cache_bytes)
    assert [r.output_tokens for r in together][0] == 4 and together[2].output_tokens == 7
    assert together[1].finish_reason == "stop"


def test_mixed_sampling_settings_keep_greedy_rows_greedy(loaded, request_batch) -> None:
    tokenizer, model, _ = loaded
    prompts, images = request_batch
    greedy = GenerationConfig(max_new_tokens=6, eos_token_id=-1, seed=5)
    hot = GenerationConfig(max_new_tokens=6, temperature=5.0, eos_token_id=-1, seed=5)
    mixed = generate(model, tokenizer, prompts, images, [greedy, hot, greedy])
    again = generate(model, tokenizer, prompts, images, [greedy, hot, greedy])
    alone = generate(model, tokenizer, prompts, images, greedy)
    assert mixed[0].token_ids == alone[0].token_ids and mixed[2].token_ids == alone[2].token_ids
    assert mixed[1].token_ids == again[1].token_ids  # seeded
    assert mixed[1].token_ids != alone[1].token_ids  # temperature 5 over a 1000-token vocabulary
    with pytest.raises(UserError, match="use_cache and seed"):
        generate(model, tokenizer, prompts[:2], images[:2], [greedy, dataclasses.replace(greedy, use_cache=False)])
    with pytest.raises(UserError, match="2 generation configs for 3"):
        generate(model, tokenizer, prompts, images, [greedy, hot])


def test_on_finish_reports_each_sample_once_before_its_last_text(loaded, request_batch) -> None:
    tokenizer, model, _ = loaded
    prompts, images = request_batch
    configs = [GenerationConfig(max_new_tokens=n, eos_token_id=-1) for n in (3, 8, 5)]
    events: list[tuple[str, int]] = []
    stream = stream_generate(model, tokenizer, prompts, images, configs,
                             on_finish=lambda i, result: events.append(("finish", i, result)))
    for _ in stream:
        events.append(("step", -1, None))
    results = stream.results
    finished = [(i, r) for kind, i, r in events if kind == "finish"]
    assert [i for i, _ in finished] == [0, 2, 1]
    assert all(r is results[i] and r.output_tokens == configs[i].max_new_tokens for i, r in finished)
    steps_before = [sum(1 for e in events[:events.index(("finish", i, r))] if e[0] == "step") for i, r in finished]
    assert steps_before == [2, 4, 7]  # during the step producing the last token, before its text is yielded


def test_stream_results_come_after_its_last_step_and_equal_generate(loaded, request_batch) -> None:
    tokenizer, model, _ = loaded
    prompts, images = request_batch
    configs = [GenerationConfig(max_new_tokens=n, eos_token_id=-1) for n in (2, 4, 3)]
    stream = stream_generate(model, tokenizer, prompts, images, configs)
    with pytest.raises(RuntimeError, match="iterated to its end"):
        stream.results
    steps = iter(stream)
    next(steps)
    with pytest.raises(RuntimeError, match="iterated to its end"):
        stream.results
    assert len(list(steps)) == 3
    expected = generate(model, tokenizer, prompts, images, configs)
    assert [(r.token_ids, r.output_keep) for r in stream.results] == [(r.token_ids, r.output_keep) for r in expected]
    with pytest.raises(RuntimeError, match="only once"):
        next(iter(stream))
    state = prefill(model, tokenizer, prompts, images, configs)
    decode_step(state)
    with pytest.raises(RuntimeError, match="before the last decode_step"):
        finish(state)


def _turn2_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text).input_ids
    return ids[1:] if ids[:1] == [tokenizer.bos_token_id] else ids


def _greedy_reference(model, ids, pixels, policy, steps: int, output_slots: slice | None = None):
    """Re-encode everything from scratch (optionally marking earlier generated tokens as OUTPUT, as the cached
    run saw them), then greedy decoding with a plain model.step loop."""
    batch = model.embed([ids], [pixels])
    if output_slots is not None:
        kinds = batch.kinds.clone()
        kinds[0, output_slots] = OUTPUT
        batch = dataclasses.replace(batch, kinds=kinds)
    cache = model.new_cache(1)
    with torch.inference_mode():
        out = model.step(batch, cache, policy)
        tokens, position = [], int(batch.lengths[0])
        for _ in range(steps):
            token = out.logits.argmax(-1)
            tokens.append(int(token))
            out = model.step(model.embed_generated(token, torch.tensor([position])), cache, policy)
            position += 1
    return tokens, out.keep, cache


@pytest.mark.parametrize("mode", ["dense", "vision_only", "full", "structure"])
def test_session_turn2_equals_reencoding_the_conversation(loaded, request_batch, mode: str) -> None:
    """Dense or vision-only sparsity: turn 2 over the cache == re-encoding the whole conversation (same token
    ids), with the same image decisions. With output sparsity the cached run dropped some of turn 1's
    generated tokens online; it equals a re-encoding that treats them as generated tokens, not LLaVA's
    re-encoding as prompt text (which keeps them all)."""
    tokenizer, model, _ = loaded
    prompts, images = request_batch
    policy = {"dense": _policy(model, sparse=False), "vision_only": _policy(model, output_sparsity=False),
              "full": _policy(model), "structure": _policy(model, output_policy="structure")}[mode]
    config = GenerationConfig(max_new_tokens=8, eos_token_id=-1)
    session = Session()
    turn1 = generate(model, tokenizer, prompts[:1], images[:1], config, policy=policy, session=session)
    first = list(map(int, prompts[0]))
    # turn 2: the last sampled token (not yet cached), then the template text of the next question
    new = [turn1[0].token_ids[-1], *_turn2_ids(tokenizer, "</s>USER: And the colour? ASSISTANT:")]
    assert session.last_token == new[0]
    assert session.next_position == turn1[0].prompt_tokens + 7
    turn2 = generate(model, tokenizer, [new], [None], config, policy=policy, session=session)[0]
    assert turn2.context_tokens == turn1[0].prompt_tokens + 7 and turn2.prompt_tokens == len(new)

    whole = first + turn1[0].token_ids[:-1] + new
    fed = slice(turn1[0].prompt_tokens, turn1[0].prompt_tokens + 7)  # turn 1's generated tokens fed back
    if mode in ("full", "structure"):
        # the cached run decided turn 1's generated tokens online: mark them OUTPUT in the reference
        tokens, _, cache = _greedy_reference(model, whole, images[0], policy, 7, fed)
    if mode == "structure":
        assert sum(turn1[0].output_keep) < 7, "every other turn-1 token is dropped"
        # re-encoding them as prompt text (what LLaVA's CLI does) keeps them all: a different context
        plain = generate(model, tokenizer, [whole], images[:1], config, policy=policy)[0]
        assert plain.kv_cache_bytes > turn2.kv_cache_bytes
    if mode in ("dense", "vision_only"):
        reference = generate(model, tokenizer, [whole], images[:1], config, policy=policy)[0]
        tokens = reference.token_ids[:7]
        _, _, cache = _greedy_reference(model, whole, images[0], policy, 7)
        assert reference.image_keep == turn1[0].image_keep  # the image decisions of turn 1 are the same
        assert reference.kv_cache_bytes == turn2.kv_cache_bytes
    assert turn2.token_ids[:7] == tokens
    # the session's cache holds exactly what the reference's holds, layer by layer
    assert torch.equal(session.cache.lengths(), cache.lengths())


def test_session_errors(loaded, request_batch) -> None:
    tokenizer, model, _ = loaded
    prompts, images = request_batch
    with pytest.raises(UserError, match="one prompt"):
        generate(model, tokenizer, prompts[:2], images[:2], session=Session())
    with pytest.raises(UserError, match="one prompt"):
        generate(model, tokenizer, prompts[:1], images[:1], GenerationConfig(use_cache=False), session=Session())
    session = Session()
    generate(model, tokenizer, prompts[:1], images[:1], GenerationConfig(max_new_tokens=2), session=session)
    with pytest.raises(UserError, match="tokens of conversation"):
        generate(model, tokenizer, [[5, 6]], [None], GenerationConfig(max_new_tokens=4090), session=session)


def test_chat_reuses_the_cache_and_matches_reencoding(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's Chat: turn 2 prefills only the new tokens, and (dense) answers as re-encoding the cached
    token ids would; its turn-2 text is the template continuation."""
    tokenizer, model, processor = loaded
    monkeypatch.setattr(model, "sparsity_options", SparsityOptions(sparse=False))  # as loaded with --no-sparse
    chat = Chat(model, tokenizer, processor, "llava_v1", SAMPLE, GenerationConfig(max_new_tokens=6, temperature=0))
    _, ids1, pixels = chat.next_input("What is it?")
    turn1 = chat.reply("What is it?")
    _, ids2, none = chat.next_input("Why?")
    assert none is None
    turn2 = chat.reply("Why?")
    assert turn2.context_tokens == expanded_length(model, ids1) + turn1.output_tokens - 1
    assert turn2.prompt_tokens == len(ids2) < expanded_length(model, ids1)
    assert tokenizer.decode(ids2, skip_special_tokens=True).strip().endswith("USER: Why? ASSISTANT:")
    fed = turn1.token_ids[:turn1.output_tokens - 1]  # every sampled token but the last entered the cache
    whole = torch.cat([ids1, torch.tensor(fed, dtype=torch.long), ids2])
    reference = generate(model, tokenizer, [whole], [pixels], GenerationConfig(max_new_tokens=6, eos_token_id=-1),
                         policy=_policy(model, sparse=False))[0]
    n = len(turn2.token_ids)
    assert turn2.token_ids == reference.token_ids[:n]
    assert "What is it? ASSISTANT: " in chat.conv.get_prompt() and chat.conv.messages[-1][1] == turn2.text.strip()


def test_streamed_text_adds_up_to_the_result_for_every_finish(loaded, request_batch) -> None:
    """Servers send the deltas: they must add up to the final text, also when a trailing run of byte tokens
    changes its decoding later (the random model makes invalid ones) and when a sample stops by length."""
    tokenizer, model, _ = loaded
    prompts, images = request_batch
    configs = [GenerationConfig(max_new_tokens=n, eos_token_id=-1) for n in (5, 9, 12)]
    stream = stream_generate(model, tokenizer, prompts, images, configs)
    texts = ["", "", ""]
    for deltas in stream:
        texts = [text + delta for text, delta in zip(texts, deltas)]
    results = stream.results
    tokens = [tokenizer.convert_ids_to_tokens(t) for r in results for t in r.token_ids]
    assert any(t.startswith("<0x") for t in tokens), "the case of byte tokens should be exercised"
    assert texts == [r.text for r in results]
