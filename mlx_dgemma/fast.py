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
whose exact argmax is the committed token. Under a grammar or infill constraint, ``project`` projects each fast
step as ``constrain.constrained_step`` projects the reference's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import mlx.core as mx
import numpy as np

from .cache import DiffusionCache
from .constrain import Constraint
from .errors import DGemmaError
from .loop import CommitEvent, StepEvent
from .model import Model
from .sampler import (
    SamplerConfig,
    accept_mask,
    entropy_from_logprobs,
    init_history,
    initial_canvas,
    is_one_of,
    is_stable_and_confident,
    log_softmax,
    temperature,
)
from .verify import Proposal, agreeing

_FROZEN_ENTROPY = 1e9  # frozen positions sort after every live one in the acceptance rule (finite: no inf - inf)


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
        return cls(**{"topk": 0, "freeze": False, "sparse": False, "sparse_sc": False, "eos_cut": False, **on})

    def sizes(self, canvas: int) -> list[int]:
        """The decoder input sizes (shape buckets) for a canvas of ``canvas`` positions, ascending."""
        return sorted({max(1, math.ceil(b * canvas)) for b in self.buckets})


# ----------------------------------------------------------------------------------------------------------
# The decoder over some canvas positions, with the stale K/V of the others


class CanvasKV:
    """A layer's cache as the decoder sees it during a sparse pass (duck-types ``FullKVCache.fetch``).

    Holds the keys/values of every canvas position ``[B, H, C, D]`` from the last pass that computed them;
    ``fetch`` writes this pass's positions into it and returns the layer cache's keys followed by all of
    them. ``offset`` is each query token's absolute position (``model.rope_at`` reads it per token).
    """

    def __init__(self, cache: Any, store: tuple[mx.array, mx.array] | None, positions: mx.array, canvas: int):
        self.cache, self.store, self.positions, self.canvas = cache, store, positions, canvas

    @property
    def offset(self) -> mx.array:
        return self.positions + self.cache.offset

    def fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.store is None:
            B, C = keys.shape[0], self.canvas
            self.store = (mx.zeros((B, keys.shape[1], C, keys.shape[3]), keys.dtype),
                          mx.zeros((B, values.shape[1], C, values.shape[3]), values.dtype))
        idx = self.positions[:, None, :, None]
        k = mx.put_along_axis(self.store[0], mx.broadcast_to(idx, keys.shape), keys, axis=2)
        v = mx.put_along_axis(self.store[1], mx.broadcast_to(idx, values.shape), values, axis=2)
        self.store = (k, v)
        return self.cache.fetch(k, v)


def forward(
    model: Model,
    tokens: mx.array,
    cache: DiffusionCache,
    soft: mx.array | None,
    positions: mx.array | None = None,
    stores: list[tuple[mx.array, mx.array] | None] | None = None,
    canvas: int | None = None,
) -> tuple[mx.array, list[tuple[mx.array, mx.array]] | None]:
    """Raw float32 logits (before soft-capping) of the decoder over ``tokens`` [B, S].

    ``soft`` is the self-conditioning soft embedding [B, S, H] (``None``: none, as on a first step). Without
    ``positions`` the tokens are the whole canvas, as in ``Model.denoise``. With ``positions`` [B, S] (their
    canvas positions) and ``stores`` (one per layer, ``None`` before the first pass) the other ``canvas``
    positions are seen through their stored keys/values; the updated stores are returned.
    """
    decoder = model.model.decoder
    B = tokens.shape[0]
    C = canvas or tokens.shape[1]
    h = decoder.self_conditioning(decoder.embed(tokens), soft)
    masks = {kind: model._decoder_mask(cache, kind, B, C) for kind in ("sliding", "full")}
    views = None
    if positions is not None:
        views = [CanvasKV(c, s, positions, C) for c, s in zip(cache, stores or [None] * len(cache))]
    for i, layer in enumerate(decoder.layers):
        mask = masks["sliding" if layer.self_attn.is_sliding else "full"]
        h = layer(h, views[i] if views else cache[i], mask, write=False, layer_scalar=layer.layer_scalar)
    raw = decoder.embed_tokens.as_linear(decoder.norm(h)).astype(mx.float32)
    return raw, [v.store for v in views] if views else None


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


