"""Fast decoding: a labelled departure from the reference sampler that cuts the decoder's work per token.

The reference (``loop.denoise_canvas``) runs a full decoder pass over every canvas position at every step,
then the sampler's math over the whole vocabulary. Fast mode (``FastConfig``, ``FastDenoiser``) keeps the
reference's schedule, acceptance rule and stopping test, and changes five things, each switchable so that an
ablation can measure it alone:

* ``topk``: the sampler's math (soft-cap, temperature, log-softmax, entropy, the draw, the argmax) over each
  position's top-k logits only. The argmax is exact; the entropy and the draw are those of the top-k
  renormalised, which drops the (tiny, at an accepted position) mass outside the top-k.
* ``freeze``: a position whose input token was accepted, which the model's argmax reproduces, and which is
  accepted again with an entropy under ``freeze_entropy`` (the canvas's own confidence bar), is frozen: its token, argmax and entropy stop changing, and it no longer spends the entropy
  budget of the acceptance rule. A canvas whose positions are all frozen is done. With ``freeze_drafts``, a
  held draft's tokens (``verify.VerifyConfig.hold``) count as accepted, so those the first pass reproduces that
  surely freeze at once and the second pass is already sparse.
* ``sparse``: the decoder runs only on positions not yet frozen, padded up to a bounded set of shape buckets
  (fractions of the canvas, ``buckets``) so compiled and Metal kernels are built once per bucket. Frozen
  positions are seen through their per-layer keys/values from the last pass that computed them (a stale
  canvas K/V cache, as Fast-dLLM's approximate cache), via ``model.Attention``'s per-token positions.
* ``sparse_sc``: the self-conditioning soft embedding from each position's top-k probabilities and the k
  gathered embedding rows, instead of probabilities ``[C, V]`` times the embedding ``[V, H]``.
* ``eos_cut``: once an end-of-sequence token is frozen, every later position is frozen (the
  reference turns it into pad at commit anyway), so the tail stops costing decoder work.

The per-step host round-trip stays one (the reference's ``done.all().item()`` becomes one read of
``[all done, positions still active]``, which also picks the next bucket). ``exact_agreement`` checks the
approximations against the exact model: one exact pass over a committed canvas, and the fraction of positions
whose exact argmax is the committed token.

``FastDenoiser`` is fast mode's stepper of the one canvas loop (``decoding.canvas``): drafts, grammars and infill
act on it through the same hooks as on the reference's (``decoding.hooks``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, cast

import mlx.core as mx

from mlx_dgemma.decoding.canvas import CanvasState, Pass, Row, Start, first_row
from mlx_dgemma.decoding.sampler import (
    SamplerConfig,
    accept_mask,
    entropy_from_logprobs,
    initial_canvas,
    is_one_of,
    is_stable_and_confident,
    log_softmax,
    temperature,
)
from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.model.cache import DiffusionCache, StaleKV
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.model.diffusion_gemma import softcap as _softcap

FastState = CanvasState  # the canvas loop's state (fast mode uses every field of it)

_FROZEN_ENTROPY = (
    1e9  # frozen positions sort after every live one in the acceptance rule (finite: no inf - inf)
)


@dataclass(frozen=True)
class FastConfig:
    """Which fast-decoding techniques are on (all by default); see the module docstring for each."""

    topk: int = 64  # 0: the sampler's math over the whole vocabulary
    freeze: bool = True
    freeze_entropy: float = 0.005  # ... and only a position this sure (its entropy, nats) freezes
    freeze_drafts: bool = True  # held drafted tokens count as accepted: they can freeze after the first pass
    sparse: bool = True  # needs freeze
    sparse_sc: bool = True  # needs topk
    eos_cut: bool = True  # needs freeze
    # Decoder input sizes, fractions of the canvas: sixteenths (16 shapes) left 8% fewer positions a token than
    # (1/8, 1/4, 1/2, 3/4, 1) on the long demo, for the same answers.
    buckets: tuple[float, ...] = tuple(i / 16 for i in range(1, 17))
    refresh: int = 0  # with sparse: a full pass every this many steps refreshes the stale K/V (0: never)
    check: bool = False  # one exact pass per committed canvas: FastDenoiser.exact (costs a pass per canvas)

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise DGemmaError(f"FastConfig.{msg}")

        if not isinstance(self.topk, int) or self.topk < 0:
            fail(f"topk must be an integer >= 0 (got {self.topk!r}); use 0 for the whole vocabulary, e.g. 64")
        if self.sparse and not self.freeze:
            fail("sparse needs freeze=True: only frozen positions can be left out of the decoder")
        if self.eos_cut and not self.freeze:
            fail("eos_cut needs freeze=True: the tail after a frozen end-of-sequence token is frozen")
        if self.sparse_sc and not self.topk:
            fail("sparse_sc needs topk > 0: the soft embedding is built from the top-k probabilities")
        if not self.buckets or any(not 0 < b <= 1 for b in self.buckets) or max(self.buckets) != 1:
            fail(f"buckets must be fractions in (0, 1] that include 1 (got {self.buckets!r})")
        if not self.freeze_entropy > 0:
            fail(f"freeze_entropy must be > 0 (got {self.freeze_entropy!r}); use e.g. 0.005")
        if not isinstance(self.refresh, int) or self.refresh < 0:
            fail(f"refresh must be an integer >= 0 (got {self.refresh!r})")

    @classmethod
    def off(cls, **on: Any) -> FastConfig:
        """Every technique off (the fast loop then commits what the reference commits), except those given."""
        return cls(
            **{"topk": 0, "freeze": False, "sparse": False, "sparse_sc": False, "eos_cut": False, **on}
        )

    def sizes(self, canvas: int) -> list[int]:
        """The decoder input sizes (shape buckets) for a canvas of ``canvas`` positions, ascending."""
        return sorted({max(1, math.ceil(b * canvas)) for b in self.buckets})


# ----------------------------------------------------------------------------------------------------------
# A pass over some canvas positions (``Model.denoise(positions=..., stale=...)``) and its soft embedding


def forward(
    model: Model,
    tokens: mx.array,
    cache: DiffusionCache,
    soft: mx.array | None,
    positions: mx.array | None = None,
    stores: list[tuple[mx.array, mx.array] | None] | None = None,
    canvas: int | None = None,
) -> tuple[mx.array, list[tuple[mx.array, mx.array] | None] | None]:
    """Raw float32 logits (before soft-capping) of ``Model.denoise`` over ``tokens`` [B, S] with soft embedding
    ``soft``; with ``positions`` (their canvas positions) a sparse pass over the per-layer ``stores`` (``None``
    before the first pass) of a ``canvas``-long canvas, whose updated stores are returned too."""
    if positions is None:
        return model.denoise(tokens, cache, soft=soft, capped=False), None
    stale = StaleKV(canvas or tokens.shape[1], stores)
    return model.denoise(
        tokens, cache, soft=soft, positions=positions, stale=stale, capped=False
    ), stale.stores


def dense_soft(model: Model, processed: mx.array) -> mx.array:
    """The reference's soft embedding: ``softmax(processed logits [B, S, V]) @ embedding * sqrt(H)``."""
    return model.model.decoder.soft_embed(mx.softmax(processed.astype(mx.float32), axis=-1))


