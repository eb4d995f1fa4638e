"""Verifying drafted canvases with the target's own sampler: the settings, the seeded start, the session.

A proposer (``mlx_dgemma.drafter``: the trained drafter, prompt lookup) guesses a whole canvas. The target then
denoises from that guess instead of from uniform noise (the canvas loop's hooks: ``decoding.hooks``):

1. A fraction ``renoise`` of the drafted positions is replaced by uniform noise, so the target must predict
   those itself rather than copy its input.
2. The stability history of the stopping test is seeded with the draft, and with the proposer's guesses at the
   positions it did not draft (``seed_guesses``: a drafter's argmax where it is unsure). The stopping test is
   unchanged: the target's argmax must equal the previous argmax (here: the draft) at every position, and the
   target's own mean entropy must be under the confidence threshold. A draft the target agrees with commits after
   one pass; one it partly agrees with is denoised further by the target's own loop.
3. ``condition``: the first pass is self-conditioned on the proposer's distribution (``Proposal.soft``, the soft
   embedding of the drafter's top-k), as every later pass is on the target's own previous one. Without it the first
   pass reads the draft with no self-conditioning and is rarely sure enough to stop.
4. ``settle`` (the reference stepper): a position whose input token the target's argmax reproduces with an entropy
   under the confidence threshold is accepted without spending the sampler's entropy budget; held drafted tokens
   would otherwise use the budget up every step and the rest of the canvas would wait (fast mode's freeze does
   the same for its frozen positions).
5. Guard: if the first pass agrees with fewer than ``guard`` of the drafted positions, the canvas is denoised
   again from noise exactly as without a draft.
6. A session whose drafted canvases keep getting rejected switches its proposer off (``DraftSession``).

``blind`` verification (``VerifyConfig(blind=True)``) never shows the target the draft: its first pass runs over
noise, exactly the reference's first pass, and a drafted token enters the next decoder input only where it equals
that pass's argmax (the stability history is still seeded with the draft). The target, trained on canvases whose
un-noised tokens are always right, tends to keep a plausible token it is shown; blind, a draft wrong everywhere
changes nothing, and no restart is needed. A partly right draft still steers: every agreeing position is accepted
after the first pass, sure or not (``python -m demo.eval_drafter --blind`` measures what that costs).

``hold`` (``VerifyConfig(hold=True)``) keeps the draft in play after the first pass. The reference's sampler
re-noises every position it does not accept, so without it a draft the target agrees with is mostly thrown away
after one pass and re-derived over several. Held, a drafted token the target's argmax agrees with stays in the next
input wherever the sampler did not accept it. A perfect draft then commits in about two passes without
``condition`` (the first pass, with no self-conditioning, is not yet sure enough); with it, half the long demo's
drafted canvases commit after one (docs/drafter.md). A wrong token the target is led to agree with is held just
as firmly, so hold pays only with drafts of what the drafter is sure of (``DrafterProposer(confidence=...)``).

What is committed is always the target's argmax, under the target's commit rule (or at the step limit): a draft
can save passes, never lower the bar.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, cast

import mlx.core as mx

from mlx_dgemma.decoding.sampler import SamplerConfig, init_history, initial_canvas, is_one_of
from mlx_dgemma.errors import DGemmaError

if TYPE_CHECKING:
    from mlx_dgemma.model.cache import DiffusionCache
    from mlx_dgemma.model.diffusion_gemma import Model


@dataclass(frozen=True)
class VerifyConfig:
    """How drafts are verified (``python -m demo.eval_drafter`` measures the trade-offs)."""

    # Fraction of drafted positions re-noised before the target's first pass. Measured on the demo model with
    # perfect drafts: 0 commits every canvas in 1 pass, 0.1 in 1.6, 0.25 in 2.0 (the target is less sure of
    # a partly noisy canvas); 0 alone would let the target copy its input, so a little noise stays.
    renoise: float = 0.1
    guard: float = 0.5  # first-pass agreement below this: restart the canvas from noise
    min_success: float = 0.3  # a session whose drafts succeed less often than this ...
    patience: int = 4  # ... after this many drafted canvases turns its proposer off
    hold: bool = True  # after every pass, drafted tokens equal to the target's argmax join the next input
    draft_ends: bool = True  # draft end-of-sequence and pad tokens too (DraftSession.propose)
    blind: bool = False  # the first pass runs over noise; agreeing drafted tokens join the next input (above)
    condition: bool = True  # the first pass is self-conditioned on the draft's distribution (Proposal.soft)
    seed_guesses: bool = True  # the history holds the proposer's guess at undrafted positions too
    settle: bool = True  # positions the target reproduces surely spend none of the sampler's entropy budget

    def __post_init__(self) -> None:
        for name in ("renoise", "guard", "min_success"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise DGemmaError(f"VerifyConfig.{name} must be between 0 and 1 (got {value!r})")
        if self.patience < 1:
            raise DGemmaError(f"VerifyConfig.patience must be at least 1 (got {self.patience!r})")


@dataclass
class Proposal:
    """A drafted canvas: ``canvas`` int32 [B, C]; ``drafted`` bool [B, C] marks the positions it proposes
    (the others start as noise the target denoises as usual)."""

    canvas: mx.array
    drafted: mx.array
    # Where the canvas is the proposer's guess though not drafted (a drafter's unsure positions: its argmax).
    # The stability history is seeded there too (``VerifyConfig.seed_guesses``); None: the drafted positions.
    guessed: mx.array | None = None
    soft: mx.array | None = None  # [B, C, H]: the proposer's distribution as a soft embedding (``condition``)


class Proposer(Protocol):
    """What ``DraftSession`` drives: ``begin`` a generation, ``propose`` each canvas, see each ``commit``."""

    name: str

    def begin(self, prompt_ids: list[list[int]]) -> None: ...

    def propose(self, model: Model, cache: DiffusionCache) -> Proposal | None: ...

    def commit(self, tokens: list[list[int]]) -> None: ...


def draft_start(
    proposal: Proposal, key: mx.array, vocab: int, renoise: float, cfg: SamplerConfig
) -> tuple[mx.array, mx.array]:
    """The target's first input (draft with ``renoise`` of it replaced by noise) and the seeded history."""
    noise_key, pick_key = mx.random.split(key)
    B, C = proposal.canvas.shape
    keep = proposal.drafted & (mx.random.uniform(shape=(B, C), key=pick_key) >= renoise)
    canvas = mx.where(keep, proposal.canvas, initial_canvas(noise_key, B, C, vocab)).astype(mx.int32)
    return canvas, seeded_history(proposal, cfg)


