"""Fast decoding (mlx_dgemma.decoding.fast): off is the reference, on commits the reference's answers on the demo model,
its approximations are checked against the exact model, and its pieces equal their exact counterparts."""

from __future__ import annotations

import json
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import Done, FastConfig, load, load_model, stream_generate
from mlx_dgemma.cli.generate import main as generate_main
from mlx_dgemma.decoding.block_loop import CommitEvent, generate_tokens, prefill
from mlx_dgemma.decoding.fast import (
    FastDenoiser,
    FastState,
    dense_soft,
    exact_agreement,
    fast_step,
    forward,
    sparse_soft,
)
from mlx_dgemma.decoding.sampler import SamplerConfig, init_history
from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.model.diffusion_gemma import softcap as model_softcap
from mlx_dgemma.request import encode_prompt
from mlx_dgemma.runtime import memory as memory_mod
from mlx_dgemma.runtime.memory import MemoryWarning, wired_limit
from tests.conftest import DEMO24, DEMO_PROMPTS

PROMPTS = DEMO_PROMPTS


@pytest.fixture(scope="module")
def demo():
    return load(DEMO24, dtype=mx.float32)


def answer(model, tokenizer, prompt, seed=0, **kw) -> Done:
    events = list(stream_generate(model, tokenizer, prompt, max_tokens=96, seed=seed, **kw))
    assert isinstance(events[-1], Done)
    return events[-1]


def commits(model, prompt_ids, cfg, seed, max_tokens, denoiser=None, start=None):
    cache = model.make_cache()
    prefill(model, mx.array(prompt_ids), cache)
    events = generate_tokens(model, cache, max_tokens, cfg, seed=seed, start=start, denoiser=denoiser)
    return [(np.array(e.tokens), e.decoder_passes.tolist()) for e in events if isinstance(e, CommitEvent)]


# -- off is the reference --------------------------------------------------------------------------------------


def test_fast_off_is_the_reference_path(demo):
    """fast=False is today's path; and the fast loop with every technique off commits, bit for bit, what the
    reference loop commits (same draws, same passes), so each technique's effect is its own."""
    model, tokenizer = demo
    for prompt in PROMPTS[:2]:
        default, off = answer(model, tokenizer, prompt), answer(model, tokenizer, prompt, fast=False)
        assert off.text == default.text and off.stats.decoder_passes == default.stats.decoder_passes
        assert not off.stats.fast and off.stats.decoder_positions == off.stats.decoder_passes * 24
    ids = [encode_prompt(tokenizer, PROMPTS[0])]
    cfg = SamplerConfig()
    for seed in (0, 1):
        ref = commits(model, ids, cfg, seed, 48)
        same = commits(model, ids, cfg, seed, 48, FastDenoiser(FastConfig.off(), compiled=False))
        assert len(ref) == len(same) == 2
        for (a, pa), (b, pb) in zip(ref, same):
            np.testing.assert_array_equal(a, b)
            assert pa == pb


def test_fast_off_matches_the_reference_loop_on_a_random_checkpoint(base):
    """The same on a random fixture model, batched, several canvases, from noise (no convergence to help)."""
    model = load_model(base.hf, dtype=mx.float32)
    cfg = SamplerConfig(max_denoising_steps=4)
    ref = commits(model, base.ref["prompt"], cfg, 3, 24)
    same = commits(model, base.ref["prompt"], cfg, 3, 24, FastDenoiser(FastConfig.off(), compiled=False))
    assert len(ref) == 3
    for (a, pa), (b, pb) in zip(ref, same):
        np.testing.assert_array_equal(a, b)
        assert pa == pb


# -- on: the reference's answers, fewer positions, compiled == plain ------------------------------------------------


@pytest.mark.parametrize("drafter", ["none", "auto"])
def test_fast_mode_gives_the_reference_answer_on_demo_prompts(demo, drafter):
    model, tokenizer = demo
    positions = passes = 0
    for seed, prompt in enumerate(PROMPTS):
        ref = answer(model, tokenizer, prompt, seed, drafter=drafter)
        fast = answer(model, tokenizer, prompt, seed, drafter=drafter, fast=FastConfig(check=True))
        assert fast.text == ref.text
        assert fast.stats.fast and fast.stats.decoder_positions <= fast.stats.decoder_passes * 24
        positions, passes = positions + fast.stats.decoder_positions, passes + fast.stats.decoder_passes
        # The exactness check: the exact model reproduces (nearly) every committed token.
        assert 0.9 <= fast.stats.exact_agreement <= 1.0
    if drafter == "none":  # (a verified draft often commits after its one, full, pass)
        assert positions < passes * 24