def sparse_soft(model: Model, values: mx.array, ids: mx.array) -> mx.array:
    """The soft embedding from top-k processed logits ``values`` / token ``ids`` [B, S, k]: the k-way softmax
    times the k gathered embedding rows (2·k·H FLOPs a position instead of 2·V·H)."""
    decoder = model.model.decoder
    rows = decoder.embed_tokens(ids)  # [B, S, k, H]; a quantized embedding dequantizes just these rows
    probs = mx.softmax(values.astype(mx.float32), axis=-1).astype(rows.dtype)
    h = (probs[..., None, :] @ rows).squeeze(-2)
    return h * mx.array(decoder.embed_scale, dtype=h.dtype)


# ----------------------------------------------------------------------------------------------------------
# One fast sampler step (pure on arrays, compilable: one trace per bucket size)


def fast_step(
    raw: mx.array,
    positions: mx.array,
    state: FastState,
    step: mx.array,
    key: mx.array,
    cfg: SamplerConfig,
    fcfg: FastConfig,
    softcapping: float,
    eos: tuple[int, ...],
    adaptive: bool,
) -> FastState:
    """One step on the decoder's raw logits ``raw`` [B, S, V] for canvas ``positions`` [B, S].

    With every technique off (``FastConfig.off()``) and all positions given, this is the reference's
    ``sampler.denoise_step`` op for op (same keys, same draws).
    """
    sample_key, noise_key = mx.random.split(key)
    B, C = state.canvas.shape
    sample, top, ent, new_sc = _draw(raw, temperature(step, cfg), sample_key, fcfg, softcapping)

    def scatter(full: mx.array, part: mx.array) -> mx.array:
        idx = positions.reshape(*positions.shape, *([1] * (part.ndim - 2)))
        return mx.put_along_axis(full, mx.broadcast_to(idx, part.shape), part.astype(full.dtype), axis=1)

    frozen = state.frozen
    ent = mx.where(frozen, state.entropy, scatter(state.entropy, ent))
    argmax = mx.where(frozen, state.argmax, scatter(state.argmax, top.astype(mx.int32)))
    sample = scatter(state.canvas, sample)
    ranked = mx.where(frozen, _FROZEN_ENTROPY, ent) if fcfg.freeze else ent
    accepted = accept_mask(ranked, cfg.entropy_bound) & ~frozen
    noise = initial_canvas(noise_key, B, C, raw.shape[-1])
    canvas = mx.where(accepted, sample, noise)
    frozen, canvas, ent = _freeze(state, accepted, argmax, canvas, ent, fcfg, eos)

    done = state.done[:, None]
    canvas = mx.where(done, state.canvas, canvas)
    argmax = mx.where(done, state.argmax, argmax)
    sc = tuple(mx.where(done[..., None], old, scatter(old, new)) for old, new in zip(state.sc, new_sc))
    stop, history = is_stable_and_confident(argmax, state.history, ent, cfg)
    if fcfg.freeze:
        stop = stop | mx.all(frozen, axis=-1)
    finished = state.done | stop if adaptive else state.done
    kept = accepted | frozen
    return FastState(canvas, argmax, frozen, kept, ent, history, finished, sc)