def seeded_history(proposal: Proposal, cfg: SamplerConfig) -> mx.array:
    """The stability test's argmax history with the draft as the previous argmax where it guessed (``Proposal``)."""
    history = init_history(cfg, *proposal.canvas.shape)
    guessed = proposal.drafted if proposal.guessed is None else proposal.drafted | proposal.guessed
    return mx.where(guessed[None], proposal.canvas.astype(mx.int32)[None], history)


def agreeing(argmax: mx.array, canvas: mx.array, proposal: Proposal) -> mx.array:
    """``canvas`` with the drafted tokens that equal ``argmax`` written in (blind verification's next input)."""
    agree = proposal.drafted & (argmax == proposal.canvas)
    return mx.where(agree, proposal.canvas.astype(canvas.dtype), canvas)


def without_ends(proposal: Proposal, ends: Iterable[int]) -> Proposal:
    """``proposal`` drafting none of its ``ends`` tokens (end of sequence, pad): those positions start as noise."""
    return replace(proposal, drafted=proposal.drafted & ~is_one_of(proposal.canvas, ends))


def agreement(argmax: mx.array, proposal: Proposal) -> float:
    """Fraction of the drafted positions where the target's argmax equals the draft (1.0 if none drafted)."""
    drafted = cast(int, proposal.drafted.sum().item())  # sums of bool arrays: ints
    if drafted == 0:
        return 1.0
    return cast(int, ((argmax == proposal.canvas) & proposal.drafted).sum().item()) / drafted


class DraftSession:
    """One generation's proposer and its record: it switches the proposer off when drafts keep failing."""

    def __init__(
        self,
        proposer: Proposer,
        prompt_ids: list[list[int]],
        config: VerifyConfig | None = None,
        ends: Sequence[int] = (),
    ):
        # A proposer keeps one generation's state (``begin``/``commit``: a drafter's context, lookup's ids): each
        # session drafts with its own shallow copy, sharing the weights, so that generations may run together.
        self.proposer = copy.copy(proposer)
        self.config, self.ends = config or VerifyConfig(), tuple(ends)
        self.active = True
        self.drafted = self.restarted = 0
        self.proposer.begin(prompt_ids)

    def propose(self, model: Model, cache: DiffusionCache) -> Proposal | None:
        """The proposer's draft of the next canvas, or None (switched off, or nothing to propose).

        With ``VerifyConfig(draft_ends=False)`` it drafts no end token (the model's end-of-sequence and pad tokens,
        and ``ends``, the tokenizer's own end tokens): a drafted end fixes the answer's length, and a target that
        trusts a misjudged one fills it with misaligned text (with an earlier, less accurate drafter, fast +
        drafter lost 5 points with drafted ends). With the drafter's distribution as the first pass's
        self-conditioning and its guesses seeded, drafted ends cost no exact match and save passes (docs/drafter.md).
        """
        proposal = self.proposer.propose(model, cache) if self.active else None
        if proposal is None:
            return None
        if not self.config.seed_guesses:
            proposal = replace(proposal, guessed=None)
        if not self.config.condition:
            proposal = replace(proposal, soft=None)
        if self.config.draft_ends:
            return proposal
        return without_ends(proposal, {*model.args.eos_token_id, model.args.pad_token_id or 0, *self.ends})

    def commit(self, tokens: mx.array, event: Any) -> None:
        """Record a committed canvas (finalized tokens [B, C]) and how its draft fared."""
        self.proposer.commit(cast("list[list[int]]", tokens.tolist()))
        if not event.drafted:
            return
        self.drafted += 1
        self.restarted += bool(event.restarted)
        success = 1.0 - self.restarted / self.drafted
        if self.drafted >= self.config.patience and success < self.config.min_success:
            self.active = False
