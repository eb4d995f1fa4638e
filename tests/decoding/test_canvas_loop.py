"""The one canvas loop (mlx_dgemma.decoding): every allowed combination of decoding variants runs through it and
commits what it committed before the loop was unified, and each combination's commit meets its guarantees."""

from __future__ import annotations

import json
from dataclasses import replace

import jsonschema
import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import load
from mlx_dgemma.decoding import canvas as canvas_mod
from mlx_dgemma.decoding.block_loop import CommitEvent, StepEvent, prefill
from mlx_dgemma.decoding.canvas import Hook, Start, run_canvas
from mlx_dgemma.decoding.constrain import parse_infill
from mlx_dgemma.decoding.fast import FastConfig, FastDenoiser
from mlx_dgemma.decoding.sampler import SamplerConfig
from mlx_dgemma.decoding.steppers import ReferenceStepper
from tests import canvas_combinations as combos

GOLDEN = json.loads(combos.GOLDEN.read_text())


@pytest.fixture(scope="module")
def demo():
    return load(combos.DEMO24, dtype=mx.float32)


def test_the_combinations_are_the_golden_files():
    assert sorted(GOLDEN) == sorted("/".join(c) for c in combos.combinations())
    assert len(GOLDEN) == 18  # 2 steppers x (4 drafters x 2 + infill without a drafter)


@pytest.mark.parametrize("stepper, drafter, constraint", combos.combinations())
def test_every_combination_runs_through_the_one_loop_and_commits_as_before(
    demo, monkeypatch, stepper, drafter, constraint
):
    model, tokenizer = demo
    seen = []
    real = canvas_mod.canvas_steps

    def spy(model, cache, step, start):
        seen.append((type(step).__name__, [type(h).__name__ for h in start.hooks]))
        return real(model, cache, step, start)

    monkeypatch.setattr("mlx_dgemma.decoding.block_loop.canvas_steps", spy)
    got = combos.run(model, tokenizer, stepper, drafter, constraint)
    # Bit for bit what the code before the one loop committed (tokens, passes, positions, drafts and restarts).
    assert got == GOLDEN[f"{stepper}/{drafter}/{constraint}"]
    assert len(seen) == len(got["commits"]) >= 2
    want = "FastDenoiser" if stepper == "fast" else "ReferenceStepper"
    assert all(name == want for name, _ in seen)
    hooks = {h for _, names in seen for h in names}
    assert ("Constrained" in hooks) == (constraint != "none")
    if drafter != "none":
        assert hooks & {"Drafted", "Blind"} and got["drafted"] >= 1
    if drafter == "noise":  # every noise draft is rejected by the guard and its canvas restarted
        assert got["restarted"] == got["drafted"]
    if constraint == "grammar":
        record = json.loads(got["text"])
        jsonschema.validate(record, combos.schema())
        assert record["name"] == "Maya" and record["age"] <= 30
    if constraint == "infill":
        fixed = [
            t
            for tokens, hole in parse_infill(combos.INFILL, tokenizer)
            for t in (tokens if tokens is not None else [None] * hole)
        ]
        answer = [t for commit in got["commits"] for t in commit]
        assert len(answer) == len(fixed) and all(f is None or f == t for f, t in zip(fixed, answer))


class Spy(Hook):
    """Records the step of every pass it sees; its ``begin`` sets the starting canvas."""

    persists = True

    def __init__(self, canvas: mx.array):
        self.canvas, self.steps = canvas, []

    def begin(self, start: Start) -> Start:
        return replace(start, canvas=self.canvas)

    def after_step(self, row):
        self.steps.append((row.step, row.first, row.live))
        return row


@pytest.mark.parametrize(
    "stepper", [ReferenceStepper(compiled=False), FastDenoiser(FastConfig(), compiled=False)]
)
def test_a_row_carries_its_own_step_settings_key_and_hooks(base, stepper):
    """A ``Start`` (settings, key, hooks) runs as a row of its own: the hook's start canvas is the first input,
    it sees every pass with the remaining step counted down, and a second row with other settings and another
    key runs on the same cache independently."""
    from mlx_dgemma import load_model

    model = load_model(base.hf, dtype=mx.float32)
    cache = model.make_cache()
    prefill(model, mx.array(base.ref["prompt"]), cache)
    B, C, V = cache[0].keys.shape[0], model.args.canvas_length, model.args.vocab_size
    start_canvas = mx.random.randint(0, V, (B, C), key=mx.random.key(9)).astype(mx.int32)

    def run(cfg, seed):
        spy = Spy(start_canvas)
        start = canvas_mod.attach(Start(0, cfg, mx.random.key(seed), (B, C, V), adaptive=False), spy)
        events = list(run_canvas(model, cache, stepper, start))
        return spy, events

    spy, events = run(SamplerConfig(max_denoising_steps=3), 0)
    assert [s for s, _, _ in spy.steps] == [3, 2, 1] and [f for _, f, _ in spy.steps] == [True, False, False]
    assert [e.step for e in events if isinstance(e, StepEvent)] == [3, 2, 1]
    commit = events[-1]
    assert isinstance(commit, CommitEvent) and commit.decoder_passes.tolist() == [3] * B
    other, _ = run(SamplerConfig(max_denoising_steps=2, t_max=0.5, t_min=0.1), 1)
    assert [s for s, _, _ in other.steps] == [2, 1]
    _, again = run(SamplerConfig(max_denoising_steps=3), 0)
    np.testing.assert_array_equal(np.array(again[-1].tokens), np.array(commit.tokens))  # same key, same row
