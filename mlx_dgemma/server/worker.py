"""The one thread that runs MLX: a FIFO queue of generation jobs, stop sequences, and the prompt cache.

MLX is not safe for concurrent evaluation from several threads, so every model call happens on the worker
thread; the HTTP side only validates, tokenizes and queues. A job reports through ``emit`` (called on the
worker thread) and is cancelled through a flag that the worker reads between denoising steps.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..cache import DiffusionCache, FullKVCache, WindowKVCache
from ..drafter import make_proposer
from ..errors import DGemmaError
from ..generation import Commit, Done, Draft, stream_generate
from ..loader import load
from ..loop import prefill
from ..model import Model
from .protocol import APIError, Plan

log = logging.getLogger("mlx_dgemma.server")


# Events a job emits, in order: zero or more Delta/DraftText, then one Finished or Failed.
@dataclass
class Delta:
    """New answer text (committed, and past any stop sequence that could still be forming)."""

    text: str


@dataclass
class DraftText:
    """The canvas being denoised after one step (the ``include_drafts`` extension): a preview, not final."""

    text: str
    canvas: int
    step: int


@dataclass
class Finished:
    finish_reason: str  # "stop" (end of turn or a stop sequence) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the previous request's cache
    stats: dict[str, Any]


@dataclass
class Failed:
    error: APIError


Event = Delta | DraftText | Finished | Failed


@dataclass
class Job:
    plan: Plan
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the worker to drop this job: before it starts, or at its next denoising step."""
        self.cancelled.set()


class Busy(Exception):
    """Raised by ``submit`` when ``max_concurrency`` requests are already queued or running."""


