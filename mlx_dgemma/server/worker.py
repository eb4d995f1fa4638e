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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_dgemma.decoding.block_loop import prefill
from mlx_dgemma.drafter import make_proposer
from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.generation import Commit, Done, Preview, run
from mlx_dgemma.model.cache import DiffusionCache, FullKVCache, WindowKVCache
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.model.loader import load
from mlx_dgemma.prompt import multimodal
from mlx_dgemma.runtime.distributed import is_leader
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
        matches = sorted(
            (e for e in self.entries if len(e[0]) <= len(ids) and ids[: len(e[0])] == e[0]),
            key=lambda e: len(e[0]),
        )
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

    def __init__(
        self,
        model: str | Path | None,
        max_concurrency: int = 16,
        prompt_cache: bool = True,
        adapter_path: str | Path | None = None,
        drafter: str | Path | None = "auto",
        request_timeout: float | None = None,
        fast: bool = False,
    ):
        self.max_concurrency, self._use_prompt_cache = max_concurrency, prompt_cache
        self.request_timeout = request_timeout  # seconds of generation per request; None: no limit
        self.fast = fast  # fast decoding for requests that do not say (mlx_dgemma.decoding.fast)
        self.proposer: Any = None  # the drafter serving every request (mlx_dgemma.drafter), or None
        self.model: Model  # these three are set on the worker thread, before start() returns
        self.tokenizer: Any
        self.prompt_cache: PromptCache
        self.counters = {"served": 0, "cancelled": 0, "failed": 0}
        self.running: Job | None = None
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
        job = self.running
        if job is not None:
            job.cancel(_SHUTTING_DOWN)

    def stop(self, timeout: float = 10) -> None:
        """``shutdown``, then end the thread (waiting at most ``timeout`` seconds)."""
        self.shutdown()
        self._queue.put(None)
        self._thread.join(timeout)

    def join(self) -> None:
        """Wait until the worker thread ends (on a follower rank: until rank 0 stops serving)."""
        self._thread.join()

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker that still hold a slot (cancelled ones do not)."""
        running = self.running
        with self._lock:
            return len(self._slots - {running})

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
        while (job := self._queue.get()) is not None:
            self.running = job
            try:
                if self._stopping:
                    self._answer(job, Failed(_SHUTTING_DOWN))
                elif job.cancelled.is_set():
                    self._cancelled(job)
                else:
                    announce(job.plan)  # to the other ranks, when split over several (follow.py)
                    self._serve(job)
            except DGemmaError as e:  # validated before queueing, so unexpected; still the client's
                self.counters["failed"] += 1
                self._answer(job, Failed(APIError(400, str(e))))
            except Exception as e:  # one bad request must never take the worker down
                log.exception("generation failed")
                self.counters["failed"] += 1
                self._answer(
                    job,
                    Failed(
                        APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error")
                    ),
                )
            finally:
                self.running = None
                job.release()
        announce(None)

    def _cancelled(self, job: Job) -> None:
        self.counters["cancelled"] += 1
        if job.reason is not None:  # stopped by the server: the client is still there, tell it why
            self._answer(job, Failed(job.reason))

    def _serve(self, job: Job) -> None:
        ids, images = job.plan.prompt_ids, job.plan.image_prompt
        keys = images.cache_key() if images is not None else ids  # cached images match by content
        cache, kept, cached = self._prefill(ids, job.plan.cache_points, images, keys)
        answer = _Answer(job, self.tokenizer, len(ids), cached)
        deadline = None if self.request_timeout is None else _clock() + self.request_timeout
        request = job.plan.request or request_of(
            job.plan, self.model, self.tokenizer, self.proposer, self.fast
        )
        events = run(self.model, self.tokenizer, replace(request, cache=cache))
        finished = False
        try:
            for event in events:
                if cancelled(job):  # between two denoising steps (on several ranks, rank 0's flag)
                    self._cancelled(job)
                    return
                if deadline is not None and _clock() > deadline:
                    answer.cut(
                        f"the answer was cut after --request-timeout {self.request_timeout:g} s: "
                        "ask for fewer max_tokens or max_denoising_steps"
                    )
                    break
                if answer.on(event):
                    finished = True
                    break
            self.counters["served"] += 1
        finally:
            events.close()
            # After an error the live cache may be half-written: keep only the prompt's copies then.
            encoded = (keys + answer.tokens)[: cache.offset]
            self.prompt_cache.keep(
                [*kept, (encoded, cache)] if finished and len(encoded) > len(ids) else kept
            )

    def _prefill(
        self, ids: list[int], points: tuple[int, ...], images: Any = None, keys: list[int] | None = None
    ) -> tuple[DiffusionCache, list[Entry], int]:
        """A cache holding ``ids``, the entries to keep (those reused, and a copy at each of ``points`` and at
        the end of the prompt), and how many tokens came from the prompt cache. ``keys``: what the prompt
        cache matches (``ids`` with each image's tokens keyed by its content)."""
        keys = ids if keys is None else keys
        cache, kept = self.prompt_cache.take(keys)
        cached = cache.offset
        if cached == 0:
            cache.capture = getattr(self.proposer, "capture", ())  # the drafter reads these layers' features
        self.prompt_cache.keep([])  # until this request has made its own
        for point in sorted({p for p in [*points, len(ids)] if p > cache.offset}):
            if images is not None:
                multimodal.prefill(self.model, images, cache, point)
            else:
                prefill(self.model, mx.array([ids[cache.offset : point]], dtype=mx.int32), cache)
            kept.append((keys[:point], copy_cache(cache)))
        return cache, kept, cached


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