def _draw(
    raw: mx.array, t: mx.array, key: mx.array, fcfg: FastConfig, softcapping: float
) -> tuple[mx.array, mx.array, mx.array, tuple[mx.array, ...]]:
    """The sampler's math on raw logits [B, S, V] at temperature ``t``: (sample, argmax, entropy, self-conditioning
    input), over each position's top-k logits (``fcfg.topk``) or the whole vocabulary."""
    cap = partial(_softcap, cap=softcapping)
    if not fcfg.topk:
        processed = cap(raw) / t
        logprobs = log_softmax(processed)
        sample = mx.random.categorical(logprobs, axis=-1, key=key).astype(mx.int32)
        return sample, mx.argmax(processed, axis=-1), entropy_from_logprobs(logprobs), (processed,)
    k = min(fcfg.topk, raw.shape[-1])
    ids = mx.argpartition(-raw, kth=k - 1, axis=-1)[..., :k]
    processed = cap(mx.take_along_axis(raw, ids, axis=-1)) / t
    logprobs = log_softmax(processed)
    draw = mx.random.categorical(logprobs, axis=-1, key=key)
    sample = mx.take_along_axis(ids, draw[..., None], axis=-1).squeeze(-1).astype(mx.int32)
    top = mx.take_along_axis(ids, mx.argmax(processed, axis=-1)[..., None], axis=-1).squeeze(-1)
    new_sc = (processed, ids.astype(mx.int32)) if fcfg.sparse_sc else (cap(raw) / t,)
    return sample, top, entropy_from_logprobs(logprobs), new_sc


