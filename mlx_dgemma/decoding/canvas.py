"""The one canvas loop: a *stepper* runs each denoising step, *hooks* do the rest.

A canvas is denoised by ``run_canvas``, whatever the decoding variant:

* the stepper (``Stepper``) makes a ``Row`` from a ``Start`` and runs one step: a decoder pass and a sampler
  step. ``steppers.ReferenceStepper`` is the reference's (``Model.denoise`` + ``sampler.denoise_step``);
  ``fast.FastDenoiser`` is fast mode's (a sparse pass + the top-k step).
* hooks (``Hook``, ``hooks.py``) shape how the canvas starts (``begin``: a drafted start, infill's fixed tokens)
  and act after each step (``after_step``: blind verification, held drafts, grammar/infill projection, the
  drafter's guard, which may hand the loop a fresh ``Start`` to restart from).

Every variant shares one state, ``CanvasState``. The loop's state is per ``Row``: its step, sampler settings,
random key, live positions and hooks (a ``Row`` holds the B rows of one request, denoised in lockstep).

The loop does not run the decoder itself: a stepper *yields* a ``Pass`` (``Model.denoise``'s arguments) and
reads its logits from ``Pass.result`` when resumed. ``solo`` computes each pass at once (one request); ``mlx_dgemma.batching`` gathers the
passes of several requests, each at its own step, into one ``Model.denoise_rows`` call. Either way the code
that decides every step is this one loop.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol, cast

import mlx.core as mx

from mlx_dgemma.decoding.sampler import SamplerConfig, init_history, initial_canvas
from mlx_dgemma.model.cache import DiffusionCache, StaleKV


@dataclass
class Pass:
    """A decoder pass a stepper asks for: the arguments of ``Model.denoise``. Its driver sets ``result`` (the
    logits) before resuming the stepper, so that a generator wrapping the loop passes it on as it is."""

    canvas: mx.array  # int32 [B, S]: the canvas, or its tokens at ``positions``
    cache: DiffusionCache
    self_conditioning_logits: mx.array | None = None
    soft: mx.array | None = None
    positions: mx.array | None = None
    stale: StaleKV | None = None
    capped: bool = True
    result: mx.array | None = None

    def run(self, model: Any) -> mx.array:
        """This pass alone: ``Model.denoise``."""
        return model.denoise(
            self.canvas,
            self.cache,
            self.self_conditioning_logits,
            soft=self.soft,
            positions=self.positions,
            stale=self.stale,
            capped=self.capped,
        )


class Pause:
    """Yielded between chunks of long work (a prompt's prefill), so that a batch driver can run the other
    requests' passes in between. ``solo`` skips it."""


PAUSE = Pause()

# A generator of the loop: yields events, ``Pass``es (their ``result`` set by the driver) and ``Pause``s.
Steps = Generator[Any, None, Any]


def solo(model: Any, steps: Steps) -> Generator[Any, None, Any]:
    """Drive ``steps`` alone: compute each ``Pass`` at once; yield every event; return what ``steps`` returns."""
    try:
        while True:
            try:
                item = next(steps)
            except StopIteration as stop:
                return stop.value
            if isinstance(item, Pass):
                item.result = item.run(model)
            elif not isinstance(item, Pause):
                yield item
    finally:
        steps.close()


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


class CanvasState(NamedTuple):
    """A canvas being denoised; every array spans the whole canvas [B, C]. Pure arrays (``mx.compile``-able)."""

    canvas: mx.array  # int32: the decoder's input tokens
    argmax: mx.array  # int32: what would be committed now
    frozen: mx.array  # bool: fast mode's positions that stopped changing (never set by the reference stepper)
    kept: mx.array  # bool: the input token is one the sampler accepted (or a held draft's: freeze_drafts)
    entropy: mx.array  # float32: each position's last entropy (fast mode)
    history: mx.array  # int32 [S, B, C]: argmax history of the stopping test
    done: mx.array  # bool [B]
    sc: tuple[mx.array, ...]  # self-conditioning input: () on a first step, (processed logits [B, C, V],), or
    # fast mode's (top-k values, top-k ids) [B, C, k]


@dataclass
class Start:
    """How a canvas starts: what ``Stepper.start`` makes a ``Row`` of. Hooks' ``begin`` may change it."""

    index: int  # the canvas's index in the answer
    cfg: SamplerConfig
    key: mx.array  # the canvas's randomness: the starting noise, then one key a step
    shape: tuple[int, int, int]  # batch, canvas length, vocabulary
    canvas: mx.array | None = None  # None: uniform noise from ``key``
    history: mx.array | None = None  # None: the empty history of the stability test
    kept: mx.array | None = None  # bool [B, C]: starting tokens that count as accepted (held drafted tokens)
    hooks: tuple[Hook, ...] = ()
    adaptive: bool = True  # stop when the sampler's stopping test says so
    passes: mx.array | None = None  # int32 [B]: passes already spent on this canvas (a rejected draft's)
    soft: mx.array | None = None  # [B, C, H]: the first pass's self-conditioning (a draft's distribution)
    settle: bool = False  # the reference stepper's ``denoise_step(settle=True)`` (a verified draft's canvas)
    drafted: bool = False
    restarted: bool = False


@dataclass
class Row:
    """The loop's state for one canvas: the step to run next, its settings, key, live positions and hooks."""

    start: Start
    key: mx.array
    state: CanvasState
    step: int  # remaining steps N..1 of the next pass, as the reference counts them
    passes: mx.array  # int32 [B]: decoder passes spent on this canvas
    live: (
        int  # the most positions any unfinished row still denoises (fast mode picks its next pass size by it)
    )
    stale: StaleKV | None = None  # fast mode's canvas keys/values of the last pass
    last: tuple[mx.array, mx.array] | None = None  # the last pass's raw logits [B, S, V] and canvas positions
    restart: Start | None = None  # set by a hook: the loop starts this canvas over from it after the step

    @property
    def cfg(self) -> SamplerConfig:
        return self.start.cfg

    @property
    def hooks(self) -> tuple[Hook, ...]:
        return self.start.hooks

    @property
    def first(self) -> bool:
        """Whether the step about to run (or just run) is this canvas's first."""
        return self.step == self.cfg.max_denoising_steps


class Stepper(Protocol):
    """One denoising step of a decoding variant: ``step`` yields its decoder ``Pass`` and returns the new row."""

    def start(self, model: Any, cache: DiffusionCache, start: Start) -> Row: ...

    def step(
        self, model: Any, cache: DiffusionCache, row: Row, key: mx.array
    ) -> Generator[Pass, None, Row]: ...

    def finish(self, model: Any, cache: DiffusionCache, row: Row) -> None: ...


class Hook:
    """What a decoding feature does around the stepper; the defaults do nothing. ``persists``: the hook stays
    when the canvas restarts from noise (a constraint does; a draft's hooks do not)."""

    persists = False

    def begin(self, start: Start) -> Start:
        return start

    def after_step(self, row: Row) -> Row:
        return row


def attach(start: Start, *hooks: Hook) -> Start:
    """``start`` with ``hooks`` appended, each one's ``begin`` applied in order."""
    for hook in hooks:
        start = hook.begin(replace(start, hooks=(*start.hooks, hook)))
    return start


def first_row(start: Start, sc: tuple[mx.array, ...], kept: mx.array | None) -> Row:
    """The row before its first step: ``start.canvas`` (or noise), the history, self-conditioning input ``sc``."""
    init_key, key = mx.random.split(start.key)
    B, C, V = start.shape
    canvas = (start.canvas if start.canvas is not None else initial_canvas(init_key, B, C, V)).astype(
        mx.int32
    )
    history = start.history if start.history is not None else init_history(start.cfg, B, C)
    no = mx.zeros((B, C), dtype=mx.bool_)
    state = CanvasState(
        canvas,
        canvas,
        no,
        no if kept is None else kept,
        mx.zeros((B, C)),
        history,
        mx.zeros((B,), dtype=mx.bool_),
        sc,
    )
    passes = start.passes if start.passes is not None else mx.zeros((B,), dtype=mx.int32)
    return Row(start, key, state, start.cfg.max_denoising_steps, passes, C)


def live(frozen: mx.array, done: mx.array) -> mx.array:
    """The most positions any unfinished row still has to denoise (int32 scalar): the next pass's size."""
    return mx.max(mx.sum((~frozen & ~done[:, None]).astype(mx.int32), axis=-1))


def run_canvas(
    model: Any, cache: DiffusionCache, stepper: Stepper, start: Start
) -> Iterator[StepEvent | CommitEvent]:
    """Denoise one canvas alone (:func:`canvas_steps` driven by :func:`solo`): a ``StepEvent`` per step, then the
    raw argmax as a ``CommitEvent``."""
    commit = yield from solo(model, canvas_steps(model, cache, stepper, start))
    yield commit


def canvas_steps(model: Any, cache: DiffusionCache, stepper: Stepper, start: Start) -> Steps:
    """Denoise one canvas against ``cache``: yields each step's ``Pass`` and ``StepEvent``; returns the raw argmax
    as a ``CommitEvent``.

    Each step: the stepper's pass and sampler step, then every hook in order; one host read a step (all done?
    how many positions live?). A hook that sets ``Row.restart`` has the canvas start over from that ``Start``
    after the step's event (the drafter's guard).
    """
    row = stepper.start(model, cache, start)
    while row.step > 0:
        key, step_key = mx.random.split(row.key)
        row = yield from stepper.step(model, cache, replace(row, key=key), step_key)
        for hook in row.hooks:
            row = hook.after_step(row)
        # Evaluated with the state, so that reading them is the step's one host round-trip (no second sync).
        flags = mx.stack([row.state.done.all().astype(mx.int32), live(row.state.frozen, row.state.done)])
        mx.eval(row.state, row.passes, flags, row.stale.arrays() if row.stale else [])
        yield StepEvent(row.start.index, row.step, row.state.argmax, row.state.done)
        finished, active = cast("list[int]", flags.tolist())
        if row.restart is not None:
            row = stepper.start(model, cache, row.restart)
            continue
        if row.start.adaptive and finished:
            break
        row = replace(row, step=row.step - 1, live=active)
    stepper.finish(model, cache, row)
    s = row.start
    return CommitEvent(
        s.index, row.state.argmax, row.state.done, row.passes, drafted=s.drafted, restarted=s.restarted
    )