def test_compiled_fast_steps_give_the_same_tokens(base):
    model = load_model(base.hf, dtype=mx.float32)
    cfg = SamplerConfig(max_denoising_steps=4)
    plain = commits(model, base.ref["prompt"], cfg, 5, 16, FastDenoiser(FastConfig(), compiled=False))
    compiled = commits(model, base.ref["prompt"], cfg, 5, 16, FastDenoiser(FastConfig(), compiled=True))
    assert len(plain) == 2
    for (a, pa), (b, pb) in zip(plain, compiled):
        np.testing.assert_array_equal(a, b)
        assert pa == pb


def test_frozen_positions_leave_the_decoder_in_buckets(demo):
    """After the first full pass only live positions (rounded up to a bucket) go through the decoder."""
    model, tokenizer = demo
    denoiser = FastDenoiser(FastConfig(), compiled=False)
    ids = [encode_prompt(tokenizer, PROMPTS[1])]
    commits(model, ids, SamplerConfig(), 0, 48, denoiser)
    sizes = FastConfig().sizes(24)
    assert sizes == [2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24]
    assert denoiser.passes >= 2 and 24 < denoiser.positions < 24 * denoiser.passes
    assert set(denoiser.sizes) <= set(sizes) and denoiser.sizes[24] >= 1  # the first pass is full


# -- the pieces against their exact counterparts --------------------------------------------------------------------


def test_sparse_pass_with_stale_kv_equals_the_full_pass_rows(base):
    """Positions recomputed against the keys/values of a full pass over the same canvas (per-token RoPE,
    scattered K/V) give exactly the full pass's logits; the full pass equals Model.denoise."""
    model = load_model(base.hf, dtype=mx.float32)
    cache = model.make_cache()
    prefill(model, mx.array(base.ref["prompt"]), cache)
    C, V = model.args.canvas_length, model.args.vocab_size
    canvas = mx.random.randint(0, V, (1, C), key=mx.random.key(0)).astype(mx.int32)
    sc = mx.random.normal((1, C, V), key=mx.random.key(1)) * 3
    soft = dense_soft(model, sc)
    every = mx.arange(C, dtype=mx.int32)[None]
    full, stores = forward(model, canvas, cache, soft, every, None, C)
    np.testing.assert_allclose(
        np.array(model_softcap(full, model.args.final_logit_softcapping)),
        np.array(model.denoise(canvas, cache, sc)),
        rtol=1e-4,
        atol=1e-4,
    )
    some = mx.array([[5, 0, 3]], dtype=mx.int32)
    part, _ = forward(
        model,
        mx.take_along_axis(canvas, some, axis=1),
        cache,
        mx.take_along_axis(soft, some[..., None], axis=1),
        some,
        stores,
        C,
    )
    np.testing.assert_allclose(
        np.array(part), np.array(mx.take_along_axis(full, some[..., None], axis=1)), rtol=1e-4, atol=1e-4
    )


def test_sparse_soft_embedding_over_the_whole_vocabulary_is_the_dense_one(base):
    model = load_model(base.hf, dtype=mx.float32)
    V = model.args.vocab_size
    logits = mx.random.normal((1, 4, V), key=mx.random.key(2)) * 3
    ids = mx.broadcast_to(mx.arange(V, dtype=mx.int32), (1, 4, V))
    np.testing.assert_allclose(
        np.array(sparse_soft(model, logits, ids)), np.array(dense_soft(model, logits)), rtol=1e-4, atol=1e-4
    )


def test_topk_sampler_keeps_the_exact_argmax():
    B, C, V = 2, 16, 300
    raw = mx.random.normal((B, C, V), key=mx.random.key(3)) * 4
    cfg = SamplerConfig(max_denoising_steps=8)
    positions = mx.broadcast_to(mx.arange(C, dtype=mx.int32), (B, C))

    def state(sc):
        z = mx.zeros((B, C), dtype=mx.int32)
        no = mx.zeros((B, C), dtype=mx.bool_)
        return FastState(
            z, z, no, no, mx.zeros((B, C)), init_history(cfg, B, C), mx.zeros((B,), dtype=mx.bool_), sc
        )

    args = dict(step=mx.array(8), key=mx.random.key(4), cfg=cfg, softcapping=30.0, eos=(1,), adaptive=True)
    exact = fast_step(raw, positions, state((mx.zeros((B, C, V)),)), fcfg=FastConfig.off(), **args)
    k8 = FastConfig.off(topk=8, sparse_sc=True)
    top = fast_step(
        raw, positions, state((mx.zeros((B, C, 8)), mx.zeros((B, C, 8), dtype=mx.int32))), fcfg=k8, **args
    )
    np.testing.assert_array_equal(np.array(top.argmax), np.array(exact.argmax))
    # Truncating to the top 8 can only drop probability mass: the entropy it sees is never (much) higher.
    assert bool(mx.all(top.entropy <= exact.entropy + 1e-4))


