"""Continuous batching: several requests decoded together, one decoder pass for all of them at a time.

Each request runs as its own generator of the canvas loop (``generation.run_steps``): its own cache, prompt
length, step, sampler settings, seed, drafter proposal, grammar, infill and fast-mode state. A ``Batch`` drives
them: every ``step`` advances each request to its next decoder ``Pass`` (collecting the events it emits on the
way: previews, commits, the final ``Done``), then runs all the waiting passes as one ``Model.denoise_rows`` call.
Requests join between steps (a long prompt is encoded one chunk per step, so the others wait at most a chunk)
and leave when they finish or are cancelled. A request's answer is the one it gets alone: every number it
depends on is its own (``Model.denoise_rows`` attends each request to its own cache at its own positions; only
the weights are shared).

``batch_generate`` and ``stream_batch_generate`` are the API, in mlx-lm's shape.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlx_dgemma.decoding.canvas import Pass, Pause, Steps
from mlx_dgemma.errors import GenerationError
from mlx_dgemma.generation import Commit, Done, Preview, run_steps
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.request import GenerationRequest, Prompt, prepare

Event = Preview | Commit | Done


@dataclass(eq=False)  # compared by identity
class _Row:
    id: int
    steps: Steps
    pass_: Pass | None = None  # the decoder pass it waits for


@dataclass
class Batch:
    """Requests decoded together (see the module docstring). ``add`` a prepared request, call ``step`` until
    ``len(batch) == 0``; each step returns the events of that step as ``(request id, event)`` pairs.

    ``passes`` counts the decoder passes run and ``rows`` the requests they carried (``rows / passes``: the mean
    batch size)."""

    model: Model
    tokenizer: Any
    passes: int = 0
    rows: int = 0
    _rows: list[_Row] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=itertools.count)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, request_id: int) -> bool:
        return any(r.id == request_id for r in self._rows)

    def add(self, request: GenerationRequest) -> int:
        """Start decoding ``request`` from the next step; returns its id."""
        return self.join(run_steps(self.model, self.tokenizer, request))

    def join(self, steps: Steps) -> int:
        """Start driving any generator of the canvas loop (``run_steps`` with work before it: the server's
        prompt cache) from the next step; returns its id."""
        row = _Row(next(self._ids), steps)
        self._rows.append(row)
        return row.id

    def cancel(self, request_id: int) -> None:
        """Stop a request now (between two steps): it emits nothing more."""
        for row in self._rows:
            if row.id == request_id:
                row.steps.close()
        self._rows = [r for r in self._rows if r.id != request_id]

    def step(self) -> Iterator[tuple[int, Event | Exception]]:
        """Advance every request to its next decoder pass, yielding its events as they come (so that each is
        sent on before the request goes on), then run the waiting passes as one. A request that fails leaves
        the batch with its exception as its last event; the others go on. Consume it whole: the pass runs last.
        """
        for row in list(self._rows):
            if row.pass_ is None:
                yield from self._advance(row)
        waiting = [(r, r.pass_) for r in self._rows if r.pass_ is not None]
        if waiting:
            logits = self.model.denoise_rows([p for _, p in waiting])
            self.passes, self.rows = self.passes + 1, self.rows + len(waiting)
            for (row, pass_), out in zip(waiting, logits):
                pass_.result, row.pass_ = out, None

    def _advance(self, row: _Row) -> Iterator[tuple[int, Event | Exception]]:
        """Run one request until it asks for a pass, pauses, ends or is cancelled, yielding its events."""
        while row in self._rows:
            try:
                item = next(row.steps)
            except StopIteration:
                self._rows.remove(row)
                return
            except Exception as e:
                self._rows.remove(row)
                yield row.id, e
                return
            if isinstance(item, Pass):
                row.pass_ = item
                return
            if isinstance(item, Pause):
                return
            yield row.id, item


@dataclass
class BatchStats:
    """Figures of a whole ``batch_generate`` call (each answer's own are in ``BatchResponse.responses``)."""

    prompt_tokens: int
    generation_tokens: int
    generation_tps: float  # committed tokens of every answer per second of the whole call
    decoder_passes: int  # batched passes run
    mean_batch: float  # requests a pass carried, on average
    peak_memory_gb: float


@dataclass
class BatchResponse:
    """``batch_generate``'s result, as mlx-lm's: ``texts`` in the order of the prompts, ``stats``, each answer's
    final ``Done`` (its statistics) in ``responses``, its token ids in ``tokens``, and with
    ``return_prompt_caches=True`` each request's cache (holding its prompt and answer) in ``caches``."""

    texts: list[str]
    stats: BatchStats
    responses: list[Done]
    tokens: list[list[int]]
    caches: list[Any] | None = None


def stream_batch_generate(
    model: Model, tokenizer: Any, prompts: Sequence[Prompt], max_tokens: int | None = None, **options: Any
) -> Iterator[tuple[int, Event]]:
    """Generate answers to several prompts together, yielding ``(prompt index, event)`` as they come (each
    prompt's events are those ``stream_generate`` yields for it alone). ``options`` are ``stream_generate``'s and
    apply to every prompt; with a ``seed``, each answer is the one ``generate`` gives with that seed."""
    yield from _drive(Batch(model, tokenizer), _requests(model, tokenizer, prompts, max_tokens, options))


def batch_generate(
    model: Model,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_tokens: int | None = None,
    verbose: bool = False,
    return_prompt_caches: bool = False,
    **options: Any,
) -> BatchResponse:
    """Generate answers to several prompts in one batch (mlx-lm's ``batch_generate``): the texts, in order, and
    statistics. ``options`` are ``stream_generate``'s, for every prompt. ``verbose`` prints the figures;
    ``return_prompt_caches`` returns each request's cache, ready for its next turn (mlx-lm's ``prompt_cache=``)."""
    requests = _requests(model, tokenizer, prompts, max_tokens, options, return_prompt_caches)
    start = time.perf_counter()
    mx.reset_peak_memory()
    texts: list[str] = [""] * len(requests)
    tokens: list[list[int]] = [[] for _ in requests]
    responses: list[Done | None] = [None] * len(requests)
    batch = Batch(model, tokenizer)
    for i, event in _drive(batch, requests):
        texts[i] += event.text
        if isinstance(event, Commit):
            tokens[i] += event.tokens
        elif isinstance(event, Done):
            responses[i] = event
    elapsed = time.perf_counter() - start
    done = [d for d in responses if d is not None]
    generated = sum(d.stats.generated_tokens for d in done)
    stats = BatchStats(
        prompt_tokens=sum(d.prompt_tokens for d in done),
        generation_tokens=generated,
        generation_tps=generated / max(elapsed, 1e-9),
        decoder_passes=batch.passes,
        mean_batch=batch.rows / max(batch.passes, 1),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )
    if verbose:
        print(
            f"Batch: {len(requests)} prompts, {generated} tokens, {stats.generation_tps:.3f} tokens-per-sec, "
            f"{stats.decoder_passes} decoder passes ({stats.mean_batch:.2f} requests each)"
        )
        print(f"Peak memory: {stats.peak_memory_gb:.3f} GB")
    caches = [r.cache for r in requests] if return_prompt_caches else None
    return BatchResponse(texts, stats, done, tokens, caches)


def _requests(
    model: Model,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_tokens: int | None,
    options: dict[str, Any],
    caches: bool = False,
) -> list[GenerationRequest]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise GenerationError(
            "prompts must be a non-empty list of prompts: for one prompt use stream_generate"
        )
    for name in ("cache", "prompt_cache", "prompt_ids"):
        if options.get(name) is not None:
            raise GenerationError(f"{name} is one request's: give each prompt's ids in prompts instead")
    if caches:  # each its own, left holding the prompt and the answer (as mlx-lm's prompt_cache= is)
        return [
            prepare(model, tokenizer, p, max_tokens, prompt_cache=model.make_cache(), **options)
            for p in prompts
        ]
    return [prepare(model, tokenizer, p, max_tokens, **options) for p in prompts]


def _drive(batch: Batch, requests: list[GenerationRequest]) -> Iterator[tuple[int, Event]]:
    """Every request in one batch until all are done: ``(index of the request, event)``."""
    index = {batch.add(r): i for i, r in enumerate(requests)}
    try:
        while len(batch):
            for request_id, event in batch.step():
                if isinstance(event, Exception):
                    raise event
                yield index[request_id], event
    finally:  # the caller stopped early: close what still runs
        for request_id in list(index):
            batch.cancel(request_id)
