"""The block loop on token ids against the reference's ``generate``."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from mlx_dgemma import load_model
from mlx_dgemma.decoding.block_loop import CommitEvent, StepEvent, generate_tokens, prefill
from mlx_dgemma.decoding.sampler import SamplerConfig

ONE_STEP = SamplerConfig(max_denoising_steps=1)


def commits(events) -> list[CommitEvent]:
    return [e for e in events if isinstance(e, CommitEvent)]


def test_one_step_from_a_given_canvas_matches_reference(fixture):
    """generate(decoder_input_ids=canvas, max_denoising_steps=1): the commit is exactly the reference's."""
    ref = fixture.ref
    model = load_model(fixture.hf, dtype=mx.float32)
    cache = model.make_cache()
    prefill(model, mx.array(ref["prompt"]), cache)
    canvas_length = int(ref["canvas_length"])
    out = commits(
        generate_tokens(model, cache, canvas_length, ONE_STEP, seed=0, start=mx.array(ref["gen_start"]))
    )
    assert len(out) == 1
    np.testing.assert_array_equal(np.array(out[0].tokens), ref["gen_tokens"])
    assert out[0].decoder_passes.tolist() == [1]


def test_one_step_batch_with_left_padding_matches_reference(fixture):
    ref = fixture.ref
    model = load_model(fixture.hf, dtype=mx.float32)
    cache = model.make_cache()
    prefill(model, mx.array(ref["batch_prompt"]), cache, mask=mx.array(ref["batch_mask"]))
    canvas_length = int(ref["canvas_length"])
    start = mx.array(ref["gen_batch_start"])
    out = commits(generate_tokens(model, cache, canvas_length, ONE_STEP, seed=0, start=start))
    # Everything after a row's first EOS is pad, as the reference's _finalize_canvas leaves it.
    np.testing.assert_array_equal(np.array(out[0].tokens), ref["gen_batch_tokens"])


def test_seed_reproducible_and_steps_bounded(base):
    model = load_model(base.hf, dtype=mx.float32)
    cfg = SamplerConfig(max_denoising_steps=5)

    def run(seed):
        cache = model.make_cache()
        prefill(model, mx.array(base.ref["prompt"]), cache)
        events = list(generate_tokens(model, cache, 20, cfg, seed=seed, eos_ids=[10**6]))
        return events

    a, b, c = run(1), run(1), run(2)
    tokens = [np.array(e.tokens) for e in commits(a)]
    assert len(tokens) == 3  # ceil(20 / 8) canvases, each committed and encoded before the next
    assert all(np.array_equal(x, np.array(y.tokens)) for x, y in zip(tokens, commits(b)))
    assert not all(np.array_equal(x, np.array(y.tokens)) for x, y in zip(tokens, commits(c)))
    steps = [e for e in a if isinstance(e, StepEvent)]
    assert 3 <= len(steps) <= 15 and all(1 <= e.step <= 5 for e in steps)
    assert all(int(e.decoder_passes[0]) <= 5 for e in commits(a))


def test_adaptive_stopping_off_runs_every_step(base):
    model = load_model(base.hf, dtype=mx.float32)
    cache = model.make_cache()
    prefill(model, mx.array(base.ref["prompt"]), cache)
    # Always "stable and confident": adaptive stopping would end the canvas after its first step.
    cfg = SamplerConfig(max_denoising_steps=4, stability_threshold=0, confidence_threshold=1e9)
    events = list(generate_tokens(model, cache, 8, cfg, seed=0, adaptive_stopping=False))
    assert [e.step for e in events if isinstance(e, StepEvent)] == [4, 3, 2, 1]
    cache = model.make_cache()
    prefill(model, mx.array(base.ref["prompt"]), cache)
    events = list(generate_tokens(model, cache, 8, cfg, seed=0))
    assert [e.step for e in events if isinstance(e, StepEvent)] == [4]


def test_compiled_sampler_step_gives_the_same_tokens(base):
    """The mx.compile'd step (the default on GPUs) commits exactly what the plain step commits."""
    model = load_model(base.hf, dtype=mx.float32)
    cfg = SamplerConfig(max_denoising_steps=3)

    def run(compiled):
        cache = model.make_cache()
        prefill(model, mx.array(base.ref["prompt"]), cache)
        return [
            np.array(e.tokens)
            for e in commits(generate_tokens(model, cache, 16, cfg, seed=5, compiled=compiled))
        ]

    plain, compiled = run(False), run(True)
    assert len(plain) == 2 and all(np.array_equal(a, b) for a, b in zip(plain, compiled))