def test_only_a_token_the_sampler_accepted_freezes_not_a_drafted_one():
    """The model's argmax echoing its input with near-zero entropy freezes the position only if that input was
    accepted by the sampler at an earlier step (kept), not if a drafter put it there."""
    B, C, V = 1, 8, 64
    cfg = SamplerConfig(max_denoising_steps=8)
    tokens = mx.arange(3, 3 + C, dtype=mx.int32)[None]
    raw = mx.where(mx.arange(V)[None, None] == tokens[..., None], 30.0, -30.0)  # sure of every input token
    positions = mx.broadcast_to(mx.arange(C, dtype=mx.int32), (B, C))
    args = dict(
        step=mx.array(8),
        key=mx.random.key(4),
        cfg=cfg,
        softcapping=30.0,
        eos=(1,),
        adaptive=True,
        fcfg=FastConfig(topk=8, sparse_sc=True),
    )
    sc = (mx.zeros((B, C, 8)), mx.zeros((B, C, 8), dtype=mx.int32))

    def step(kept: bool):
        flags = mx.full((B, C), kept, dtype=mx.bool_)
        state = FastState(
            tokens,
            tokens,
            mx.zeros((B, C), dtype=mx.bool_),
            flags,
            mx.zeros((B, C)),
            init_history(cfg, B, C),
            mx.zeros((B,), dtype=mx.bool_),
            sc,
        )
        return fast_step(raw, positions, state, **args)

    drafted, accepted = step(False), step(True)
    assert bool(mx.all(accepted.frozen)) and not bool(mx.any(drafted.frozen))
    assert bool(mx.any(drafted.kept))  # accepted this step: it may freeze at the next


def test_exact_agreement_counts_the_kept_positions_only(base):
    model = load_model(base.hf, dtype=mx.float32)
    cache = model.make_cache()
    prefill(model, mx.array(base.ref["prompt"]), cache)
    C = model.args.canvas_length
    tokens = mx.random.randint(4, 100, (1, C), key=mx.random.key(5)).astype(mx.int32)
    raw, _ = forward(model, tokens, cache, model.model.decoder.embed(tokens))
    fixed = mx.argmax(raw, axis=-1).astype(mx.int32)  # not a fixed point, but its first position is right...
    got = exact_agreement(model, cache, tokens, ()).item()
    assert 0.0 <= got <= 1.0
    # ... and with an end of sequence at position 1, only positions 0 and 1 count.
    eos_at_1 = mx.concatenate([fixed[:, :1], mx.array([[1]], dtype=mx.int32), fixed[:, 2:]], axis=1)
    raw2, _ = forward(model, eos_at_1, cache, model.model.decoder.embed(eos_at_1))
    expect = float(np.mean(np.array(mx.argmax(raw2, axis=-1) == eos_at_1)[0, :2]))
    assert exact_agreement(model, cache, eos_at_1, (1,)).item() == pytest.approx(expect)


def test_bad_fast_config_is_a_one_line_error():
    for kw, word in [
        ({"topk": -1}, "topk"),
        ({"freeze": False}, "sparse"),
        ({"buckets": (0.5,)}, "buckets"),
        ({"topk": 0}, "sparse_sc"),
    ]:
        with pytest.raises(DGemmaError, match=word) as e:
            FastConfig(**kw)
        assert "\n" not in str(e.value)


# -- memory wiring, command line, server --------------------------------------------------------------------------


def test_wired_limit_is_a_no_op_without_a_recommended_size(monkeypatch, demo):
    calls = []
    monkeypatch.setattr(memory_mod, "recommended_working_set", lambda: None)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    with wired_limit(demo[0]):
        pass
    assert calls == []


