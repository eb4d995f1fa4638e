"""The block-by-block generation loop on token ids: encode → denoise a canvas → commit → encode it → ...

This is ``DiffusionGemmaGenerationMixin.generate`` of the reference, step for step, as a generator of
events so that callers can stream drafts and commits. Each canvas runs through the one canvas loop
(``decoding.canvas.run_canvas``) with a stepper (the reference's, or fast mode's) and the hooks of the features
asked for (``decoding.hooks``: drafts, grammars, infill). Text, chat templates and statistics live in
``generation.py``; the per-step sampler pieces in ``sampler.py``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any, cast

import mlx.core as mx

from mlx_dgemma.decoding.canvas import (
    PAUSE,
    CommitEvent,
    Start,
    StepEvent,
    Stepper,
    Steps,
    attach,
    canvas_steps,
    solo,
)
from mlx_dgemma.decoding.constrain import Constraint
from mlx_dgemma.decoding.hooks import Constrained, draft_hooks
from mlx_dgemma.decoding.sampler import SamplerConfig, finalize_canvas
from mlx_dgemma.decoding.steppers import ReferenceStepper, sampler_step
from mlx_dgemma.decoding.verify import DraftSession
from mlx_dgemma.model.cache import DiffusionCache
from mlx_dgemma.model.diffusion_gemma import Model

__all__ = [
    "CommitEvent",
    "StepEvent",
    "generate_steps",
    "generate_tokens",
    "prefill",
    "prefill_steps",
    "sampler_step",
]

PREFILL_CHUNK = 2048  # encoder positions per call: bounds the activations of a long prompt


def prefill(model: Model, prompt: mx.array, cache: DiffusionCache, mask: mx.array | None = None) -> None:
    """Encode a prompt into ``cache`` in chunks (the encoder is causal, so chunking changes nothing)."""
    for _ in prefill_steps(model, prompt, cache, mask):
        pass


def prefill_steps(
    model: Model, prompt: mx.array, cache: DiffusionCache, mask: mx.array | None = None
) -> Steps:
    """:func:`prefill` as a generator of the canvas loop: a ``PAUSE`` after each chunk, so that a batch runs the
    other requests' passes between the chunks of a long prompt."""
    for start in range(0, prompt.shape[1], PREFILL_CHUNK):
        end = start + PREFILL_CHUNK
        model.encode(prompt[:, start:end], cache, None if mask is None else mask[:, start:end])
        mx.eval(cache.state_arrays())
        yield PAUSE


def canvas_start(
    model: Model,
    cache: DiffusionCache,
    cfg: SamplerConfig,
    key: mx.array,
    index: int,
    given: mx.array | None,
    adaptive: bool,
    constraint: Constraint | None,
    drafts: DraftSession | None,
) -> Start:
    """How canvas ``index`` starts: ``given`` (or noise), the constraint's hook, and a draft's when the session
    proposes one (only for a canvas that starts from noise: a draft would overwrite held or given tokens)."""
    a = model.args
    begin = Start(
        index,
        cfg,
        key,
        (cache[0].keys.shape[0], a.canvas_length, a.vocab_size),
        canvas=given,
        adaptive=adaptive,
    )
    if constraint is not None:
        begin = attach(begin, Constrained(constraint, index * a.canvas_length))
    if drafts is not None and begin.canvas is None:
        proposal = drafts.propose(model, cache)
        if proposal is not None:
            begin = attach(begin, *draft_hooks(proposal, drafts.config, key))
    return begin


def generate_tokens(
    model: Model, cache: DiffusionCache, max_tokens: int, cfg: SamplerConfig, **options: Any
) -> Iterator[StepEvent | CommitEvent]:
    """Generate up to ``max_tokens`` tokens after the prompt already encoded in ``cache`` (see ``prefill``): the
    events of :func:`generate_steps` (``options`` are its keywords) with each decoder pass computed at once."""
    return solo(model, generate_steps(model, cache, max_tokens, cfg, **options))


def generate_steps(
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
    denoiser: Stepper | None = None,
    constraint: Constraint | None = None,
) -> Steps:
    """The block loop as a generator of the canvas loop (``canvas.Steps``): yields every canvas's ``Pass``es and
    ``StepEvent``s and each ``CommitEvent``.

    Each committed canvas is finalized as the reference does (everything after the first EOS becomes
    pad; a finished row stops) and encoded into the cache before the next canvas is denoised. The caller
    truncates to ``max_tokens``: canvases are always denoised whole, since the model was trained on them.
    With ``drafts``, each canvas starts from its proposer's draft while the session keeps it on (``verify.py``);
    the commit rule stays the target's. ``denoiser`` is the stepper (``decoding.canvas.Stepper``): fast mode passes
    a ``fast.FastDenoiser``; without it this is the reference's loop (``compiled``: compile its sampler step).
    With ``constraint`` (``constrain.py``; batch of one row), every step's argmax is projected onto it and its held
    positions are written into each canvas.
    """
    stepper = denoiser or ReferenceStepper(compiled)
    a = model.args
    key = mx.random.key(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    finished = mx.zeros((cache[0].keys.shape[0],), dtype=mx.bool_)
    for index in range(math.ceil(max_tokens / a.canvas_length)):
        key, canvas_key = mx.random.split(key)
        begin = canvas_start(
            model,
            cache,
            cfg,
            canvas_key,
            index,
            start if index == 0 else None,
            adaptive_stopping,
            constraint,
            drafts,
        )
        event = yield from canvas_steps(model, cache, stepper, begin)
        tokens, finished = finalize_canvas(event.tokens, finished, eos_ids or a.eos_token_id, a.pad_token_id)
        mx.eval(tokens, finished)
        if constraint is not None:
            constraint.commit(cast("list[int]", tokens[0].tolist()))
        if drafts is not None:
            drafts.commit(tokens, event)
        yield CommitEvent(
            index, tokens, finished, event.decoder_passes, event.tokens, event.drafted, event.restarted
        )
        if finished.all().item() or (index + 1) * a.canvas_length >= max_tokens:
            break
        model.encode(tokens, cache)
        mx.eval(cache.state_arrays())
