"""The block-by-block generation loop on token ids: encode → denoise a canvas → commit → encode it → ...

This is ``DiffusionGemmaGenerationMixin.generate`` of the reference, step for step, as a generator of
events so that callers can stream drafts and commits. Text, chat templates and statistics live in
``generation.py``; the per-step sampler pieces in ``sampler.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial

import mlx.core as mx

from .cache import DiffusionCache
from .constrain import Constraint, constrained_step, start_canvas
from .model import Model
from .sampler import SamplerConfig, StepOutput, denoise_step, finalize_canvas, init_history, initial_canvas
from .verify import DraftSession, Proposal, VerifyConfig, agreeing, agreement, draft_start, seeded_history

PREFILL_CHUNK = 2048  # encoder positions per call: bounds the activations of a long prompt


@dataclass
class StepEvent:
    """After each denoising step: the current argmax canvas (the draft a viewer shows)."""

    canvas_index: int
    step: int  # remaining steps, N..1, as the reference counts them
    argmax: mx.array  # int32 [B, C]
    done: mx.array  # bool [B]: rows whose canvas stopped denoising


@dataclass
class CommitEvent:
    """A committed canvas: tokens after the first EOS are pad; ``finished`` rows have met an EOS."""

    canvas_index: int
    tokens: mx.array  # int32 [B, C]
    finished: mx.array  # bool [B]
    decoder_passes: mx.array  # int32 [B]: passes this canvas cost each row
    argmax: mx.array | None = None  # int32 [B, C]: the raw committed argmax, before EOS/pad finalization
    drafted: bool = False  # denoising started from a proposal (see verify.py)
    restarted: bool = False  # ... which the target rejected: it started over from noise


def prefill(model: Model, prompt: mx.array, cache: DiffusionCache, mask: mx.array | None = None) -> None:
    """Encode a prompt into ``cache`` in chunks (the encoder is causal, so chunking changes nothing)."""
    for start in range(0, prompt.shape[1], PREFILL_CHUNK):
        end = start + PREFILL_CHUNK
        model.encode(prompt[:, start:end], cache, None if mask is None else mask[:, start:end])
        mx.eval(cache.state_arrays())


def sampler_step(cfg: SamplerConfig, compiled: bool | None = None) -> Callable[..., StepOutput]:
    """The sampler step for ``cfg``, compiled with ``mx.compile`` on GPU devices (or when asked).

    Compiling fuses the sampler's many elementwise ops over [B, C, V] into few kernels. On Linux's CPU
    backend it first builds C++ (seconds per trace) for no measured gain, so there it is off by default.
    The step number is passed as an array so that one trace serves every step.
    """
    step = partial(denoise_step, cfg=cfg)
    if compiled is None:
        compiled = mx.default_device() == mx.gpu
    if not compiled:
        return step
    with_sc, first = mx.compile(step), mx.compile(partial(step, prev_logits=None))

    def run(logits, canvas, argmax, prev_logits, done, history, n, key):
        n = mx.array(n, dtype=mx.int32)
        if prev_logits is None:
            return StepOutput(*first(logits, canvas, argmax, done=done, history=history, step=n, key=key))
        return StepOutput(*with_sc(logits, canvas, argmax, prev_logits, done, history, n, key))

    return run


def denoise_canvas(
    model: Model,
    cache: DiffusionCache,
    cfg: SamplerConfig,
    key: mx.array,
    canvas_index: int = 0,
    start: mx.array | None = None,
    adaptive_stopping: bool = True,
    step_fn: Callable[..., StepOutput] | None = None,
    history: mx.array | None = None,
    blind: Proposal | None = None,
    hold: Proposal | None = None,
) -> Iterator[StepEvent | CommitEvent]:
    """Denoise one canvas against ``cache``; yields a ``StepEvent`` per step, then the argmax as a commit.

    ``start`` replaces the uniform random starting canvas (the reference's ``decoder_input_ids``), and
    ``history`` the empty argmax history of the stability test (a drafted canvas seeds it: ``verify.py``).
    ``blind``: a draft the first pass does not see; its tokens that equal that pass's argmax join the next input.
    ``hold``: a draft whose tokens that equal the argmax join the next input after every pass (``verify.py``).
    The commit event carries the raw argmax; ``generate_tokens`` finalizes it (EOS, pad).
    """
    batch = cache[0].keys.shape[0]
    init_key, key = mx.random.split(key)
    canvas = start if start is not None else initial_canvas(init_key, batch, model.args.canvas_length,
                                                             model.args.vocab_size)
    canvas = canvas.astype(mx.int32)
    argmax, sc_logits = canvas, None
    done = mx.zeros((batch,), dtype=mx.bool_)
    history = history if history is not None else init_history(cfg, batch, canvas.shape[1])
    passes = mx.zeros((batch,), dtype=mx.int32)
    step_fn = step_fn or sampler_step(cfg)
    for step in range(cfg.max_denoising_steps, 0, -1):
        key, step_key = mx.random.split(key)
        passes = passes + (~done).astype(mx.int32)
        logits = model.denoise(canvas, cache, sc_logits)
        out = step_fn(logits, canvas, argmax, sc_logits, done, history, step, step_key)
        canvas, argmax, sc_logits, history = out.canvas, out.argmax, out.logits, out.history
        if blind is not None and step == cfg.max_denoising_steps:  # after the first pass only
            canvas = agreeing(argmax, canvas, blind)
        if hold is not None:
            canvas = agreeing(argmax, canvas, hold)
        done = out.done if adaptive_stopping else done
        mx.eval(canvas, argmax, sc_logits, history, done, passes)
        yield StepEvent(canvas_index, step, argmax, done)
        if adaptive_stopping and done.all().item():  # the one host round-trip per step
            break
    yield CommitEvent(canvas_index, argmax, done, passes)


def denoise_drafted(
    model: Model,
    cache: DiffusionCache,
    cfg: SamplerConfig,
    key: mx.array,
    canvas_index: int,
    proposal: Proposal,
    vcfg: VerifyConfig,
    adaptive_stopping: bool = True,
    step_fn: Callable[..., StepOutput] | None = None,
    denoiser: Callable[..., Iterator[StepEvent | CommitEvent]] | None = None,
) -> Iterator[StepEvent | CommitEvent]:
    """Denoise one canvas starting from a draft; as ``denoise_canvas`` with ``key`` if the target rejects it.

    The target's first pass reads the draft (part of it re-noised) with the stability history seeded from
    it, so a draft the target's argmax reproduces, confidently, commits after that pass. If the first
    pass agrees with less than ``vcfg.guard`` of the drafted positions, the canvas is denoised again from
    noise exactly as without a draft (same key), one pass dearer. ``denoiser`` replaces ``denoise_canvas``
    (fast mode: ``fast.FastDenoiser``).
    """
    denoise = denoiser or denoise_canvas
    if vcfg.blind:  # the plain path's key: the first pass is the reference's, over noise
        history = seeded_history(proposal, cfg)
        for event in denoise(model, cache, cfg, key, canvas_index, None, adaptive_stopping, step_fn, history,
                             blind=proposal, hold=proposal if vcfg.hold else None):
            yield replace(event, drafted=True) if isinstance(event, CommitEvent) else event
        return
    start_key, draft_key = mx.random.split(mx.random.split(key, 3)[2])  # apart from the plain path's keys
    start, history = draft_start(proposal, start_key, model.args.vocab_size, vcfg.renoise, cfg)
    events = denoise(model, cache, cfg, draft_key, canvas_index, start, adaptive_stopping, step_fn, history,
                     hold=proposal if vcfg.hold else None)
    first = next(events)
    assert isinstance(first, StepEvent)
    yield first
    if not first.done.all().item() and agreement(first.argmax, proposal) < vcfg.guard:
        for event in denoise(model, cache, cfg, key, canvas_index, None, adaptive_stopping, step_fn):
            if isinstance(event, CommitEvent):
                event = replace(event, decoder_passes=event.decoder_passes + 1, drafted=True, restarted=True)
            yield event
        return
    for event in events:
        yield replace(event, drafted=True) if isinstance(event, CommitEvent) else event


def generate_tokens(
    model: Model,
    cache: DiffusionCache,
    max_tokens: int,
    cfg: SamplerConfig,
    seed: int | None = None,
    start: mx.array | None = None,
    adaptive_stopping: bool = True,
    eos_ids: list[int] | None = None,
    compiled: bool | None = None,
    drafts: DraftSession | None = None,
    denoiser: Callable[..., Iterator[StepEvent | CommitEvent]] | None = None,
    constraint: Constraint | None = None,
) -> Iterator[StepEvent | CommitEvent]:
    """Generate up to ``max_tokens`` tokens after the prompt already encoded in ``cache`` (see ``prefill``).

    Each committed canvas is finalized as the reference does (everything after the first EOS becomes
    pad; a finished row stops) and encoded into the cache before the next canvas is denoised. The caller
    truncates to ``max_tokens``: canvases are always denoised whole, since the model was trained on them.
    With ``drafts``, each canvas starts from its proposer's draft while the session keeps it on (``verify.py``);
    the commit rule stays the target's. ``denoiser`` replaces ``denoise_canvas`` (same arguments and events):
    fast mode passes a ``fast.FastDenoiser``; without it this is the reference's loop. With ``constraint``
    (``constrain.py``; batch of one row), every step's argmax is projected onto it and its held positions are
    written into each canvas (a ``denoiser`` gets the constraint and projects its own step).
    """
    denoise = denoiser or denoise_canvas
    a = model.args
    key = mx.random.key(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    finished = mx.zeros((cache[0].keys.shape[0],), dtype=mx.bool_)
    step_fn = sampler_step(cfg, compiled)
    for index in range(math.ceil(max_tokens / a.canvas_length)):
        key, canvas_key = mx.random.split(key)
        given = start if index == 0 else None
        fn = step_fn
        if constraint is not None:
            given = start_canvas(constraint, index * a.canvas_length, given, mx.random.split(canvas_key, 3)[2],
                                 finished.shape[0], a.canvas_length, a.vocab_size)
            fn = constrained_step(step_fn, constraint, index * a.canvas_length)
            if denoiser is not None:  # it runs its own step: it projects that one (fast.project)
                denoise = partial(denoiser, constraint=constraint, offset=index * a.canvas_length)
        proposal = drafts.propose(model, cache) if drafts is not None and given is None else None
        if proposal is not None:
            events = denoise_drafted(model, cache, cfg, canvas_key, index, proposal, drafts.config,
                                     adaptive_stopping, fn, denoise)
        else:
            events = denoise(model, cache, cfg, canvas_key, index, given, adaptive_stopping, fn)
        for event in events:
            if isinstance(event, StepEvent):
                yield event
        tokens, finished = finalize_canvas(event.tokens, finished, eos_ids or a.eos_token_id, a.pad_token_id)
        mx.eval(tokens, finished)
        if constraint is not None:
            constraint.commit(tokens[0].tolist())
        if drafts is not None:
            drafts.commit(tokens, event)
        yield CommitEvent(index, tokens, finished, event.decoder_passes, event.tokens, event.drafted,
                          event.restarted)
        if finished.all().item() or (index + 1) * a.canvas_length >= max_tokens:
            break
        model.encode(tokens, cache)
        mx.eval(cache.state_arrays())
