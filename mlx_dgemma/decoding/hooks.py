"""Hooks of the canvas loop: what drafting and constraints do around any stepper (``canvas.Hook``).

* ``Constrained``: infill's fixed tokens in the starting canvas; every step's argmax projected onto a grammar or
  infill template (``constrain.project_canvas``), the tokens it changes written into the next input.
* ``Drafted``: a drafted start (part of the draft re-noised, the stability history seeded with it).
* ``Blind``: blind verification: the first pass runs over noise; drafted tokens it agrees with join the next input.
* ``Held``: held drafts: after every pass, drafted tokens the argmax agrees with join the next input.
* ``Guard``: the drafter's guard: a first pass that agrees with too little of the draft restarts the canvas from
  noise, exactly as without a draft.

``verify.py`` explains the drafting rules; ``constrain.py`` the projection.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

from mlx_dgemma.decoding.canvas import CanvasState, Hook, Row, Start, attach
from mlx_dgemma.decoding.constrain import FOUGHT_STEPS, Constraint, project_canvas, start_canvas
from mlx_dgemma.decoding.verify import (
    Proposal,
    VerifyConfig,
    agreeing,
    agreement,
    draft_start,
    seeded_history,
)


@dataclass
class Constrained(Hook):
    """A grammar or infill ``constraint`` on the canvas at answer position ``offset`` (batch of one row).

    Bounded: after ``FOUGHT_STEPS`` steps in a row in which the projection replaced some of the model's answer
    tokens, the step is projected again with the answer closing (``Constraint.close``: the shortest completion,
    then the end token) and the canvas stops denoising; so does every later canvas's first step while the answer
    is still closing. A forced answer the model fights thus takes at most ``FOUGHT_STEPS`` passes, plus one a
    canvas if its shortest completion spills over."""

    constraint: Constraint
    offset: int
    fought: int = 0  # steps in a row in which the projection overrode the model
    persists = True

    def begin(self, start: Start) -> Start:
        B, C, V = start.shape
        noise_key = mx.random.split(start.key, 3)[2]  # apart from the keys the loop splits off
        return replace(
            start, canvas=start_canvas(self.constraint, self.offset, start.canvas, noise_key, B, C, V)
        )

    def after_step(self, row: Row) -> Row:
        """The one more host read a step: the argmax and, where the grammar rejects it, a logits row."""
        s = row.state
        mx.eval(s.argmax, s.canvas, s.sc, row.last or ())
        argmax, canvas = np.asarray(s.argmax[0]).astype(np.int32), np.asarray(s.canvas[0])
        logits = logits_row(s, row.last, row.start.shape[2])
        c = self.constraint
        projected, write = project_canvas(c, self.offset, argmax, canvas, logits)
        self.fought = self.fought + 1 if c.overrode else 0
        if not c.closing and self.fought >= FOUGHT_STEPS and c.close():
            projected, write = project_canvas(c, self.offset, argmax, canvas, logits)
        state = rewrite(s, projected, write)
        if c.closing:  # the answer is closed (or closing) in this canvas: it stops here
            state = state._replace(done=mx.ones_like(state.done))
        return replace(row, state=state)


def logits_row(state: CanvasState, last: tuple[mx.array, mx.array] | None, vocab: int):
    """Position ``i``'s logits ``[V]`` (row 0) to rank tokens by: the last pass's raw logits where it computed
    ``i``, else the self-conditioning input kept for it (top-k: a token outside them ranks below all of them)."""
    raw, positions = last if last is not None else (None, None)
    computed = (
        {} if positions is None else {int(p): j for j, p in enumerate(np.asarray(positions[0]).tolist())}
    )

    def row(i: int) -> np.ndarray:
        if i in computed:
            assert raw is not None  # computed is empty without a last pass
            return np.asarray(raw[0, computed[i]], dtype=np.float32)
        if len(state.sc) == 1:
            return np.asarray(state.sc[0][0, i], dtype=np.float32)
        full = np.full(vocab, -1e30, dtype=np.float32)  # finite: an allowed token still ranks
        full[np.asarray(state.sc[1][0, i])] = np.asarray(state.sc[0][0, i], dtype=np.float32)
        return full

    return row


def rewrite(state: CanvasState, projected: np.ndarray, write: np.ndarray) -> CanvasState:
    """``state`` with the projected argmax, ``write`` positions written into the canvas and unfrozen (fast mode's
    next sparse pass recomputes them; a rewritten token was never accepted)."""
    if not write.any():
        return state
    changed, tokens = mx.array(write)[None], mx.array(projected)[None]
    return state._replace(
        argmax=tokens,
        canvas=mx.where(changed, tokens, state.canvas),
        frozen=state.frozen & ~changed,
        kept=state.kept & ~changed,
    )


@dataclass
class Drafted(Hook):
    """Start from ``proposal`` with ``renoise`` of it re-noised, the stability history seeded with it and the first
    pass self-conditioned on its distribution (``Proposal.soft``, when it has one)."""

    proposal: Proposal
    renoise: float
    settle: bool = False  # sure, reproduced input tokens spend none of the sampler's entropy budget

    def begin(self, start: Start) -> Start:
        # Keys apart from the plain path's: a rejected draft restarts on those (Guard).
        start_key, draft_key = mx.random.split(mx.random.split(start.key, 3)[2])
        canvas, history = draft_start(self.proposal, start_key, start.shape[2], self.renoise, start.cfg)
        return replace(
            start,
            key=draft_key,
            canvas=canvas,
            history=history,
            drafted=True,
            soft=self.proposal.soft,
            settle=self.settle,
        )


@dataclass
class Blind(Hook):
    """Blind verification: the history seeded with the draft; after the first pass (over noise, the reference's
    own), the drafted tokens equal to its argmax join the next input."""

    proposal: Proposal

    def begin(self, start: Start) -> Start:
        return replace(start, history=seeded_history(self.proposal, start.cfg), drafted=True)

    def after_step(self, row: Row) -> Row:
        if not row.first:
            return row
        s = row.state
        return replace(row, state=s._replace(canvas=agreeing(s.argmax, s.canvas, self.proposal)))


@dataclass
class Held(Hook):
    """Held drafts: after every pass, the drafted tokens equal to the argmax join the next input at every live
    (not frozen) position. A drafted start's held tokens count as accepted (``Start.kept``: fast mode's
    ``freeze_drafts`` may freeze them after the first pass)."""

    proposal: Proposal

    def begin(self, start: Start) -> Start:
        if start.canvas is None:
            return start
        return replace(start, kept=self.proposal.drafted & (start.canvas == self.proposal.canvas))

    def after_step(self, row: Row) -> Row:
        s = row.state
        held = agreeing(s.argmax, s.canvas, self.proposal)
        return replace(row, state=s._replace(canvas=mx.where(s.frozen, s.canvas, held)))


@dataclass
class Guard(Hook):
    """The drafter's guard: a first pass that agrees with less than ``guard`` of the drafted positions (while some
    row is still denoising) restarts the canvas from noise on ``key``, the plain path's, as without a draft."""

    proposal: Proposal
    guard: float
    key: mx.array

    def after_step(self, row: Row) -> Row:
        if (
            not row.first
            or row.state.done.all().item()
            or agreement(row.state.argmax, self.proposal) >= self.guard
        ):
            return row
        # The rejected pass stays counted; only the hooks that outlive a draft (a constraint's) come along.
        fresh = Start(
            row.start.index,
            row.cfg,
            self.key,
            row.start.shape,
            adaptive=row.start.adaptive,
            passes=row.passes,
            drafted=True,
            restarted=True,
        )
        return replace(row, restart=attach(fresh, *(h for h in row.hooks if h.persists)))


def draft_hooks(proposal: Proposal, vcfg: VerifyConfig, key: mx.array) -> list[Hook]:
    """The hooks that verify ``proposal`` as ``vcfg`` says (``verify.py``); ``key`` is the canvas's own."""
    held = [Held(proposal)] if vcfg.hold else []
    if vcfg.blind:  # the plain path's key: the first pass is the reference's, over noise
        return [Blind(proposal), *held]
    return [Drafted(proposal, vcfg.renoise, vcfg.settle), *held, Guard(proposal, vcfg.guard, key)]
