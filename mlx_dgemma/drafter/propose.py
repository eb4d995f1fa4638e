"""Proposers: what guesses a canvas for the target to verify (``mlx_dgemma.decoding.verify``).

* ``DrafterProposer``: the trained drafter, reading the target's context features.
* ``LookupProposer``: training-free prompt lookup: the tokens that followed the latest earlier occurrence of the
  text just written (pays off when the answer repeats the prompt: in-line edits, code rewrites, quoting).
* ``NoiseProposer``: the null drafter (uniform noise): what a useless drafter costs, for tests and benchmarks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_dgemma.decoding.fast import sparse_soft
from mlx_dgemma.decoding.sampler import initial_canvas
from mlx_dgemma.decoding.verify import Proposal, Proposer
from mlx_dgemma.drafter.checkpoint import (
    DrafterError,
    drafting_confidence,
    load_drafter,
    load_shortlist,
    matches,
)
from mlx_dgemma.drafter.head import DraftHead, Shortlist
from mlx_dgemma.drafter.model import Drafter
from mlx_dgemma.model.cache import DiffusionCache
from mlx_dgemma.model.diffusion_gemma import Model

SOFT_TOPK = 64  # the draft distribution's support in the target's self-conditioning input (fast mode's k)
BUNDLED = "drafter"  # a model folder's own drafter lives in this subfolder (the embedded demo model has one)


class DrafterProposer:
    """Drafts each canvas with a trained drafter in ``passes`` cheap passes (each re-reads its own argmax).

    ``confidence``: draft only the positions whose drafter probability reaches it; the rest start as noise
    that the target denoises itself. A wrong draft token costs more than no draft: an unsure target can
    settle on it (measured on the long demo), so the drafter proposes what it is sure of.

    ``shortlist``: draft only these vocabulary ids (plus, by default, each request's prompt tokens): the head
    costs S/V of the full one (``mlx_dgemma.drafter.head``; ``benchmarks.drafter_head`` measures what it keeps)."""

    name = "drafter"

    def __init__(
        self, drafter: Drafter, passes: int = 1, confidence: float = 0.0, shortlist: Shortlist | None = None
    ):
        if not 0.0 <= confidence < 1.0:
            raise DrafterError(f"the draft confidence must be in [0, 1) (got {confidence!r})")
        self.drafter, self.passes, self.confidence = drafter, passes, confidence
        self.capture = tuple(drafter.args.target_layers)
        self.shortlist = shortlist
        # The shortlist's head per target embedding, built on first use; shared by the sessions' copies.
        self.heads: dict[int, DraftHead] = {}
        self.begin([])

    def begin(self, prompt_ids: list[list[int]]) -> None:
        self.context: mx.array | None = None
        self.chunks = 0
        self.prompt_ids = {t for ids in prompt_ids for t in ids}
        self.head: DraftHead | None = None  # this request's: the shortlist's (plus its prompt's tokens)

    def propose(self, model: Model, cache: DiffusionCache) -> Proposal | None:
        if cache.capture != self.capture or sum(f.shape[1] for f in cache.features) != cache.offset:
            return None  # the cache was filled without capturing this drafter's features: nothing to read
        self._read(cache)
        assert self.context is not None
        T = self.context.shape[1]
        valid = cache.valid[:, -T:] if cache.valid is not None else None
        B, C = self.context.shape[0], model.args.canvas_length
        tokens = mx.full((B, C), model.args.pad_token_id, dtype=mx.int32)
        head = self._head(model)
        for _ in range(self.passes):
            h = self.drafter(model.model.decoder.embed(tokens), self.context, valid)
            if head is None:
                logits = model.logits(h)
                tokens = mx.argmax(logits, axis=-1).astype(mx.int32)
            else:  # the shortlist's logits: its argmax index mapped back to a vocabulary id
                logits = head.logits(h)
                tokens = head.ids[mx.argmax(logits, axis=-1)]
        soft = self._soft(model, logits, head)
        if self.confidence == 0.0:
            everywhere = mx.ones(tokens.shape, dtype=mx.bool_)
            return Proposal(tokens, everywhere, guessed=everywhere, soft=soft)
        # p(argmax) = exp(max - logsumexp): two reductions, no host read (the mask stays on the device). In fp32
        # only here: the default path does not copy [C, V] logits (a 268 MB cast per proposal on the 26B model).
        logits = logits.astype(mx.float32)
        total = mx.logsumexp(logits, axis=-1)
        rest = head.log_rest(h) if head is not None else None
        if rest is not None:  # the shortlist's mass plus an estimate of the rest's (DraftHead.log_rest)
            total = mx.logaddexp(total, rest)
        sure = mx.max(logits, axis=-1) - total >= math.log(self.confidence)
        # Unsure positions start as noise; the argmax there is still the drafter's guess (the history's seed).
        return Proposal(tokens, sure, guessed=mx.ones(tokens.shape, dtype=mx.bool_), soft=soft)

    def _head(self, model: Model) -> DraftHead | None:
        """This request's shortlist head (None: the target's full head), built once per target embedding."""
        if self.shortlist is None:
            return None
        if self.head is None:
            embedding = model.model.decoder.embed_tokens
            base = self.heads.get(id(embedding))
            if base is None or base.embedding is not embedding:
                base = self.heads[id(embedding)] = DraftHead.for_model(model, self.shortlist)
            self.head = base.extended(self.prompt_ids) if self.shortlist.prompt else base
        return self.head

    def _soft(self, model: Model, logits: mx.array, head: DraftHead | None = None) -> mx.array:
        """The draft's distribution as the target's self-conditioning input: the soft embedding of its top-k
        (fast mode's sparse form: k gathered embedding rows, not a [C, V] @ [V, H] product); over a shortlist,
        its top-k mapped back to vocabulary ids."""
        k = min(SOFT_TOPK, logits.shape[-1])
        ids = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
        values = mx.take_along_axis(logits, ids, axis=-1)
        return sparse_soft(model, values, ids if head is None else head.ids[ids])

    def _read(self, cache: DiffusionCache) -> None:
        """Fuse the feature chunks encoded since the last proposal; keep the latest ``context_window``."""
        new = cache.features[self.chunks :]
        self.chunks = len(cache.features)
        if new:
            fused = self.drafter.fuse(mx.concatenate(new, axis=1))
            self.context = fused if self.context is None else mx.concatenate([self.context, fused], axis=1)
            self.context = self.context[:, -self.drafter.args.context_window :]

    def commit(self, tokens: list[list[int]]) -> None:
        pass


class LookupProposer:
    """Prompt lookup: find the longest recent n-gram (``max_ngram`` down to ``min_ngram`` tokens) that ends the
    context (prompt and answer so far) earlier in it, and propose the tokens that followed it there."""

    name = "lookup"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def begin(self, prompt_ids: list[list[int]]) -> None:
        self.context = [list(ids) for ids in prompt_ids]

    def propose(self, model: Model, cache: DiffusionCache) -> Proposal | None:
        C, pad = model.args.canvas_length, model.args.pad_token_id
        rows = [self.continuation(ids, C) for ids in self.context]
        if not any(rows):
            return None
        canvas = [row + [pad] * (C - len(row)) for row in rows]
        drafted = [[True] * len(row) + [False] * (C - len(row)) for row in rows]
        return Proposal(mx.array(canvas, dtype=mx.int32), mx.array(drafted))

    def continuation(self, ids: list[int], length: int) -> list[int]:
        """Up to ``length`` tokens that followed the latest earlier occurrence of the context's final n-gram."""
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            tail = ids[-n:]
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    return ids[start + n : start + n + length]
        return []

    def commit(self, tokens: list[list[int]]) -> None:
        for ids, new in zip(self.context, tokens):
            ids.extend(new)


class NoiseProposer:
    """The null drafter: every canvas drafted as uniform noise. The target's guard rejects it; what is committed
    is what the target commits without a drafter, at one extra pass per canvas until the session turns it off."""

    name = "noise"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def begin(self, prompt_ids: list[list[int]]) -> None:
        self.key = mx.random.key(self.seed)

    def propose(self, model: Model, cache: DiffusionCache) -> Proposal | None:
        self.key, key = mx.random.split(self.key)
        B, C = cache[0].keys.shape[0], model.args.canvas_length
        canvas = initial_canvas(key, B, C, model.args.vocab_size)
        return Proposal(canvas, mx.ones(canvas.shape, dtype=mx.bool_))

    def commit(self, tokens: list[list[int]]) -> None:
        pass


def bundled_drafter(model: Model) -> Path | None:
    """The drafter shipped in the model's own folder, if there is one trained for this model."""
    source = getattr(model, "source", None)
    folder = Path(source) / BUNDLED if source is not None else None
    if folder is None or not folder.is_dir():
        return None
    try:
        if matches(folder, model):
            return folder
        problem = "was trained for another target"
    except DrafterError as e:
        problem = f"cannot be read ({e})"
    # Not silent: a hand-copied drafter folder would otherwise just cost the user its passes.
    logging.getLogger(__name__).warning(
        "the drafter in %s %s: decoding without it (train one for this model with mlx_dgemma.drafter.train)",
        folder,
        problem,
    )
    return None


def make_proposer(spec: Any, model: Model) -> Proposer | None:
    """A proposer from ``--drafter``-style input: ``"auto"`` / ``None`` (the model folder's own drafter, else
    none), ``"none"``, ``"lookup"``, ``"noise"``, a drafter folder (drafting at its recorded confidence), or a
    proposer object."""
    if spec is None or spec == "auto":
        folder = bundled_drafter(model)
        return from_folder(folder, model) if folder is not None else None
    if not isinstance(spec, (str, Path)):
        return spec
    named: dict[str, Callable[[], Proposer | None]] = {
        "none": lambda: None,
        "lookup": LookupProposer,
        "noise": NoiseProposer,
    }
    if str(spec) in named:
        return named[str(spec)]()
    if not Path(spec).expanduser().is_dir():
        raise DrafterError(f"drafter not found: {spec} (give a drafter folder, or auto, none or lookup)")
    return from_folder(spec, model)


def from_folder(folder: str | Path, model: Model) -> DrafterProposer:
    """The drafter in ``folder``, drafting at the confidence its folder records, over its shortlist if it has one."""
    return DrafterProposer(
        load_drafter(folder, model),
        confidence=drafting_confidence(folder),
        shortlist=load_shortlist(folder, model),
    )
