"""The reference stepper: one ``Model.denoise`` pass and one ``sampler.denoise_step``, as the reference's loop.

Fast mode's stepper is ``mlx_dgemma.decoding.fast.FastDenoiser`` (a sparse pass and the top-k step).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import replace
from functools import partial
from typing import Any

import mlx.core as mx

from mlx_dgemma.decoding.canvas import Pass, Row, Start, first_row
from mlx_dgemma.decoding.sampler import SamplerConfig, StepOutput, denoise_step
from mlx_dgemma.model.cache import DiffusionCache


def sampler_step(
    cfg: SamplerConfig, compiled: bool | None = None, settle: bool = False
) -> Callable[..., StepOutput]:
    """The sampler step for ``cfg``, compiled with ``mx.compile`` on GPU devices (or when asked).

    Compiling fuses the sampler's many elementwise ops over [B, C, V] into few kernels. On Linux's CPU
    backend it first builds C++ (seconds per trace) for no measured gain, so there it is off by default.
    The step number is passed as an array so that one trace serves every step.
    """
    step = partial(denoise_step, cfg=cfg, settle=settle)
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


class ReferenceStepper:
    """The reference's step (``DiffusionGemmaGenerationMixin._denoising_step``): a full decoder pass over the
    canvas, self-conditioned on the previous step's processed logits, then ``sampler.denoise_step``.

    ``compiled``: compile the sampler step (``None``: on GPUs). ``step_fn``: a sampler step to use instead of
    ``sampler_step(cfg)`` (same arguments and ``StepOutput``).
    """

    def __init__(self, compiled: bool | None = None, step_fn: Callable[..., StepOutput] | None = None):
        self.compiled, self.step_fn = compiled, step_fn
        self._steps: dict[tuple[SamplerConfig, bool], Callable[..., StepOutput]] = {}

    def start(self, model: Any, cache: DiffusionCache, start: Start) -> Row:
        return first_row(start, (), None)

    def step(self, model: Any, cache: DiffusionCache, row: Row, key: mx.array) -> Generator[Pass, None, Row]:
        s = row.state
        sc = s.sc[0] if s.sc else None
        passes = row.passes + (~s.done).astype(mx.int32)
        soft = row.start.soft if row.first else None
        request = Pass(s.canvas, cache, sc, soft=soft)
        yield request
        logits = request.result
        out = self._step(row.cfg, row.start.settle)(
            logits, s.canvas, s.argmax, sc, s.done, s.history, row.step, key
        )
        done = out.done if row.start.adaptive else s.done
        state = s._replace(
            canvas=out.canvas, argmax=out.argmax, history=out.history, done=done, sc=(out.logits,)
        )
        return replace(row, state=state, passes=passes)

    def finish(self, model: Any, cache: DiffusionCache, row: Row) -> None:
        pass

    def _step(self, cfg: SamplerConfig, settle: bool) -> Callable[..., StepOutput]:
        if self.step_fn is not None:
            return self.step_fn
        if (cfg, settle) not in self._steps:
            self._steps[(cfg, settle)] = sampler_step(cfg, self.compiled, settle)
        return self._steps[(cfg, settle)]
