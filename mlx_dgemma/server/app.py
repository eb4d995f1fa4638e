"""The FastAPI app: routes, OpenAI response and chunk shapes, server-sent events, errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.prompt import chat_template
from mlx_dgemma.server import web as chat_page
from mlx_dgemma.server.guards import HostGuard, check_json_content_type
from mlx_dgemma.server.images import ImagePolicy
from mlx_dgemma.server.output import OutputParser, Piece
from mlx_dgemma.server.protocol import (
    DEFAULT_MAX_TOKENS,
    IGNORED_HEADER,
    APIError,
    ChatRequest,
    Kind,
    Plan,
    parse,
    plan,
    read_json,
    request_of,
)
from mlx_dgemma.server.worker import Busy, CanvasPreview, Delta, Event, Failed, Finished, Job, Worker

log = logging.getLogger("mlx_dgemma.server")

POLL_S = 0.25  # how often a non-streaming request checks whether its client is still there
# The default request-body limit: the released model's 262144-token window is about 1 MB of text, doubled
# by JSON escaping and multi-turn repetition, plus tool schemas; 8 MiB leaves room for all of it while one
# request can no longer make the server read (and hold) tens of megabytes.
MAX_BODY_BYTES = 8 * 1024 * 1024


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
    proposer: Any = None  # the drafter serving every request, or None
    fast: bool = False  # fast decoding for requests that do not say

    def check_model(self, name: str | None) -> None:
        """Accept the served id, an alias, or either behind a ``publisher/`` prefix (LM Studio's ids)."""
        names = {self.model_id, *self.aliases}
        if name is not None and name not in names and name.rstrip("/").rsplit("/", 1)[-1] not in names:
            raise APIError(
                404,
                f"the model {name!r} does not exist: this server serves {self.model_id!r}",
                "model",
                code="model_not_found",
            )

    def card(self) -> dict[str, Any]:
        """The ``/v1/models`` entry: the context length in the fields that clients read."""
        n = self.context_length
        return {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "mlx_dgemma",
            "context_length": n,
            "max_model_len": n,
            "max_context_length": n,
            "native_context_length": self.model.args.max_position_embeddings,
            "canvas_length": self.model.args.canvas_length,
        }


def create_app(
    model: str | Path | None = None,
    *,
    context_length: int | None = None,
    max_concurrency: int = 16,
    prompt_cache: bool = True,
    adapter_path: str | Path | None = None,
    drafter: str | Path | None = "auto",
    max_body_bytes: int = MAX_BODY_BYTES,
    request_timeout: float | None = None,
    strict: bool = False,
    allowed_origins: list[str] | None = None,
    allowed_hosts: list[str] | None = None,
    default_temperature: float | None = None,
    fast: bool = False,
    images: ImagePolicy | None = None,
    max_tokens: int | None = None,
    chat_template_args: dict[str, Any] | None = None,
    web: bool = True,
    decode_concurrency: int = 8,
    prompt_concurrency: int = 4,
) -> FastAPI:
    """An app serving ``model`` (a folder or hub id; ``None``: the embedded default model).

    The model is loaded here, on the worker thread (loading errors are raised here). The worker stops with
    the app (ASGI lifespan). Raises ``DGemmaError`` for a bad ``context_length``, ``max_concurrency``,
    ``max_body_bytes`` or ``request_timeout``. ``strict``: autoregressive-only sampling fields (``top_p``,
    ...) are 400s instead of ignored. ``allowed_origins``: browser origins allowed by CORS (``["*"]``: any).
    ``allowed_hosts``: ``Host`` names served besides localhost, IP addresses and this machine's name (``["*"]``:
    any; see ``guards.py``).
    ``default_temperature``: the temperature of requests that set neither it nor ``t_max``/``t_min``.
    ``images``: which image URLs are fetched and the pixel budgets (default: public addresses only).
    ``max_tokens``: the answer limit of requests that set none (``None``: ``DEFAULT_MAX_TOKENS`` rounded up to
    whole canvases; 0: none, the answer may use the whole remaining context). ``chat_template_args``: default
    ``chat_template_kwargs``, under each request's own (a reserved key is a ``DGemmaError``). ``web``: serve the
    chat page at ``/`` (``server/web.py``).
    """
    check_limits(context_length, max_concurrency, max_body_bytes, request_timeout)
    check_batching(decode_concurrency, prompt_concurrency)
    check_defaults(max_tokens, chat_template_args)
    worker = Worker(
        model,
        max_concurrency,
        prompt_cache,
        adapter_path,
        drafter,
        request_timeout,
        fast,
        decode_concurrency=decode_concurrency,
        prompt_concurrency=prompt_concurrency,
    )
    worker.start()
    native, canvas = worker.model.args.max_position_embeddings, worker.model.args.canvas_length
    context = native if context_length is None else context_length
    if not canvas < context <= native:
        worker.stop()
        raise DGemmaError(
            f"the context length must be between {canvas + 1} (a prompt token plus one canvas) "
            f"and the model's native window {native} (got {context})"
        )
    if max_tokens is None:
        max_tokens = -(-DEFAULT_MAX_TOKENS // canvas) * canvas
    model_id, aliases = model_names(model)
    served = Served(
        worker.model,
        worker.tokenizer,
        model_id,
        context,
        aliases,
        int(time.time()),
        worker.proposer,
        worker.fast,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()

    app = FastAPI(title="mlx_dgemma", lifespan=lifespan)
    app.state.served, app.state.worker = served, worker
    _add_error_handlers(app)
    if allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=allowed_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=[IGNORED_HEADER],
        )
    app.add_middleware(HostGuard, allowed=allowed_hosts or ())  # added last: outermost, before CORS
    app.state.limits = limits = _Limits(
        max_body_bytes,
        strict,
        default_temperature,
        images=images or ImagePolicy(),
        max_tokens=max_tokens or None,
        template_kwargs=dict(chat_template_args or {}),
    )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": served.model_id,
            "running": len(worker.running),
            "queued": worker.queued,
            "max_concurrency": worker.max_concurrency,
            "decode_concurrency": worker.decode_concurrency,
            **worker.counters,
            "prompt_cache_reused_tokens": worker.prompt_cache.reused_tokens,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served.card()]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        served.check_model(name)
        return served.card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _complete("chat", request, served, worker, limits)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete("completion", request, served, worker, limits)

    from mlx_dgemma.server import (  # the other APIs: translated into chat requests (bridge.py)
        anthropic,
        responses,
    )

    responses.register(app)  # POST /v1/responses
    anthropic.register(app)  # POST /v1/messages
    if web:
        chat_page.mount(app)  # GET / (the chat page) and /static/

    return app


def check_limits(
    context_length: int | None, max_concurrency: int, max_body_bytes: int, request_timeout: float | None
) -> None:
    """The server's limits that can be checked before loading the model; ``DGemmaError`` names the bad one."""
    if context_length is not None and context_length < 1:
        raise DGemmaError(f"the context length must be a positive number of tokens (got {context_length})")
    if max_concurrency < 1:
        raise DGemmaError(f"max_concurrency must be at least 1 (got {max_concurrency})")
    if max_body_bytes < 1024:
        raise DGemmaError(f"max_body_bytes must be at least 1024 (got {max_body_bytes})")
    if request_timeout is not None and not request_timeout > 0:
        raise DGemmaError(f"request_timeout must be a positive number of seconds (got {request_timeout})")


def check_batching(decode_concurrency: Any, prompt_concurrency: Any) -> None:
    """``--decode-concurrency`` and ``--prompt-concurrency``: whole numbers of requests, at least 1."""
    for name, value in (
        ("decode_concurrency", decode_concurrency),
        ("prompt_concurrency", prompt_concurrency),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DGemmaError(f"{name} must be a whole number of requests, at least 1 (got {value!r})")


def check_defaults(max_tokens: int | None, chat_template_args: Any) -> None:
    """``--max-tokens`` and ``--chat-template-args``, checked before loading the model: ``DGemmaError`` in one line."""
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0
    ):
        raise DGemmaError(
            f"max_tokens must be a positive number of tokens, or 0 for no default (got {max_tokens!r})"
        )
    if chat_template_args is not None:
        if not isinstance(chat_template_args, dict):
            raise DGemmaError(
                "--chat-template-args must be a JSON object such as '{\"enable_thinking\": true}' "
                f"(got {type(chat_template_args).__name__})"
            )
        chat_template.check_kwargs(chat_template_args, "--chat-template-args", DGemmaError)


@dataclass
class _Limits:
    max_body_bytes: int
    strict: bool
    temperature: float | None = None  # the server's default (--temp)
    body_timeout_s: float = (
        60.0  # a body trickled in more slowly than this is a 408 (a slowloris on the body)
    )
    images: ImagePolicy = field(
        default_factory=ImagePolicy
    )  # image fetches (abandoned with the request), pixels
    max_tokens: int | None = (
        None  # the answer limit of requests that set none (--max-tokens); None: the context
    )
    template_kwargs: dict[str, Any] = field(
        default_factory=dict
    )  # under each request's own (--chat-template-args)


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


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be larger than ``limit`` bytes."""
    too_big = APIError(
        413,
        f"the request body is larger than {limit} bytes (the server's --max-body-bytes): shorten the prompt",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def _prepare(
    kind: Kind, body: bytes | dict[str, Any], served: Served, limits: _Limits
) -> tuple[Plan, OutputParser | None]:
    """Decode (unless ``body`` is a decoded request already: another API's, translated), validate, template and
    tokenize (CPU work, run on a thread: the event loop stays free)."""
    req = parse(kind, body if isinstance(body, dict) else read_json(body))
    served.check_model(req.model)
    if limits.temperature is not None and req.temperature is None and req.t_max is None and req.t_min is None:
        req.temperature = limits.temperature
    job_plan = plan(
        kind,
        req,
        served.tokenizer,
        served.model,
        served.context_length,
        limits.strict,
        limits.max_tokens,
        limits.template_kwargs,
    )
    job_plan.request = request_of(job_plan, served.model, served.tokenizer, served.proposer, served.fast)
    parser = None
    if isinstance(req, ChatRequest) and (job_plan.tools or job_plan.thinking):
        tail = served.tokenizer.decode(job_plan.prompt_ids[-16:])
        parser = OutputParser(
            served.tokenizer,
            thinking=job_plan.thinking,
            tools=job_plan.tools,
            prompt_tail=tail,
            tool_specs=req.tools,
        )
    return job_plan, parser


async def _complete(kind: Kind, request: Request, served: Served, worker: Worker, limits: _Limits) -> Any:
    """Validate, queue, and answer one request (a JSON body, or a stream of server-sent events)."""
    run = await submit(kind, await read_body(request, limits), request, served, worker, limits)
    if run.plan.ignored:
        log.info("ignored fields: %s", ", ".join(run.plan.ignored))
    if run.plan.stream:
        return run.stream(_sse(run))
    return JSONResponse(await _collect(run, request), headers=run.headers)


async def read_body(request: Request, limits: _Limits) -> bytes:
    """A JSON request's body under the server's content-type, size and time limits."""
    check_json_content_type(request.headers.get("content-type"))  # before the body: a page's text/plain POST
    try:
        return await asyncio.wait_for(_read_body(request, limits.max_body_bytes), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(
            408, f"the request body did not arrive within {limits.body_timeout_s:g} s", code="request_timeout"
        ) from None


async def submit(
    kind: Kind,
    body: bytes | dict[str, Any],
    request: Request,
    served: Served,
    worker: Worker,
    limits: _Limits,
    ignored: Sequence[str] = (),
) -> Run:
    """Validate and template ``body`` (raw or decoded) on a thread, under the image policy, and queue it.

    ``ignored``: another API's fields that were accepted and ignored (``bridge.py``), named in ``X-Ignored-Fields``
    before the fields the chat path ignored."""
    job_plan, parser = await limits.images.run(request, _prepare, kind, body, served, limits)
    events: asyncio.Queue[Event] = asyncio.Queue()
    try:
        job = worker.submit(job_plan, _emitter(events))
    except Busy as e:
        raise APIError(429, str(e), type_="rate_limit_error", code="server_busy") from None
    names = [*ignored, *job_plan.ignored]
    headers = {IGNORED_HEADER: ", ".join(names)} if names else {}
    return Run(job, events, _Meta(kind, served.model_id, parser), job_plan, headers)


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
    parser: OutputParser | None = None  # splits reasoning and tool calls out of chat answers

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())

    def head(self, stream: bool) -> dict[str, Any]:
        obj = {"chat": "chat.completion.chunk" if stream else "chat.completion"}.get(
            self.kind, "text_completion"
        )
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def choice(self, text: str | None, finish_reason: str | None, stream: bool, first: bool = False) -> dict:
        if self.kind == "completion":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if not stream:
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def pieces(self, text: str) -> list[Piece]:
        """Answer text as (content | reasoning) pieces, holding back what may begin a marker."""
        return self.parser.feed(text) if self.parser else [("content", text)] if text else []

    def finish(self) -> tuple[list[Piece], list[dict[str, Any]]]:
        return self.parser.finish() if self.parser else ([], [])

    def delta(self, pieces: list[Piece]) -> dict[str, Any]:
        """A streamed chat choice carrying these pieces (content and/or reasoning_content)."""
        delta: dict[str, Any] = {}
        for kind, text in pieces:
            key = "content" if kind == "content" else "reasoning_content"
            delta[key] = delta.get(key, "") + text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}


def _usage(done: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


@dataclass
class Text:
    """A piece of the answer: ``kind`` "content" or "reasoning" (the thinking channel)."""

    kind: str
    text: str


@dataclass
class End:
    """The answer is finished: how, and the tool calls parsed out of it (OpenAI chat ``tool_calls`` entries)."""

    done: Finished
    calls: list[dict[str, Any]]


@dataclass
class Collected:
    """A whole answer (non-streaming)."""

    content: str
    reasoning: str
    calls: list[dict[str, Any]]
    done: Finished


@dataclass
class Run:
    """A request queued on the worker: its job, the events the job sends, the shapes of its answer and the
    response's headers (``X-Ignored-Fields``). Every endpoint answers through it (``bridge.py`` for the others)."""

    job: Job
    events: asyncio.Queue[Event]
    meta: _Meta
    plan: Plan
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.plan.prompt_ids)

    async def answer(self, request: Request | None = None) -> AsyncIterator[Text | End]:
        """The answer as ``Text`` pieces, then one ``End``; a failure is raised (its ``APIError``).

        With ``request`` (a non-streaming answer) it polls for the client going away and then just ends. The job
        is cancelled when this ends early (a no-op once it is done).
        """
        try:
            while True:
                if request is None:
                    event = await self.events.get()
                else:
                    try:
                        event = await asyncio.wait_for(self.events.get(), POLL_S)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                if isinstance(event, Delta):
                    for kind, text in self.meta.pieces(event.text):
                        yield Text(kind, text)
                elif isinstance(event, Failed):
                    raise event.error
                elif isinstance(event, Finished):
                    rest, calls = self.meta.finish()
                    for kind, text in rest:
                        yield Text(kind, text)
                    yield End(event, calls)
                    return
        finally:
            self.job.cancel()

    async def collect(self, request: Request) -> Collected | None:
        """The whole answer; None if the client went away first."""
        content: list[str] = []
        reasoning: list[str] = []
        async for item in self.answer(request):
            if isinstance(item, Text):
                (content if item.kind == "content" else reasoning).append(item.text)
            else:
                return Collected("".join(content), "".join(reasoning), item.calls, item.done)
        return None

    def stream(self, events: AsyncIterator[str]) -> StreamingResponse:
        """``events`` (server-sent events, in any API's shape) as the streaming response, with this run's headers."""
        headers = {**self.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _collect(run: Run, request: Request) -> dict[str, Any]:
    """The non-streaming answer in OpenAI's shape; ``{}`` if the client went away first (the job is cancelled)."""
    answer = await run.collect(request)
    if answer is None:
        return {}
    meta, done = run.meta, answer.done
    choice = meta.choice(answer.content, "tool_calls" if answer.calls else done.finish_reason, False)
    if meta.kind == "chat":
        if answer.reasoning:
            choice["message"]["reasoning_content"] = answer.reasoning
        if answer.calls:
            choice["message"].update(tool_calls=answer.calls, content=answer.content.strip() or None)
    out = {**meta.head(stream=False), "choices": [choice], "usage": _usage(done), "diffusion": done.stats}
    return {**out, "error": done.error} if done.error else out


async def _sse(run: Run) -> AsyncIterator[str]:
    """Server-sent events: a chunk per committed canvas (and per step's preview if asked), then usage and ``[DONE]``.

    Starlette cancels this generator when the client disconnects; ``finally`` then cancels the job, which
    the worker notices at its next denoising step.
    """
    job, events, meta, plan = run.job, run.events, run.meta, run.plan
    try:
        if meta.kind == "chat":
            yield _data({**meta.head(True), "choices": [meta.choice("", None, True, first=True)]})
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                if meta.kind == "completion":
                    yield _data({**meta.head(True), "choices": [meta.choice(event.text, None, True)]})
                elif pieces := meta.pieces(event.text):
                    yield _data({**meta.head(True), "choices": [meta.delta(pieces)]})
            elif isinstance(event, CanvasPreview):
                preview = {"text": event.text, "canvas": event.canvas, "step": event.step}
                yield _data({**meta.head(True), "choices": [], plan.preview_key or "preview": preview})
            elif isinstance(event, Failed):
                yield _data(event.error.body())
                break
            elif isinstance(event, Finished):
                rest, calls = meta.finish()
                if rest:
                    yield _data({**meta.head(True), "choices": [meta.delta(rest)]})
                if calls:
                    delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
                    yield _data(
                        {
                            **meta.head(True),
                            "choices": [
                                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
                            ],
                        }
                    )
                last = meta.choice(None, "tool_calls" if calls else event.finish_reason, True)
                final = {**meta.head(True), "choices": [last], "diffusion": event.stats}
                yield _data({**final, "error": event.error} if event.error else final)
                if plan.include_usage:
                    yield _data({**meta.head(True), "choices": [], "usage": _usage(event)})
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