def _freeze(
    state: FastState,
    accepted: mx.array,
    argmax: mx.array,
    canvas: mx.array,
    ent: mx.array,
    fcfg: FastConfig,
    eos: tuple[int, ...],
) -> tuple[mx.array, mx.array, mx.array]:
    """(frozen, canvas, entropy) after freezing this step's sure, echoed, accepted tokens and an EOS's tail."""
    frozen = state.frozen
    if fcfg.freeze:
        # Frozen: accepted again with the model's argmax equal to the token it was given, whose keys/values
        # (computed this pass) are then the ones a sparse pass keeps seeing. The token must be one the sampler
        # accepted (``kept``), or a held draft's with ``freeze_drafts``: with the long demo's first, 75%-accurate
        # drafter, freezing drafted tokens the target echoed cost fast + drafter 35 points of exact match; with the
        # accurate one, drafting at confidence 0.9, it cost none and cut 13% of the positions (the README).
        newly = accepted & state.kept & (state.canvas == argmax) & (ent < fcfg.freeze_entropy)
        frozen = frozen | newly
        canvas = mx.where(frozen, mx.where(newly, argmax, state.canvas), canvas)
    if fcfg.eos_cut:
        hit = (frozen & is_one_of(argmax, eos)).astype(mx.int32)
        tail = (mx.cumsum(hit, axis=-1) - hit) > 0
        # The tail keeps its argmax (changing it would fail the stability test; the commit pads it anyway).
        frozen = frozen | tail
        ent = mx.where(tail, 0.0, ent)
    return frozen, canvas, ent


# ----------------------------------------------------------------------------------------------------------
# Fast mode's stepper of the canvas loop