def test_wired_limit_wires_restores_and_warns_near_the_limit(monkeypatch, demo):
    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 123)
    size = memory_mod.model_bytes(demo[0])
    monkeypatch.setattr(memory_mod, "recommended_working_set", lambda: 10 * size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with wired_limit(demo[0]):
            assert calls == [10 * size]
    assert calls == [10 * size, 123]
    monkeypatch.setattr(memory_mod, "recommended_working_set", lambda: size)
    with pytest.warns(MemoryWarning, match="recommended working set"), wired_limit(demo[0]):
        pass


def test_cli_fast_flag(capsys):
    assert generate_main(["--fast", "--seed", "0", "--drafter", "none"]) == 0
    out = capsys.readouterr().out
    assert '"name": "Maya"' in out and '"languages": ["Greek", "Hindi"]' in out


def test_server_default_and_per_request_fast(monkeypatch):
    from mlx_dgemma.server import BackgroundServer, create_app
    from mlx_dgemma.server import worker as worker_mod
    from mlx_dgemma.server.protocol import APIError, parse

    assert parse("chat", {"messages": [], "fast": True}).fast is True
    with pytest.raises(APIError, match="fast"):
        parse("chat", {"messages": [], "fast": "yes"})
    seen = []
    real = worker_mod.run_steps

    def spy(model, tokenizer, request):
        seen.append(request.fast is not None)
        return real(model, tokenizer, request)

    monkeypatch.setattr(worker_mod, "run_steps", spy)
    import httpx

    with BackgroundServer(create_app(fast=True)) as srv:
        for extra in ({}, {"fast": False}, {"fast": True}, {"response_format": {"type": "json_object"}}):
            body = {
                "messages": [{"role": "user", "content": PROMPTS[0]}],
                "max_tokens": 24,
                "seed": 0,
                "max_denoising_steps": 3,
                **extra,
            }
            r = httpx.post(f"{srv.url}/chat/completions", json=body, timeout=600)
            assert r.status_code == 200, r.text
    assert seen == [True, False, True, True]  # a constrained request too: fast mode projects its own step
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)


def test_projection_unfreezes_what_it_changes_and_ranks_frozen_rows_by_their_top_k():
    """The projection of a fast step (``hooks.Constrained``: ``project_canvas`` ranked by ``logits_row``, then
    ``rewrite``): a position the constraint changes is written into the canvas and unfrozen (the next sparse pass
    recomputes it); a frozen position this pass did not compute is ranked by its kept top-k, with every other
    token below them; a held position is written when the canvas differs."""
    from mlx_dgemma.decoding.constrain import Constraint, project_canvas
    from mlx_dgemma.decoding.fast import FastState
    from mlx_dgemma.decoding.hooks import logits_row, rewrite

    seen = {}

    class Stub(Constraint):
        def fixed(self, offset, length):
            return {3: 8}

        def project(self, offset, argmax, row):
            seen.update({i: row(i) for i in (0, 2)})
            out = argmax.copy()
            out[2], out[3] = int(np.argmax(row(2))), 8
            return out

    C, V = 4, 16
    held = mx.array([[True, False, True, True]])
    state = FastState(
        mx.array([[5, 6, 7, 4]]),
        mx.array([[5, 6, 7, 8]]),
        held,
        held,
        mx.zeros((1, C)),
        init_history(SamplerConfig(), 1, C),
        mx.array([False]),
        (
            mx.array([[[0.0, 0.0], [0.0, 0.0], [3.0, 1.0], [0.0, 0.0]]]),
            mx.array([[[0, 1], [0, 1], [9, 7], [0, 1]]], dtype=mx.int32),
        ),
    )
    raw = mx.arange(2 * V, dtype=mx.float32).reshape(1, 2, V)
    positions = mx.array([[1, 0]], dtype=mx.int32)  # position 0 computed (row 1 of raw), 2 and 3 not
    argmax, canvas = np.asarray(state.argmax[0]).astype(np.int32), np.asarray(state.canvas[0])
    out = rewrite(state, *project_canvas(Stub(), 0, argmax, canvas, logits_row(state, (raw, positions), V)))
    assert np.array_equal(seen[0], np.arange(V, 2 * V))
    assert seen[2][9] == 3.0 and seen[2][7] == 1.0 and seen[2][0] == -1e30
    assert np.array(out.argmax).tolist() == [[5, 6, 9, 8]]
    assert np.array(out.canvas).tolist() == [[5, 6, 9, 8]]
    assert np.array(out.frozen).tolist() == [[True, False, False, False]]  # 0 unchanged: still frozen
    assert np.array(out.kept).tolist() == [
        [True, False, False, False]
    ]  # rewritten tokens were never accepted
