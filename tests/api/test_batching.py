"""Continuous batching (``mlx_dgemma.batching``): requests decoded together answer exactly as they do alone."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_dgemma import Commit, Done, GenerationError, Preview, load, stream_generate
from mlx_dgemma.batching import Batch, batch_generate, stream_batch_generate
from mlx_dgemma.decoding.canvas import Pass
from mlx_dgemma.decoding.fast import FastConfig
from mlx_dgemma.model.cache import StaleKV
from mlx_dgemma.request import prepare
from tests import canvas_combinations as combos
from tests.conftest import DEMO24, DEMO_PROMPTS


@pytest.fixture(scope="module")
def demo():
    return load(DEMO24)


def alone(model, tokenizer, prompt, **kw) -> list:
    """What a request commits alone: its commits' tokens and its final answer."""
    events = list(stream_generate(model, tokenizer, prompt, **kw))
    return [e.tokens for e in events if isinstance(e, Commit)] + [events[-1].answer]


def test_a_pass_over_several_requests_is_each_request_s_own_pass(demo):
    """``Model.denoise_rows``: each request attends to its own cache at its own positions; only weights are shared."""
    model, _ = demo
    C, V = model.args.canvas_length, model.args.vocab_size
    caches = []
    for i, n in enumerate([7, 30, 19]):  # three prompt lengths
        cache = model.make_cache()
        model.encode(mx.random.randint(0, V, (1, n), key=mx.random.key(i)), cache)
        caches.append(cache)
    canvases = [mx.random.randint(0, V, (1, C), key=mx.random.key(10 + i)).astype(mx.int32) for i in range(3)]
    sc = mx.random.normal((1, C, V), key=mx.random.key(5))
    passes = [
        Pass(canvases[0], caches[0]),
        Pass(canvases[1], caches[1], sc),
        Pass(canvases[2], caches[2], capped=False),
    ]
    for one, together in zip([p.run(model) for p in passes], model.denoise_rows(passes)):
        assert one.shape == together.shape and mx.array_equal(one, together).item()
    # Fast mode's sparse pass: a few positions over stale keys/values, beside a full pass of another request.
    positions = mx.array([[0, 3, 5, 9]], dtype=mx.int32)
    tokens = mx.take_along_axis(canvases[0], positions, axis=1)
    one = Pass(tokens, caches[0], positions=positions, stale=StaleKV(C), capped=False).run(model)
    sparse = Pass(tokens, caches[0], positions=positions, stale=StaleKV(C), capped=False)
    assert mx.array_equal(one, model.denoise_rows([sparse, passes[1]])[0]).item()


@pytest.mark.parametrize("stepper", combos.STEPPERS)
def test_every_decoding_variant_answers_in_a_batch_as_it_does_alone(demo, stepper):
    """Reference or fast, each drafter, grammar, infill or neither: one batch of all of them, each with its own
    prompt and seed, commits what each commits alone (tokens of every canvas, and the answer)."""
    model, tokenizer = demo
    cases = [(d, c) for s, d, c in combos.combinations() if s == stepper]
    prompts = [
        DEMO_PROMPTS[i % len(DEMO_PROMPTS)] if c == "none" else combos.PROMPT
        for i, (_, c) in enumerate(cases)
    ]
    kws = [
        {**combos.options(d, c), "fast": stepper == "fast", "seed": i, "max_tokens": 48}
        for i, (d, c) in enumerate(cases)
    ]
    batch = Batch(model, tokenizer)
    ids = [batch.add(prepare(model, tokenizer, p, **kw)) for p, kw in zip(prompts, kws)]
    got = {i: [] for i in ids}
    while len(batch):
        for request_id, event in batch.step():
            assert not isinstance(event, Exception), event
            got[request_id].append(event)
    assert batch.rows / batch.passes > 2  # the requests really shared passes
    for request_id, prompt, kw in zip(ids, prompts, kws):
        events = got[request_id]
        together = [e.tokens for e in events if isinstance(e, Commit)] + [events[-1].answer]
        assert together == alone(model, tokenizer, prompt, **kw), (request_id, kw)


def test_requests_join_and_leave_between_steps(demo):
    """A request that joins while others are mid-canvas, and one cancelled midway, change no one's answer."""
    model, tokenizer = demo
    kw = {"max_tokens": 72, "max_denoising_steps": 6}
    batch = Batch(model, tokenizer)
    first = batch.add(prepare(model, tokenizer, DEMO_PROMPTS[0], seed=1, **kw))
    events: dict[int, list] = {first: []}
    steps = 0
    late = gone = None
    while len(batch):
        for request_id, event in batch.step():
            events[request_id].append(event)
        steps += 1
        if steps == 3:  # mid-canvas of the first request
            late = batch.add(prepare(model, tokenizer, DEMO_PROMPTS[1], seed=2, fast=True, **kw))
            # Without a drafter: its canvas takes every one of its steps, so it is still running when cancelled.
            gone = batch.add(
                prepare(model, tokenizer, DEMO_PROMPTS[2], seed=3, previews=True, drafter="none", **kw)
            )
            events[late], events[gone] = [], []
        if steps == 7:  # it has encoded its prompt (a pause) and run a couple of steps
            batch.cancel(gone)
    assert events[first][-1].answer == alone(model, tokenizer, DEMO_PROMPTS[0], seed=1, **kw)[-1]
    assert events[late][-1].answer == alone(model, tokenizer, DEMO_PROMPTS[1], seed=2, fast=True, **kw)[-1]
    assert events[gone] and not any(isinstance(e, Done) for e in events[gone])  # stopped, silently
    assert gone not in batch


