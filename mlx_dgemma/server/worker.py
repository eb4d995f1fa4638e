"""The one thread that runs MLX: a FIFO queue of generation jobs, stop sequences, and the prompt cache.

MLX is not safe for concurrent evaluation from several threads, so every model call happens on the worker
thread; the HTTP side only validates, tokenizes and queues. A job reports through ``emit`` (called on the
worker thread) and is cancelled through a flag that the worker reads between denoising steps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_dgemma.batching import Batch
from mlx_dgemma.decoding.block_loop import prefill_steps
from mlx_dgemma.decoding.canvas import Steps, solo
from mlx_dgemma.drafter import make_proposer
from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.generation import Commit, Done, Preview, run_steps
from mlx_dgemma.model.cache import DiffusionCache, copy_cache
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.model.loader import load
from mlx_dgemma.prompt import multimodal
from mlx_dgemma.runtime.distributed import is_leader, launched_group
from mlx_dgemma.server.follow import announce, cancelled, follow
from mlx_dgemma.server.protocol import APIError, Plan, request_of

log = logging.getLogger("mlx_dgemma.server")
_clock = time.monotonic  # the request timeout's clock (a test replaces it)


# Events a job emits, in order: zero or more Delta/CanvasPreview, then one Finished or Failed.
@dataclass
class Delta:
    """New answer text (committed, and past any stop sequence that could still be forming)."""

    text: str


@dataclass
class CanvasPreview:
    """The canvas being denoised after one step (the ``include_previews`` extension): not final."""

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
    error: dict[str, Any] | None = None  # why the answer was cut short (the request timeout), OpenAI's shape
    stop_sequence: str | None = None  # the stop sequence that ended the answer, if one did


@dataclass
class Failed:
    error: APIError


Event = Delta | CanvasPreview | Finished | Failed


@dataclass(eq=False)  # compared and hashed by identity: the worker keeps a set of the jobs holding a slot
class Job:
    plan: Plan
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    reason: APIError | None = None  # why the server (not the client) stopped it: answered to the client
    on_release: Callable[[Job], None] | None = None  # frees the job's concurrency slot (idempotent)

    def cancel(self, reason: APIError | None = None) -> None:
        """Ask the worker to drop this job: before it starts, or at its next denoising step. Its slot is
        freed now: a client that left (or is being answered ``reason``) no longer waits for anything."""
        if reason is not None and self.reason is None:
            self.reason = reason
        self.cancelled.set()
        self.release()

    def release(self) -> None:
        if self.on_release is not None:
            self.on_release(self)


_SHUTTING_DOWN = APIError(
    503,
    "the server is shutting down: retry on another server or later",
    type_="server_error",
    code="shutting_down",
)


class Busy(Exception):
    """Raised by ``submit`` when ``max_concurrency`` requests are already queued or running."""


class StopScanner:
    """Finds stop sequences in text that arrives in pieces, holding back a tail that could start one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text, self.sent = "", 0
        self.stop_end: int | None = None  # where the matched stop sequence ends in ``text``
        self.matched: str | None = None  # the stop sequence matched

    def feed(self, new: str) -> str:
        """Add text; return what can be sent now. After a match, ``stop_end`` is set and nothing more comes."""
        start = max(self.sent, len(self.text) - self.hold)
        self.text += new
        hits = [(i, i + len(s)) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if hits:
            begin, self.stop_end = min(hits)
            self.matched = self.text[begin : self.stop_end]
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


Entry = tuple[list[int], DiffusionCache]  # token ids, and a cache holding exactly them


class PromptCache:
    """Encoder caches of the previous request, reused when a new prompt extends what one of them holds.

    A request leaves: the conversation before its generation prompt (the next turn extends that, whatever
    the template does with the answer), the whole prompt (a repeated prompt), the prompt plus any canvases
    encoded after it (when the template renders the answer back to the generated tokens), and the earlier
    caches its prompt extended. Caches are only extended, never trimmed (sliding-window layers cannot
    be), and a cache handed out is a copy, so the kept ones stay intact.
    """

    MAX_ENTRIES = 8  # over every conversation: a request leaves up to four of its own

    def __init__(self, model: Model, enabled: bool = True):
        self.model, self.enabled = model, enabled
        self.entries: list[Entry] = []
        self.reused_tokens = 0  # total, for /health

    def take(self, ids: list[int]) -> tuple[DiffusionCache, list[Entry]]:
        """A cache holding the longest kept prefix of ``ids`` (its ``offset`` says how long; else an empty
        cache), and the kept entries that are prefixes of ``ids``, still valid for this conversation."""
        matches = sorted(
            (e for e in self.entries if len(e[0]) <= len(ids) and ids[: len(e[0])] == e[0]),
            key=lambda e: len(e[0]),
        )
        if not matches:
            return self.model.make_cache(), []
        held, cache = matches[-1]
        self.reused_tokens += len(held)
        return copy_cache(cache), matches

    def keep(self, entries: list[Entry], keys: list[int] | None = None) -> None:
        """Keep a request's caches (``entries``: those its prompt ``keys`` reused, and those it made) as the most
        recent, after the other conversations' ones; at most ``MAX_ENTRIES``, the oldest dropped first."""
        if not self.enabled:
            self.entries = []
            return
        new = sorted((e for e in entries if e[0]), key=lambda e: len(e[0]))
        held = {tuple(e[0]) for e in new}

        def superseded(ids: list[int]) -> bool:  # one of this conversation's, not kept by the request
            return keys is not None and len(ids) <= len(keys) and keys[: len(ids)] == ids

        others = [e for e in self.entries if tuple(e[0]) not in held and not superseded(e[0])]
        self.entries = (others + new)[-self.MAX_ENTRIES :]


class Worker:
    """Loads the model and serves jobs one at a time, first in first out, on its own thread.

    Everything MLX happens on that thread, loading included: MLX binds lazy arrays to the stream of the
    thread that made them, so a model loaded elsewhere could not be evaluated here.
    """

    def __init__(
        self,
        model: str | Path | None,
        max_concurrency: int = 16,
        prompt_cache: bool = True,
        adapter_path: str | Path | None = None,
        drafter: str | Path | None = "auto",
        request_timeout: float | None = None,
        fast: bool = False,
        decode_concurrency: int = 8,
        prompt_concurrency: int = 4,
    ):
        self.max_concurrency, self._use_prompt_cache = max_concurrency, prompt_cache
        # Requests decoded together in one batch (mlx_dgemma.batching), and how many may join it per step (each
        # encodes its prompt then, one chunk a step); mlx-lm's names. One at a time on several ranks (follow.py).
        self.decode_concurrency, self.prompt_concurrency = decode_concurrency, prompt_concurrency
        self.request_timeout = request_timeout  # seconds of generation per request; None: no limit
        self.fast = fast  # fast decoding for requests that do not say (mlx_dgemma.decoding.fast)
        self.proposer: Any = None  # the drafter serving every request (mlx_dgemma.drafter), or None
        self.model: Model  # these three are set on the worker thread, before start() returns
        self.tokenizer: Any
        self.prompt_cache: PromptCache
        self.counters = {"served": 0, "cancelled": 0, "failed": 0}
        self.running: set[Job] = set()  # the jobs being decoded
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.RLock()  # reentrant: shutdown() may run in a signal handler on the loop thread
        self._active = 0  # queued + running, less those cancelled or already answered
        self._slots: set[Job] = set()  # the jobs holding a slot
        self._ready = threading.Event()
        self._stopping = False
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, args=(model, adapter_path, drafter), name="mlx_dgemma-worker", daemon=True
        )

    def start(self) -> None:
        """Start the thread and wait until it has loaded the model; re-raise a loading error here."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            # Let the thread end before the error ends the process: an interpreter exiting while the thread
            # still tears down its MLX state can abort (SIGABRT, exit code 134).
            self._thread.join()
            raise self._load_error

    def shutdown(self) -> None:
        """Begin stopping (safe from a signal handler): the running job ends at its next denoising step and
        is answered 503, as is every queued one."""
        self._stopping = True
        for job in list(self.running):
            job.cancel(_SHUTTING_DOWN)

    def stop(self, timeout: float = 10) -> None:
        """``shutdown``, then end the thread (waiting at most ``timeout`` seconds)."""
        self.shutdown()
        self._queue.put(None)
        self._thread.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the worker thread ends (on a follower rank: until rank 0 stops serving)."""
        self._thread.join(timeout)

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker that still hold a slot (cancelled ones do not)."""
        running = set(self.running)
        with self._lock:
            return len(self._slots - running)

    def submit(self, plan: Plan, emit: Callable[[Event], None]) -> Job:
        """Queue a job; raise ``Busy`` when ``max_concurrency`` jobs are already queued or running."""
        with self._lock:
            if self._active >= self.max_concurrency:
                raise Busy(
                    f"the server is busy: {self._active} requests are queued or running "
                    f"(--max-concurrency {self.max_concurrency}); retry shortly"
                )
            self._active += 1
            job = Job(plan, emit, on_release=self._free)
            self._slots.add(job)
        self._queue.put(job)
        return job

    def _free(self, job: Job) -> None:
        with self._lock:
            if job in self._slots:
                self._slots.discard(job)
                self._active -= 1

    def _answer(self, job: Job, event: Event) -> None:
        """The job's last event, sent after its slot is freed: a client that sends its next request as soon
        as it has this answer must find the slot free (else a spurious 429)."""
        job.release()
        job.emit(event)

    def _main(
        self, model: str | Path | None, adapter_path: str | Path | None, drafter: str | Path | None
    ) -> None:
        try:
            self._serve_all(model, adapter_path, drafter)
        finally:
            # MLX gives each thread that evaluates its own streams; left alive, their threads are destroyed
            # joinable when the process exits, and C++ aborts it (SIGABRT, exit code 134) even after a clean
            # "error:" line. This CPU hit it in 5 runs of 6 of a bad --adapter-path.
            mx.clear_streams()

    def _serve_all(
        self, model: str | Path | None, adapter_path: str | Path | None, drafter: str | Path | None
    ) -> None:
        try:
            self.model, self.tokenizer = load(model, adapter_path=adapter_path)
            self.prompt_cache = PromptCache(self.model, self._use_prompt_cache)
            self.proposer = make_proposer(drafter, self.model)
        except BaseException as e:
            self._load_error = e
            return
        finally:
            self._ready.set()
        if is_leader():
            self._run()
        else:  # split over several ranks: this one serves rank 0's requests (follow.py)
            follow(self)

    def _run(self) -> None:
        """Serve the queue: up to ``decode_concurrency`` jobs decoded together, joining and leaving between steps.
        On several ranks, one job at a time (every rank must run the same passes: ``follow.py``)."""
        if launched_group() is not None:
            if self.decode_concurrency > 1:
                log.warning(
                    "split over several ranks, requests are decoded one at a time: --decode-concurrency "
                    "batches requests in a single process only, for now"
                )
            self._run_one_at_a_time()
            return
        batch = Batch(self.model, self.tokenizer)
        live: dict[int, _Live] = {}
        while self._admit(batch, live):
            self._check(batch, live)
            try:
                for row_id, event in batch.step():
                    self._route(batch, live, row_id, event)
            except Exception as e:  # the batched pass itself failed: every job in it fails
                for row_id in list(live):
                    batch.cancel(row_id)
                    self._fail(live.pop(row_id), e)
                continue
            for row_id in [r for r in live if r not in batch]:  # ended without a final event
                self._close(live.pop(row_id), None)
        announce(None)

    def _route(self, batch: Batch, live: dict[int, _Live], row_id: int, event: Any) -> None:
        """One event of the batch to its job; a job that finished (or failed) leaves the batch."""
        item = live.get(row_id)
        if item is not None and (isinstance(event, Exception) or item.on(event)):
            del live[row_id]
            batch.cancel(row_id)
            self._close(item, event)

    def _admit(self, batch: Batch, live: dict[int, _Live]) -> bool:
        """Take queued jobs into the batch (waiting for one when none runs); False once told to stop."""
        joined = 0
        while len(live) < self.decode_concurrency and joined < self.prompt_concurrency:
            try:
                job = self._queue.get(block=not live)
            except queue.Empty:
                return True
            if job is None:
                for row_id in list(live):  # stopping: what still runs was cancelled by shutdown()
                    batch.cancel(row_id)
                    item = live.pop(row_id)
                    self._cancelled(item.job)
                    self._close(item, None, served=False)
                return False
            if self._stopping:
                self._answer(job, Failed(_SHUTTING_DOWN))
            elif job.cancelled.is_set():
                self._cancelled(job)
            else:
                item = _Live(self, job)
                live[batch.join(item.steps())] = item
                self.running.add(job)
                joined += 1
        return True

    def _check(self, batch: Batch, live: dict[int, _Live]) -> None:
        """Between two steps: drop the cancelled jobs, cut the ones past the request timeout."""
        for row_id, item in list(live.items()):
            try:
                if item.job.cancelled.is_set():
                    batch.cancel(row_id)
                    del live[row_id]
                    self._cancelled(item.job)
                    self._close(item, None, served=False)
                elif item.timed_out():
                    batch.cancel(row_id)
                    del live[row_id]
                    item.cut()
                    self._close(item, None)
            except Exception as e:  # one job's failure must never take the worker (and the others) down
                batch.cancel(row_id)
                live.pop(row_id, None)
                self._close(item, e)

    def _close(self, item: _Live, event: Any, served: bool = True) -> None:
        """A job left the batch: count it, keep its prompt caches, free its place."""
        self.running.discard(item.job)
        if isinstance(event, Exception):
            self._fail(item, event)
        elif served:
            self.counters["served"] += 1
        item.keep_caches()
        item.job.release()

    def _fail(self, item: _Live, error: BaseException) -> None:
        self.running.discard(item.job)
        self.counters["failed"] += 1
        if isinstance(error, DGemmaError):  # validated before queueing, so unexpected; still the client's
            self._answer(item.job, Failed(APIError(400, str(error))))
            return
        log.error("generation failed", exc_info=error)
        message = f"generation failed: {type(error).__name__}: {error}"
        self._answer(item.job, Failed(APIError(500, message, type_="server_error")))

    def _run_one_at_a_time(self) -> None:
        while (job := self._queue.get()) is not None:
            self.running = {job}
            try:
                if self._stopping:
                    self._answer(job, Failed(_SHUTTING_DOWN))
                elif job.cancelled.is_set():
                    self._cancelled(job)
                else:
                    announce(job.plan)  # to the other ranks, when split over several (follow.py)
                    self._serve(job)
            except Exception as e:  # one bad request must never take the worker down
                self._fail(_Live.failed(job), e)
            finally:
                self.running = set()
                job.release()
        announce(None)

    def _prefill(
        self, ids: list[int], points: tuple[int, ...], images: Any, keys: list[int]
    ) -> Generator[Any, Any, tuple[DiffusionCache, list[Entry], int]]:
        """Encode a prompt (a generator of the canvas loop: a ``PAUSE`` after each chunk). Returns a cache holding
        ``ids``, the entries to keep (those reused, and a copy at each of ``points`` and at the end of the
        prompt), and how many tokens came from the prompt cache. ``keys``: what the prompt cache matches (``ids``
        with each image's tokens keyed by its content)."""
        cache, kept = self.prompt_cache.take(keys)
        cached = cache.offset
        if cached == 0:
            cache.capture = getattr(self.proposer, "capture", ())  # the drafter reads these layers' features
        for point in sorted({p for p in [*points, len(ids)] if p > cache.offset}):
            if images is not None:
                multimodal.prefill(self.model, images, cache, point)
            else:
                yield from prefill_steps(
                    self.model, mx.array([ids[cache.offset : point]], dtype=mx.int32), cache
                )
            kept.append((keys[:point], copy_cache(cache)))
        return cache, kept, cached

    def _cancelled(self, job: Job) -> None:
        self.counters["cancelled"] += 1
        if job.reason is not None:  # stopped by the server: the client is still there, tell it why
            self._answer(job, Failed(job.reason))

    def _serve(self, job: Job) -> None:
        """One job alone (on several ranks, every rank runs this for the same plan)."""
        item = _Live(self, job)
        events = solo(self.model, item.steps())
        finished = False
        try:
            for event in events:
                if cancelled(job):  # between two denoising steps (on several ranks, rank 0's flag)
                    self._cancelled(job)
                    return
                if item.timed_out():
                    item.cut()
                    break
                if item.on(event):
                    finished = True
                    break
            self.counters["served"] += 1
        finally:
            events.close()
            item.keep_caches(finished)


class _Live:
    """A job being decoded: its prompt's encoding (reusing the prompt cache), its answer, its deadline."""

    def __init__(self, worker: Worker, job: Job):
        self.worker, self.job = worker, job
        self.deadline = None if worker.request_timeout is None else _clock() + worker.request_timeout
        self.answer: _Answer | None = None
        self.cache: DiffusionCache | None = None
        self.kept: list[Entry] = []
        self.keys: list[int] = []
        self.finished = False

    @classmethod
    def failed(cls, job: Job) -> _Live:
        """A stand-in for a job that failed before it could start."""
        item = cls.__new__(cls)
        item.job, item.cache, item.kept, item.finished = job, None, [], False
        return item

    def steps(self) -> Steps:
        """The job as a generator of the canvas loop: its prompt encoded (a chunk a step), then its answer."""
        w, plan = self.worker, self.job.plan
        ids, images = plan.prompt_ids, plan.image_prompt
        self.keys = images.cache_key() if images is not None else ids  # cached images match by content
        self.cache, self.kept, cached = yield from w._prefill(ids, plan.cache_points, images, self.keys)
        self.answer = _Answer(self.job, w.tokenizer, len(ids), cached)
        request = plan.request or request_of(plan, w.model, w.tokenizer, w.proposer, w.fast)
        yield from run_steps(w.model, w.tokenizer, replace(request, cache=self.cache))

    def on(self, event: Preview | Commit | Done) -> bool:
        """Hand one event to the answer; True once it is finished."""
        assert self.answer is not None
        self.finished = self.answer.on(event)
        return self.finished

    def timed_out(self) -> bool:
        return self.deadline is not None and self.answer is not None and _clock() > self.deadline

    def cut(self) -> None:
        assert self.answer is not None
        self.answer.cut(
            f"the answer was cut after --request-timeout {self.worker.request_timeout:g} s: "
            "ask for fewer max_tokens or max_denoising_steps"
        )

    def keep_caches(self, finished: bool | None = None) -> None:
        """Keep this job's prompt caches for the next requests. After an error the live cache may be
        half-written: only the prompt's copies are kept then."""
        finished = self.finished if finished is None else finished
        if self.cache is None:
            return
        answer = self.answer.tokens if self.answer is not None else []
        encoded = (self.keys + answer)[: self.cache.offset]
        whole = finished and len(encoded) > len(self.job.plan.prompt_ids)
        self.worker.prompt_cache.keep([*self.kept, (encoded, self.cache)] if whole else self.kept, self.keys)


class _Answer:
    """Turns the library's events for one job into the job's events: previews, text, and the finish."""

    def __init__(self, job: Job, tokenizer: Any, prompt_tokens: int, cached: int):
        self.job, self.tokenizer, self.prompt_tokens, self.cached = job, tokenizer, prompt_tokens, cached
        self.scanner = StopScanner(job.plan.stop)
        self.tokens: list[int] = []
        self.passes = self.canvases = 0

    def on(self, event: Preview | Commit | Done) -> bool:
        """Handle one event; True once the answer is finished."""
        if isinstance(event, Preview):
            self.job.emit(CanvasPreview(event.canvas_text, event.canvas_index, event.step))
            return False
        if isinstance(event, Commit):
            self.canvases += 1
            self.passes += event.decoder_passes
            self.tokens += event.tokens
            self._send(self.scanner.feed(event.text))
            if self.scanner.stop_end is None:
                return False
            self._finish(
                "stop",
                tokens_through(self.tokenizer, self.tokens, self.scanner.stop_end),
                stop_sequence=self.scanner.matched,
            )
            return True
        self._send(self.scanner.flush())
        self.canvases, self.passes = event.stats.canvases, event.stats.decoder_passes
        assert event.finish_reason is not None  # set on every Done
        self._finish(event.finish_reason, event.stats.generated_tokens)
        return True

    def cut(self, message: str) -> None:
        """End the answer early (the request timeout): what was committed so far, ``finish_reason`` "length"
        and an error saying why."""
        self._send(self.scanner.flush())
        error = {"message": message, "type": "server_error", "param": None, "code": "request_timeout"}
        self._finish("length", len(self.tokens), error)

    def _send(self, text: str) -> None:
        if text:
            self.job.emit(Delta(text))

    def _finish(
        self,
        reason: str,
        completion_tokens: int,
        error: dict[str, Any] | None = None,
        stop_sequence: str | None = None,
    ) -> None:
        stats = {
            "canvases": self.canvases,
            "decoder_passes": self.passes,
            "tokens_per_forward": round(completion_tokens / max(self.passes, 1), 3),
        }
        self.job.release()  # before the answer goes out (see Worker._answer)
        self.job.emit(
            Finished(reason, self.prompt_tokens, completion_tokens, self.cached, stats, error, stop_sequence)
        )