def softcap(model: Model, raw: mx.array) -> mx.array:
    """The final soft-cap, as ``Model.logits`` applies it (monotonic: the top-k of capped = capped top-k)."""
    cap = model.args.final_logit_softcapping
    return mx.tanh(raw / cap) * cap


# ----------------------------------------------------------------------------------------------------------
# One fast sampler step (pure on arrays, compilable: one trace per bucket size)


class FastState(NamedTuple):
    """A canvas being denoised in fast mode; every array spans the whole canvas [B, C]."""

    canvas: mx.array  # int32: the decoder's input tokens
    argmax: mx.array  # int32: what would be committed now
    frozen: mx.array  # bool
    kept: mx.array  # bool: the input token is one the sampler accepted (or a held draft's: freeze_drafts)
    entropy: mx.array  # float32: each position's last entropy
    history: mx.array  # int32 [S, B, C]: argmax history of the stopping test
    done: mx.array  # bool [B]
    sc: tuple[mx.array, ...]  # self-conditioning input: (top-k values, top-k ids) [B, C, k], or (logits [B, C, V],)


class StepResult(NamedTuple):
    state: FastState
    active: mx.array  # int32 scalar: most positions any unfinished row still has to denoise


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
) -> StepResult:
    """One step on the decoder's raw logits ``raw`` [B, S, V] for canvas ``positions`` [B, S].

    With every technique off (``FastConfig.off()``) and all positions given, this is the reference's
    ``sampler.denoise_step`` op for op (same keys, same draws).
    """
    sample_key, noise_key = mx.random.split(key)
    B, C = state.canvas.shape
    vocab = raw.shape[-1]
    t = temperature(step, cfg)

    def cap(x: mx.array) -> mx.array:
        return mx.tanh(x / softcapping) * softcapping

    if fcfg.topk:
        k = min(fcfg.topk, vocab)
        ids = mx.argpartition(-raw, kth=k - 1, axis=-1)[..., :k]
        processed = cap(mx.take_along_axis(raw, ids, axis=-1)) / t
        logprobs = log_softmax(processed)
        draw = mx.random.categorical(logprobs, axis=-1, key=sample_key)
        sample = mx.take_along_axis(ids, draw[..., None], axis=-1).squeeze(-1).astype(mx.int32)
        top = mx.take_along_axis(ids, mx.argmax(processed, axis=-1)[..., None], axis=-1).squeeze(-1)
        new_sc = (processed, ids.astype(mx.int32)) if fcfg.sparse_sc else (cap(raw) / t,)
    else:
        processed = cap(raw) / t
        logprobs = log_softmax(processed)
        sample = mx.random.categorical(logprobs, axis=-1, key=sample_key).astype(mx.int32)
        top = mx.argmax(processed, axis=-1)
        new_sc = (processed,)
    ent = entropy_from_logprobs(logprobs)

    def scatter(full: mx.array, part: mx.array) -> mx.array:
        idx = positions.reshape(*positions.shape, *([1] * (part.ndim - 2)))
        return mx.put_along_axis(full, mx.broadcast_to(idx, part.shape), part.astype(full.dtype), axis=1)

    frozen = state.frozen
    ent = mx.where(frozen, state.entropy, scatter(state.entropy, ent))
    argmax = mx.where(frozen, state.argmax, scatter(state.argmax, top.astype(mx.int32)))
    sample = scatter(state.canvas, sample)
    ranked = mx.where(frozen, _FROZEN_ENTROPY, ent) if fcfg.freeze else ent
    accepted = accept_mask(ranked, cfg.entropy_bound) & ~frozen
    noise = initial_canvas(noise_key, B, C, vocab)
    canvas = mx.where(accepted, sample, noise)
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

    done = state.done[:, None]
    canvas = mx.where(done, state.canvas, canvas)
    argmax = mx.where(done, state.argmax, argmax)
    sc = tuple(mx.where(done[..., None], old, scatter(old, new)) for old, new in zip(state.sc, new_sc))
    stop, history = is_stable_and_confident(argmax, state.history, ent, cfg)
    if fcfg.freeze:
        stop = stop | mx.all(frozen, axis=-1)
    finished = state.done | stop if adaptive else state.done
    kept = accepted | frozen
    return StepResult(FastState(canvas, argmax, frozen, kept, ent, history, finished, sc), live(frozen, finished))