def test_a_failing_request_leaves_alone(demo):
    model, tokenizer = demo

    def broken():
        yield Pass(mx.zeros((1, 3), dtype=mx.int32), model.make_cache())  # a pass over an empty cache ...
        raise RuntimeError("boom")  # ... then it fails

    batch = Batch(model, tokenizer)
    bad = batch.join(broken())
    good = batch.add(prepare(model, tokenizer, DEMO_PROMPTS[0], seed=4, max_tokens=24))
    seen: dict[int, list] = {bad: [], good: []}
    while len(batch):
        for request_id, event in batch.step():
            seen[request_id].append(event)
    assert [type(e) for e in seen[bad]] == [RuntimeError]
    assert seen[good][-1].answer == alone(model, tokenizer, DEMO_PROMPTS[0], seed=4, max_tokens=24)[-1]


def test_batch_generate_in_mlx_lm_s_shape(demo):
    model, tokenizer = demo
    response = batch_generate(model, tokenizer, DEMO_PROMPTS, max_tokens=48, seed=7)
    assert response.texts == [alone(model, tokenizer, p, max_tokens=48, seed=7)[-1] for p in DEMO_PROMPTS]
    assert [d.answer for d in response.responses] == response.texts
    s = response.stats
    assert s.generation_tokens == sum(d.stats.generated_tokens for d in response.responses) > 0
    assert s.decoder_passes > 0 and s.mean_batch > 1 and s.prompt_tokens > 0 and s.peak_memory_gb > 0
    assert [tokenizer.decode(t) for t in response.tokens] == response.texts and response.caches is None
    with_caches = batch_generate(
        model, tokenizer, DEMO_PROMPTS, max_tokens=48, seed=7, return_prompt_caches=True
    )
    assert with_caches.texts == response.texts
    for cache, done, tokens in zip(with_caches.caches, with_caches.responses, with_caches.tokens):
        assert cache.offset >= done.prompt_tokens + len(
            tokens
        )  # the prompt and the answer, for the next turn


def test_the_streaming_form_yields_each_request_s_events_in_order(demo):
    model, tokenizer = demo
    per: dict[int, list] = {0: [], 1: []}
    for i, event in stream_batch_generate(
        model, tokenizer, DEMO_PROMPTS[:2], max_tokens=48, seed=0, previews=True
    ):
        per[i].append(event)
    for events in per.values():
        assert isinstance(events[-1], Done) and any(isinstance(e, Preview) for e in events)
        assert "".join(e.text for e in events) == events[-1].answer


@pytest.mark.parametrize(
    "prompts, options, message",
    [
        ([], {}, "non-empty list"),
        ("one prompt", {}, "non-empty list"),
        (["a", "b"], {"prompt_ids": [1, 2]}, "prompt_ids is one request's"),
        (["a", "b"], {"top_p": 0.9}, "'top_p' is not supported"),
        (["a", "b"], {"fast": FastConfig(), "seed": -1}, "seed must be"),
    ],
)
def test_bad_input_is_one_line(demo, prompts, options, message):
    model, tokenizer = demo
    with pytest.raises(GenerationError, match=message) as info:
        batch_generate(model, tokenizer, prompts, max_tokens=8, **options)
    assert "\n" not in str(info.value)


def test_requests_sharing_one_drafter_object_answer_as_alone(demo):
    """The server drafts every request with one proposer object: its per-generation state must not leak."""
    from mlx_dgemma.drafter import make_proposer

    model, tokenizer = demo
    shared = make_proposer("auto", model)
    assert shared is not None
    kws = [{"drafter": shared, "seed": s, "max_tokens": 48} for s in (1, 2, 3)]
    response = batch_generate(
        model, tokenizer, [DEMO_PROMPTS[0]] * 3, **{k: v for k, v in kws[0].items() if k != "seed"}
    )
    assert response.stats.mean_batch > 1
    for kw in kws:
        answers = {
            i: e.answer
            for i, e in stream_batch_generate(model, tokenizer, [DEMO_PROMPTS[0], DEMO_PROMPTS[1]], **kw)
            if isinstance(e, Done)
        }
        assert answers[0] == alone(model, tokenizer, DEMO_PROMPTS[0], **kw)[-1]
        assert answers[1] == alone(model, tokenizer, DEMO_PROMPTS[1], **kw)[-1]
