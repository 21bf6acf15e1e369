"""The batching engine on its own: grouping by sparsity, the queue bound, cancelling, failures."""

from __future__ import annotations

import asyncio

import pytest
from PIL import Image

from dynamic_llava.conversation import get_conv_template
from dynamic_llava.model.loading import load_pretrained_model
from dynamic_llava.serve import engine as engine_module
from dynamic_llava.serve.engine import Engine, RequestSparsity, Sampling
from dynamic_llava.serve.protocol import ErrorCode, ServeError

IMAGE = Image.new("RGB", (40, 40), (10, 200, 10))


@pytest.fixture(scope="module")
def loaded(tiny_llava_dir):
    tokenizer, model, processor, _ = load_pretrained_model(tiny_llava_dir)
    return model, tokenizer, processor


def _prompt() -> str:
    conv = get_conv_template("llava_v1")
    conv.append_message(conv.roles[0], "<image>\nWhat is it?")
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def _job(engine: Engine, max_new_tokens: int = 4, **sparsity):
    return engine.prepare(_prompt(), [IMAGE], Sampling(temperature=0, max_new_tokens=max_new_tokens),
                          RequestSparsity(**sparsity))


async def _running(engine: Engine, job) -> None:
    """Submit `job` and return once it has produced text (so it is being generated)."""
    engine.submit(job)
    stream = job.ticket.stream()
    await stream.__anext__()
    job.rest = stream


async def _finish(job):
    async for _ in getattr(job, "rest", None) or job.ticket.stream():
        pass
    return job.ticket.result


def test_waiting_requests_are_grouped_by_sparsity_and_cancellable(loaded) -> None:
    engine = Engine(*loaded, "tiny", max_batch_size=8, max_queue=16)

    settings = [{}, {"sparse": False}, {}, {"vision_keep_rate": 0.5}, {}, {"sparse": False}]
    first, cancelled = _job(engine, max_new_tokens=16), _job(engine)
    jobs = [_job(engine, **s) for s in settings]

    async def scenario():
        await _running(engine, first)  # keeps the engine busy while the others queue up
        for job in jobs:
            engine.submit(job)
        engine.submit(cancelled)
        engine.cancel(cancelled)
        return await asyncio.gather(_finish(first), *(_finish(j) for j in jobs))

    try:
        results = asyncio.run(scenario())
    finally:
        engine.close()
    assert [r.image_tokens_kept for r in results[1:]] == [115, 576, 115, 288, 115, 576]
    # the first alone, then one batch per setting in order of their oldest request; the cancelled one never ran
    assert engine.batch_sizes() == {1: 2, 2: 1, 3: 1}
    assert cancelled.ticket.result is None and engine.queue_length == 0


def test_a_full_queue_answers_busy(loaded) -> None:
    engine = Engine(*loaded, "tiny", max_batch_size=8, max_queue=2)
    running, waiting, third = _job(engine, max_new_tokens=16), _job(engine), _job(engine)

    async def scenario():
        await _running(engine, running)
        engine.submit(waiting)
        with pytest.raises(ServeError) as busy:
            engine.submit(third)
        await asyncio.gather(_finish(running), _finish(waiting))
        return busy.value

    try:
        busy = asyncio.run(scenario())
    finally:
        engine.close()
    assert busy.code == ErrorCode.BUSY and "busy" in busy.message
    assert waiting.ticket.result is not None and third.ticket.result is None and engine.queue_length == 0


def test_a_failed_batch_fails_its_requests_and_the_engine_serves_on(loaded, monkeypatch) -> None:
    engine = Engine(*loaded, "tiny")
    real, calls = engine_module.stream_generate, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "stream_generate", flaky)
    doomed, after = _job(engine), _job(engine)

    async def scenario():
        engine.submit(doomed)
        with pytest.raises(ServeError) as failed:
            await _finish(doomed)
        engine.submit(after)
        return failed.value, await _finish(after)

    try:
        failed, result = asyncio.run(scenario())
    finally:
        engine.close()
    assert failed.code == ErrorCode.INTERNAL and "out of memory" in failed.message
    assert result.output_tokens == 4 and engine.queue_length == 0


def test_prepare_checks_and_clamps(loaded) -> None:
    engine = Engine(*loaded, "tiny", max_new_tokens_limit=20)
    try:
        assert _job(engine, max_new_tokens=10 ** 9).config.max_new_tokens == 20
        with pytest.raises(ServeError, match="1 <image> placeholder"):
            engine.prepare(_prompt(), [IMAGE, IMAGE], Sampling(), RequestSparsity())
        with pytest.raises(ServeError, match="context length"):
            engine.prepare(_prompt() * 8, [IMAGE] * 8, Sampling(), RequestSparsity())
        for bad in (dict(temperature="hot"), dict(top_p=0), dict(max_new_tokens=1.5), dict(stop=["a"] * 17)):
            with pytest.raises(ServeError):
                Sampling.parse(**bad)
        with pytest.raises(ServeError, match="vision_keep_rate"):
            RequestSparsity.parse(vision_keep_rate=float("nan"))
    finally:
        engine.close()