def live(frozen: mx.array, done: mx.array) -> mx.array:
    """The most positions any unfinished row still has to denoise (int32 scalar): the next pass's size."""
    return mx.max(mx.sum((~frozen & ~done[:, None]).astype(mx.int32), axis=-1))


def project(state: FastState, raw: mx.array, positions: mx.array, constraint: Constraint, offset: int) -> FastState:
    """A fast step's argmax projected onto ``constraint`` (batch of one row), as ``constrain.constrained_step``
    projects the reference's.

    A position's logits row is this pass's when the pass computed it, else its last processed logits kept for
    self-conditioning (top-k: a token outside them ranks below all of them). Every position the projection
    changes, and every held position whose canvas token differs, is written into the canvas and unfrozen, so the
    next sparse pass recomputes it and the model denoises the rest around it.
    """
    argmax, canvas = np.asarray(state.argmax[0]), np.asarray(state.canvas[0])
    computed = {int(p): j for j, p in enumerate(np.asarray(positions[0]).tolist())}

    def row(i: int) -> np.ndarray:
        if i in computed:
            return np.asarray(raw[0, computed[i]], dtype=np.float32)
        if len(state.sc) == 1:
            return np.asarray(state.sc[0][0, i], dtype=np.float32)
        full = np.full(raw.shape[-1], -1e30, dtype=np.float32)  # finite: an allowed token still ranks
        full[np.asarray(state.sc[1][0, i])] = np.asarray(state.sc[0][0, i], dtype=np.float32)
        return full

    projected = constraint.project(offset, argmax, row).astype(np.int32)
    write = projected != argmax
    for i in constraint.fixed(offset, len(projected)):
        write[i] |= canvas[i] != projected[i]
    if not write.any():
        return state
    changed, tokens = mx.array(write)[None], mx.array(projected)[None]
    return state._replace(argmax=tokens, canvas=mx.where(changed, tokens, state.canvas),
                          frozen=state.frozen & ~changed, kept=state.kept & ~changed)


# ----------------------------------------------------------------------------------------------------------
# The canvas loop (same signature and events as loop.denoise_canvas)


