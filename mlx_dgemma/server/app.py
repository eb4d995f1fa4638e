"""The FastAPI app: routes, OpenAI response and chunk shapes, server-sent events, errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import DGemmaError
from ..model import Model
from .protocol import APIError, Kind, Plan, parse, plan
from .worker import Busy, Delta, DraftText, Event, Failed, Finished, Job, Worker

POLL_S = 0.25  # how often a non-streaming request checks whether its client is still there


def model_names(model: str | Path | None) -> tuple[str, frozenset[str]]:
    """The served id for a ``--model`` argument, and the names accepted for it."""
    if model is None:
        return "default", frozenset({"default"})
    path = Path(model).expanduser()
    served = path.name if path.is_dir() else str(model).rstrip("/")
    return served, frozenset({"default", str(model), served})


@dataclass
class Served:
    """What the app serves: one model, under one id (plus aliases), with a context length."""

    model: Model
    tokenizer: Any
    model_id: str
    context_length: int
    aliases: frozenset[str] = frozenset()
    created: int = 0

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_id and name not in self.aliases:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.model_id!r}",
                           "model", code="model_not_found")

    def card(self) -> dict[str, Any]:
        """The ``/v1/models`` entry: the context length in the fields that clients read."""
        n = self.context_length
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "mlx_dgemma",
                "context_length": n, "max_model_len": n, "max_context_length": n,
                "native_context_length": self.model.args.max_position_embeddings,
                "canvas_length": self.model.args.canvas_length}


def create_app(model: str | Path | None = None, *, context_length: int | None = None, max_concurrency: int = 16,
               prompt_cache: bool = True, adapter_path: str | Path | None = None,
               drafter: str | Path | None = "auto") -> FastAPI:
    """An app serving ``model`` (a folder or hub id; ``None``: the embedded default model).

    The model is loaded here, on the worker thread (loading errors are raised here). The worker stops with
    the app (ASGI lifespan). Raises ``DGemmaError`` for a bad ``context_length`` or ``max_concurrency``.
    """
    if max_concurrency < 1:
        raise DGemmaError(f"max_concurrency must be at least 1 (got {max_concurrency})")
    worker = Worker(model, max_concurrency, prompt_cache, adapter_path, drafter)
    worker.start()
    native, canvas = worker.model.args.max_position_embeddings, worker.model.args.canvas_length
    context = context_length or native
    if not canvas < context <= native:
        worker.stop()
        raise DGemmaError(f"the context length must be between {canvas + 1} (a prompt token plus one canvas) "
                          f"and the model's native window {native} (got {context})")
    model_id, aliases = model_names(model)
    served = Served(worker.model, worker.tokenizer, model_id, context, aliases, int(time.time()))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()

    app = FastAPI(title="mlx_dgemma", lifespan=lifespan)
    app.state.served, app.state.worker = served, worker
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        running = worker.running is not None
        return {"status": "ok", "model": served.model_id, "running": int(running),
                "queued": max(worker.active - int(running), 0), "max_concurrency": worker.max_concurrency,
                **worker.counters, "prompt_cache_reused_tokens": worker.prompt_cache.reused_tokens}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served.card()]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        served.check_model(name)
        return served.card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _complete("chat", request, served, worker)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete("completion", request, served, worker)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, APIError)
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def http_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, HTTPException)
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    async def server_error(_: Request, e: Exception) -> JSONResponse:
        body = APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").body()
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)


async def _complete(kind: Kind, request: Request, served: Served, worker: Worker) -> Any:
    """Validate, queue, and answer one request (a JSON body, or a stream of server-sent events)."""
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    req = parse(kind, data)
    served.check_model(req.model)
    # In a thread: image URLs are fetched and images processed while planning.
    job_plan = await asyncio.to_thread(plan, kind, req, served.tokenizer, served.model, served.context_length)
    events: asyncio.Queue[Event] = asyncio.Queue()
    try:
        job = worker.submit(job_plan, _emitter(events))
    except Busy as e:
        raise APIError(429, str(e), type_="rate_limit_error", code="server_busy") from None
    meta = _Meta(kind, served.model_id)
    if job_plan.stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_sse(job, events, meta), media_type="text/event-stream", headers=headers)
    return await _collect(job, events, meta, request)


def _emitter(events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """A thread-safe ``emit`` for the worker: hands events to this request's event loop."""
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(events.put_nowait, event)

    return emit


@dataclass
class _Meta:
    """The fields every response and chunk of one request shares."""

    kind: Kind
    model: str

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

    def head(self, stream: bool) -> dict[str, Any]:
        obj = {"chat": "chat.completion.chunk" if stream else "chat.completion"}.get(self.kind, "text_completion")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def choice(self, text: str | None, finish_reason: str | None, stream: bool, first: bool = False) -> dict:
        if self.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if not stream:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _usage(done: Finished) -> dict[str, Any]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


async def _collect(job: Job, events: asyncio.Queue[Event], meta: _Meta, request: Request) -> dict[str, Any]:
    """The non-streaming answer; cancels the job if the client goes away while waiting."""
    parts: list[str] = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    return {}
                continue
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Finished):
                return {**meta.head(stream=False), "choices": [meta.choice("".join(parts), event.finish_reason, False)],
                        "usage": _usage(event), "diffusion": event.stats}
    finally:
        job.cancel()  # a no-op once the job is done


async def _sse(job: Job, events: asyncio.Queue[Event], meta: _Meta) -> AsyncIterator[str]:
    """Server-sent events: a chunk per committed canvas (and per draft if asked), then usage and ``[DONE]``.

    Starlette cancels this generator when the client disconnects; ``finally`` then cancels the job, which
    the worker notices at its next denoising step.
    """
    plan: Plan = job.plan
    try:
        if meta.kind == "chat":
            yield _data({**meta.head(True), "choices": [meta.choice("", None, True, first=True)]})
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _data({**meta.head(True), "choices": [meta.choice(event.text, None, True)]})
            elif isinstance(event, DraftText):
                draft = {"text": event.text, "canvas": event.canvas, "step": event.step}
                yield _data({**meta.head(True), "choices": [], "draft": draft})
            elif isinstance(event, Failed):
                yield _data(event.error.body())
                break
            elif isinstance(event, Finished):
                last = meta.choice(None, event.finish_reason, True)
                yield _data({**meta.head(True), "choices": [last], "diffusion": event.stats})
                if plan.include_usage:
                    yield _data({**meta.head(True), "choices": [], "usage": _usage(event)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
