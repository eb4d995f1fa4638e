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
from collections.abc import Callable, Iterator

import mlx.core as mx

from mlx_dgemma.decoding.canvas import CommitEvent, Start, StepEvent, Stepper, attach, run_canvas
from mlx_dgemma.decoding.constrain import Constraint
from mlx_dgemma.decoding.hooks import Blind, Constrained, Held, draft_hooks
from mlx_dgemma.decoding.sampler import SamplerConfig, StepOutput, finalize_canvas
from mlx_dgemma.decoding.steppers import ReferenceStepper, sampler_step
from mlx_dgemma.decoding.verify import DraftSession, Proposal
from mlx_dgemma.model.cache import DiffusionCache
from mlx_dgemma.model.diffusion_gemma import Model

__all__ = ["CommitEvent", "StepEvent", "denoise_canvas", "generate_tokens", "prefill", "sampler_step"]

PREFILL_CHUNK = 2048  # encoder positions per call: bounds the activations of a long prompt


def prefill(model: Model, prompt: mx.array, cache: DiffusionCache, mask: mx.array | None = None) -> None:
    """Encode a prompt into ``cache`` in chunks (the encoder is causal, so chunking changes nothing)."""
    for start in range(0, prompt.shape[1], PREFILL_CHUNK):
        end = start + PREFILL_CHUNK
        model.encode(prompt[:, start:end], cache, None if mask is None else mask[:, start:end])
        mx.eval(cache.state_arrays())


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
    """Denoise one canvas with the reference's stepper; yields a ``StepEvent`` per step, then the raw argmax as a
    commit (``run_canvas`` with ``ReferenceStepper``). ``start`` replaces the uniform random starting canvas (the
    reference's ``decoder_input_ids``), ``history`` the empty history of the stability test; ``blind`` / ``hold``:
    a draft verified blind / held after every pass (``decoding.hooks``). ``step_fn`` replaces the sampler step.
    """
    shape = (cache[0].keys.shape[0], model.args.canvas_length, model.args.vocab_size)
    hooks = ([Blind(blind)] if blind is not None else []) + ([Held(hold)] if hold is not None else [])
    begin = Start(
        canvas_index,
        cfg,
        key,
        shape,
        canvas=start,
        history=history,
        hooks=tuple(hooks),
        adaptive=adaptive_stopping,
    )
    return run_canvas(model, cache, ReferenceStepper(step_fn=step_fn), begin)


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
    proposal = drafts.propose(model, cache) if drafts is not None and begin.canvas is None else None
    if proposal is not None:
        begin = attach(begin, *draft_hooks(proposal, drafts.config, key))
    return begin


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
    denoiser: Stepper | None = None,
    constraint: Constraint | None = None,
) -> Iterator[StepEvent | CommitEvent]:
    """Generate up to ``max_tokens`` tokens after the prompt already encoded in ``cache`` (see ``prefill``).

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
        for event in run_canvas(model, cache, stepper, begin):
            if isinstance(event, StepEvent):
                yield event
        tokens, finished = finalize_canvas(event.tokens, finished, eos_ids or a.eos_token_id, a.pad_token_id)
        mx.eval(tokens, finished)
        if constraint is not None:
            constraint.commit(tokens[0].tolist())
        if drafts is not None:
            drafts.commit(tokens, event)
        yield CommitEvent(
            index, tokens, finished, event.decoder_passes, event.tokens, event.drafted, event.restarted
        )
        if finished.all().item() or (index + 1) * a.canvas_length >= max_tokens:
            break
        model.encode(tokens, cache)
        mx.eval(cache.state_arrays())