@dataclass
class FastDenoiser:
    """``loop.denoise_canvas`` in fast mode, for ``loop.generate_tokens(..., denoiser=...)``.

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
    _steps: dict[Any, Callable[..., StepResult]] = field(default_factory=dict, repr=False)

    def step_fn(self, model: Model, cfg: SamplerConfig, adaptive: bool) -> Callable[..., StepResult]:
        key = (id(model), cfg, adaptive)
        if key not in self._steps:
            eos = tuple(self.eos_ids or _as_list(model.args.eos_token_id))
            fn = partial(fast_step, cfg=cfg, fcfg=self.config, softcapping=model.args.final_logit_softcapping,
                         eos=eos, adaptive=adaptive)
            compiled = mx.default_device() == mx.gpu if self.compiled is None else self.compiled
            self._steps[key] = mx.compile(fn) if compiled else fn
        return self._steps[key]

    def __call__(
        self,
        model: Model,
        cache: DiffusionCache,
        cfg: SamplerConfig,
        key: mx.array,
        canvas_index: int = 0,
        start: mx.array | None = None,
        adaptive_stopping: bool = True,
        step_fn: Any = None,  # the reference's sampler step: not used here
        history: mx.array | None = None,
        constraint: Constraint | None = None,
        offset: int = 0,
        blind: Proposal | None = None,
        hold: Proposal | None = None,
    ) -> Iterator[StepEvent | CommitEvent]:
        """As ``loop.denoise_canvas`` (``blind`` and ``hold`` too: a held token joins only a live position); with
        ``constraint`` (its canvas at answer position ``offset``) every step's argmax is projected onto it
        (``project``: one more host read a step, as in the reference's loop)."""
        fcfg = self.config
        B, C, V = cache[0].keys.shape[0], model.args.canvas_length, model.args.vocab_size
        init_key, key = mx.random.split(key)
        canvas = (start if start is not None else initial_canvas(init_key, B, C, V)).astype(mx.int32)
        k = min(fcfg.topk, V)
        sc = ((mx.zeros((B, C, k)), mx.zeros((B, C, k), dtype=mx.int32)) if fcfg.sparse_sc
              else (mx.zeros((B, C, V)),))
        kept = mx.zeros((B, C), dtype=mx.bool_)
        if fcfg.freeze_drafts and hold is not None and start is not None:
            kept = hold.drafted & (canvas == hold.canvas)  # a held draft's tokens the first pass reads
        state = FastState(canvas, canvas, mx.zeros((B, C), dtype=mx.bool_), kept,
                          mx.zeros((B, C)),
                          history if history is not None else init_history(cfg, B, C),
                          mx.zeros((B,), dtype=mx.bool_), sc)
        sizes, step = fcfg.sizes(C), self.step_fn(model, cfg, adaptive_stopping)
        stores: list | None = None
        passes = mx.zeros((B,), dtype=mx.int32)
        active, first = C, True
        for n in range(cfg.max_denoising_steps, 0, -1):
            key, step_key = mx.random.split(key)
            full = not fcfg.sparse or first or (fcfg.refresh and (cfg.max_denoising_steps - n) % fcfg.refresh == 0)
            size = C if full else next(s for s in sizes if s >= active)
            if fcfg.sparse:
                # Live positions first, in canvas order; the bucket's remaining slots are frozen ones.
                order = mx.argsort(state.frozen.astype(mx.int32) * C + mx.arange(C), axis=-1)
                positions = order[:, :size].astype(mx.int32)
            else:
                positions = mx.broadcast_to(mx.arange(C, dtype=mx.int32), (B, C))
            tokens = mx.take_along_axis(state.canvas, positions, axis=1)
            soft = None if first else self._soft(model, state.sc, positions)
            if fcfg.sparse:
                raw, stores = forward(model, tokens, cache, soft, positions, stores, C)
            else:
                raw, _ = forward(model, tokens, cache, soft)
            passes = passes + (~state.done).astype(mx.int32)
            result = step(raw, positions, state, mx.array(n, dtype=mx.int32), step_key)
            state, live_now = result.state, result.active
            mx.eval(state, passes, live_now, *(stores or []))
            if constraint is not None:
                state = project(state, raw, positions, constraint, offset)  # the one more host read
                live_now = live(state.frozen, state.done)
            if blind is not None and first:
                state = state._replace(canvas=agreeing(state.argmax, state.canvas, blind))
            if hold is not None:
                held = agreeing(state.argmax, state.canvas, hold)
                state = state._replace(canvas=mx.where(state.frozen, state.canvas, held))
            self.passes += 1
            self.sizes[size] = self.sizes.get(size, 0) + 1
            self.positions += size * B  # the pass computes every row, finished ones too
            yield StepEvent(canvas_index, n, state.argmax, state.done)
            first = False
            finished, active = (state.done.all().astype(mx.int32), live_now)
            finished, active = mx.stack([finished, active]).tolist()  # the one host round-trip per step
            if adaptive_stopping and finished:
                break
        if fcfg.check:
            eos = self.eos_ids or _as_list(model.args.eos_token_id)
            self.exact.extend(exact_agreement(model, cache, state.argmax, eos).tolist())
        yield CommitEvent(canvas_index, state.argmax, state.done, passes)

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


def exact_agreement(model: Model, cache: DiffusionCache, tokens: mx.array, eos_ids: Sequence[int] = ()) -> mx.array:
    """Per row, the fraction of a committed canvas ``tokens`` [B, C] that one exact decoder pass reproduces.

    The pass reads the committed canvas self-conditioned on itself (the one-hot soft embedding a converged
    canvas approaches) against ``cache`` as it was when the canvas was denoised; its argmax is compared with
    the committed tokens at the positions the answer keeps (up to and including the first of ``eos_ids``; the
    rest become pad). 1.0: the kept canvas is a fixed point of the exact model.
    """
    tokens = tokens.astype(mx.int32)
    raw, _ = forward(model, tokens, cache, model.model.decoder.embed(tokens))
    same = (mx.argmax(raw, axis=-1) == tokens).astype(mx.float32)
    hit = is_one_of(tokens, eos_ids).astype(mx.int32)
    kept = ((mx.cumsum(hit, axis=-1) - hit) == 0).astype(mx.float32)
    return (same * kept).sum(axis=-1) / kept.sum(axis=-1)