@dataclass
class FastDenoiser:
    """Fast mode's stepper for the canvas loop (``decoding.canvas``): ``loop.generate_tokens(..., denoiser=...)``.

    One per generation: it counts the decoder positions it computed and (with ``FastConfig.check``) records
    each committed canvas's exact-argmax agreement. ``compiled``: compile the step (``None``: on GPUs).
    """

    config: FastConfig = field(default_factory=FastConfig)
    eos_ids: Sequence[int] = ()
    compiled: bool | None = None
    positions: int = 0  # decoder positions computed (summed over batch rows and passes)
    passes: int = 0
    exact: list[float] = field(default_factory=list)  # per committed canvas (and row), with config.check
    sizes: dict[int, int] = field(default_factory=dict)  # passes run at each decoder input size
    _steps: dict[Any, Callable[..., FastState]] = field(default_factory=dict, repr=False)

    def step_fn(self, model: Model, cfg: SamplerConfig, adaptive: bool) -> Callable[..., FastState]:
        key = (id(model), cfg, adaptive)
        if key not in self._steps:
            eos = tuple(self.eos_ids or _as_list(model.args.eos_token_id))
            fn = partial(
                fast_step,
                cfg=cfg,
                fcfg=self.config,
                softcapping=model.args.final_logit_softcapping,
                eos=eos,
                adaptive=adaptive,
            )
            compiled = mx.default_device() == mx.gpu if self.compiled is None else self.compiled
            self._steps[key] = mx.compile(fn) if compiled else fn
        return self._steps[key]

    def start(self, model: Model, cache: DiffusionCache, start: Start) -> Row:
        """The row before its first pass; a held draft's starting tokens count as accepted with ``freeze_drafts``."""
        fcfg, (B, C, V) = self.config, start.shape
        k = min(fcfg.topk, V)
        sc = (
            (mx.zeros((B, C, k)), mx.zeros((B, C, k), dtype=mx.int32))
            if fcfg.sparse_sc
            else (mx.zeros((B, C, V)),)
        )
        row = first_row(start, sc, start.kept if fcfg.freeze_drafts else None)
        return replace(row, stale=StaleKV(C) if fcfg.sparse else None)

    def step(
        self, model: Model, cache: DiffusionCache, row: Row, key: mx.array
    ) -> Generator[Pass, None, Row]:
        """One pass over the live positions (all of them on a first or refresh pass), then the fast step."""
        fcfg, s = self.config, row.state
        positions = self._positions(row)
        tokens = mx.take_along_axis(s.canvas, positions, axis=1)
        soft = self._first_soft(row, positions) if row.first else self._soft(model, s.sc, positions)
        request = Pass(
            tokens,
            cache,
            soft=soft,
            positions=positions if fcfg.sparse else None,
            stale=row.stale if fcfg.sparse else None,
            capped=False,
        )
        yield request
        raw = request.result
        assert raw is not None  # the driver sets it before resuming
        passes = row.passes + (~s.done).astype(mx.int32)
        step = self.step_fn(model, row.cfg, row.start.adaptive)
        state = step(raw, positions, s, mx.array(row.step, dtype=mx.int32), key)
        size = positions.shape[1]
        self.passes += 1
        self.sizes[size] = self.sizes.get(size, 0) + 1
        self.positions += size * s.canvas.shape[0]  # the pass computes every row, finished ones too
        return replace(row, state=state, passes=passes, last=(raw, positions))

    def finish(self, model: Model, cache: DiffusionCache, row: Row) -> None:
        if self.config.check:
            eos = self.eos_ids or _as_list(model.args.eos_token_id)
            self.exact.extend(
                cast("list[float]", exact_agreement(model, cache, row.state.argmax, eos).tolist())
            )

    def _positions(self, row: Row) -> mx.array:
        """The canvas positions [B, S] this pass computes: every one, or the live ones first (in canvas order)
        padded with frozen ones up to the smallest bucket that holds them."""
        fcfg, frozen, N = self.config, row.state.frozen, row.cfg.max_denoising_steps
        B, C = frozen.shape
        refresh = fcfg.refresh and (N - row.step) % fcfg.refresh == 0
        if not fcfg.sparse:
            return mx.broadcast_to(mx.arange(C, dtype=mx.int32), (B, C))
        size = C if row.first or refresh else next(s for s in fcfg.sizes(C) if s >= row.live)
        order = mx.argsort(frozen.astype(mx.int32) * C + mx.arange(C), axis=-1)
        return order[:, :size].astype(mx.int32)

    @staticmethod
    def _first_soft(row: Row, positions: mx.array) -> mx.array | None:
        """A draft's soft embedding at ``positions``, or None (the reference's first pass: no signal)."""
        soft = row.start.soft
        return None if soft is None else mx.take_along_axis(soft, positions[..., None], axis=1)

    @staticmethod
    def _soft(model: Model, sc: tuple[mx.array, ...], positions: mx.array) -> mx.array:
        def pick(a: mx.array) -> mx.array:
            idx = positions.reshape(*positions.shape, 1)
            return mx.take_along_axis(a, idx, axis=1)

        if len(sc) == 2:
            return sparse_soft(model, pick(sc[0]), pick(sc[1]))
        return dense_soft(model, pick(sc[0]))


def _as_list(ids: int | Sequence[int] | None) -> list[int]:
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def exact_agreement(
    model: Model, cache: DiffusionCache, tokens: mx.array, eos_ids: Sequence[int] = ()
) -> mx.array:
    """Per row, the fraction of a committed canvas ``tokens`` [B, C] that one exact decoder pass reproduces.

    The pass reads the committed canvas self-conditioned on itself (the one-hot soft embedding a converged
    canvas approaches) against ``cache`` as it was when the canvas was denoised; its argmax is compared with
    the committed tokens at the positions the answer keeps (up to and including the first of ``eos_ids``; the
    rest become pad). 1.0: the kept canvas is a fixed point of the exact model.
    """
    tokens = tokens.astype(mx.int32)
    raw = model.denoise(tokens, cache, soft=model.model.decoder.embed(tokens), capped=False)
    same = (mx.argmax(raw, axis=-1) == tokens).astype(mx.float32)
    hit = is_one_of(tokens, eos_ids).astype(mx.int32)
    kept = ((mx.cumsum(hit, axis=-1) - hit) == 0).astype(mx.float32)
    return (same * kept).sum(axis=-1) / kept.sum(axis=-1)