class StopScanner:
    """Finds stop sequences in text that arrives in pieces, holding back a tail that could start one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.sent = "", 0
        self.stop_end: int | None = None  # where the matched stop sequence ends in ``text``

    def feed(self, new: str) -> str:
        """Add text; return what can be sent now. After a match, ``stop_end`` is set and nothing more comes."""
        start = max(self.sent, len(self.text) - self.hold)
        self.text += new
        hits = [(i, i + len(s)) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            begin, self.stop_end = min(hits)
            return self._send(begin)
        return self._send(len(self.text) - self.hold)

    def flush(self) -> str:
        """Everything not yet sent (at the end of the answer); nothing after a stop sequence."""
        return "" if self.stop_end is not None else self._send(len(self.text))

    def _send(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out


def tokens_through(tokenizer: Any, tokens: list[int], chars: int) -> int:
    """The fewest leading ``tokens`` whose text is at least ``chars`` long (binary search on decode)."""
    lo, hi = 0, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(tokens[:mid]).rstrip("\ufffd")) >= chars:
            hi = mid
        else:
            lo = mid + 1
    return lo


def copy_cache(cache: DiffusionCache) -> DiffusionCache:
    """A cache that shares no mutable object with ``cache``.

    MLX arrays are immutable, but mlx-lm's ``KVCache`` writes into its pre-allocated buffer by slice
    assignment, which rebinds the array *object* it holds: a shallow copy would see later writes. Fresh
    layer objects holding fresh slices are enough (no data is copied).
    """
    layers: list[FullKVCache | WindowKVCache] = []
    for c in cache:
        if isinstance(c, WindowKVCache):
            new_w = WindowKVCache(c.window)
            new_w.keys, new_w.values, new_w.offset = c.keys, c.values, c.offset
            layers.append(new_w)
        else:
            new_f = FullKVCache()
            if c.keys is not None:
                new_f.keys, new_f.values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
            new_f.offset = c.offset
            layers.append(new_f)
    out = DiffusionCache(layers)
    out.valid, out.capture, out.features = cache.valid, cache.capture, list(cache.features)
    mx.eval(out.state_arrays())
    return out


Entry = tuple[list[int], DiffusionCache]  # token ids, and a cache holding exactly them


class PromptCache:
    """Encoder caches of the previous request, reused when a new prompt extends what one of them holds.

    A request leaves: the conversation before its generation prompt (the next turn extends that, whatever
    the template does with the answer), the whole prompt (a repeated prompt), the prompt plus any canvases
    encoded after it (when the template renders the answer back to the generated tokens), and the earlier
    caches its prompt extended. Caches are only extended, never trimmed (sliding-window layers cannot
    be), and a cache handed out is a copy, so the kept ones stay intact.
    """

    MAX_ENTRIES = 4

    def __init__(self, model: Model, enabled: bool = True):
        self.model, self.enabled = model, enabled
        self.entries: list[Entry] = []
        self.reused_tokens = 0  # total, for /health

    def take(self, ids: list[int]) -> tuple[DiffusionCache, list[Entry]]:
        """A cache holding the longest kept prefix of ``ids`` (its ``offset`` says how long; else an empty
        cache), and the kept entries that are prefixes of ``ids``, still valid for this conversation."""
        matches = sorted((e for e in self.entries if len(e[0]) <= len(ids) and ids[: len(e[0])] == e[0]),
                         key=lambda e: len(e[0]))
        if not matches:
            return self.model.make_cache(), []
        held, cache = matches[-1]
        self.reused_tokens += len(held)
        return copy_cache(cache), matches

    def keep(self, entries: list[Entry]) -> None:
        """Replace the kept caches (the longest ``MAX_ENTRIES`` of ``entries``)."""
        entries = sorted((e for e in entries if e[0]), key=lambda e: len(e[0]))
        self.entries = entries[-self.MAX_ENTRIES :] if self.enabled else []


class Worker:
    """Loads the model and serves jobs one at a time, first in first out, on its own thread.

    Everything MLX happens on that thread, loading included: MLX binds lazy arrays to the stream of the
    thread that made them, so a model loaded elsewhere could not be evaluated here.
    """

    def __init__(self, model: str | Path | None, max_concurrency: int = 16, prompt_cache: bool = True,
                 adapter_path: str | Path | None = None, drafter: str | Path | None = "auto"):
        self.max_concurrency, self._use_prompt_cache = max_concurrency, prompt_cache
        self.proposer: Any = None  # the drafter serving every request (mlx_dgemma.drafter), or None
        self.model: Model  # these three are set on the worker thread, before start() returns
        self.tokenizer: Any
        self.prompt_cache: PromptCache
        self.counters = {"served": 0, "cancelled": 0, "failed": 0}
        self.running: Job | None = None
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._active = 0  # queued + running
        self._ready = threading.Event()
        self._stopping = False
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(model, adapter_path, drafter),
                                        name="mlx_dgemma-worker", daemon=True)

    def start(self) -> None:
        """Start the thread and wait until it has loaded the model; re-raise a loading error here."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self, timeout: float = 10) -> None:
        """Stop the running job at its next step, answer the queued ones 503, and end the thread."""
        self._stopping = True
        if self.running is not None:
            self.running.cancel()
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def active(self) -> int:
        return self._active

    def submit(self, plan: Plan, emit: Callable[[Event], None]) -> Job:
        """Queue a job; raise ``Busy`` when ``max_concurrency`` jobs are already queued or running."""
        with self._lock:
            if self._active >= self.max_concurrency:
                raise Busy(f"the server is busy: {self._active} requests are queued or running "
                           f"(--max-concurrency {self.max_concurrency}); retry shortly")
            self._active += 1
        job = Job(plan, emit)
        self._queue.put(job)
        return job

    def _main(self, model: str | Path | None, adapter_path: str | Path | None, drafter: str | Path | None) -> None:
        try:
            self.model, self.tokenizer = load(model, adapter_path=adapter_path)
            self.prompt_cache = PromptCache(self.model, self._use_prompt_cache)
            self.proposer = make_proposer(drafter, self.model)
        except BaseException as e:
            self._load_error = e
            return
        finally:
            self._ready.set()
        self._run()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            self.running = job
            try:
                if self._stopping:
                    job.emit(Failed(APIError(503, "the server is shutting down", type_="server_error")))
                elif job.cancelled.is_set():
                    self.counters["cancelled"] += 1
                else:
                    self._serve(job)
            except DGemmaError as e:  # validated before queueing, so unexpected; still the client's
                self.counters["failed"] += 1
                job.emit(Failed(APIError(400, str(e))))
            except Exception as e:  # one bad request must never take the worker down
                log.exception("generation failed")
                self.counters["failed"] += 1
                job.emit(Failed(APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error")))
            finally:
                self.running = None
                with self._lock:
                    self._active -= 1

    def _serve(self, job: Job) -> None:
        ids = job.plan.prompt_ids
        cache, kept, cached = self._prefill(ids, job.plan.cache_points)
        answer = _Answer(job, self.tokenizer, len(ids), cached)
        events = stream_generate(self.model, self.tokenizer, None, job.plan.max_tokens, prompt_ids=ids, cache=cache,
                                 seed=job.plan.seed, drafts=True, drafter=self.proposer or "none",
                                 response_format=job.plan.response_format,
                                 **job.plan.sampler)
        finished = False
        try:
            for event in events:
                if job.cancelled.is_set():  # between two denoising steps
                    self.counters["cancelled"] += 1
                    return
                if answer.on(event):
                    finished = True
                    break
            self.counters["served"] += 1
        finally:
            events.close()
            # After an error the live cache may be half-written: keep only the prompt's copies then.
            encoded = (ids + answer.tokens)[: cache.offset]
            self.prompt_cache.keep([*kept, (encoded, cache)] if finished and len(encoded) > len(ids) else kept)

    def _prefill(self, ids: list[int], points: tuple[int, ...]) -> tuple[DiffusionCache, list[Entry], int]:
        """A cache holding ``ids``, the entries to keep (those reused, and a copy at each of ``points`` and at
        the end of the prompt), and how many tokens came from the prompt cache."""
        cache, kept = self.prompt_cache.take(ids)
        cached = cache.offset
        if cached == 0:
            cache.capture = getattr(self.proposer, "capture", ())  # the drafter reads these layers' features
        self.prompt_cache.keep([])  # until this request has made its own
        for point in sorted({p for p in [*points, len(ids)] if p > cache.offset}):
            prefill(self.model, mx.array([ids[cache.offset : point]], dtype=mx.int32), cache)
            kept.append((ids[:point], copy_cache(cache)))
        return cache, kept, cached


class _Answer:
    """Turns the library's events for one job into the job's events: drafts, text, and the finish."""

    def __init__(self, job: Job, tokenizer: Any, prompt_tokens: int, cached: int):
        self.job, self.tokenizer, self.prompt_tokens, self.cached = job, tokenizer, prompt_tokens, cached
        self.scanner = StopScanner(job.plan.stop)
        self.tokens: list[int] = []
        self.passes = self.canvases = 0

    def on(self, event: Draft | Commit | Done) -> bool:
        """Handle one event; True once the answer is finished."""
        if isinstance(event, Draft):
            self.passes += 1
            if self.job.plan.drafts:
                self.job.emit(DraftText(event.text, event.canvas_index, event.step))
            return False
        if isinstance(event, Commit):
            self.canvases += 1
            self.tokens += event.tokens
            self._send(self.scanner.feed(event.text))
            if self.scanner.stop_end is None:
                return False
            self._finish("stop", tokens_through(self.tokenizer, self.tokens, self.scanner.stop_end))
            return True
        self._send(self.scanner.flush())
        self._finish(event.finish_reason, event.stats.generated_tokens)
        return True

    def _send(self, text: str) -> None:
        if text:
            self.job.emit(Delta(text))

    def _finish(self, reason: str, completion_tokens: int) -> None:
        stats = {"canvases": self.canvases, "decoder_passes": self.passes,
                 "tokens_per_forward": round(completion_tokens / max(self.passes, 1), 3)}
        self.job.emit(Finished(reason, self.prompt_tokens, completion_tokens, self.cached, stats))
