"""One request path for the other wire formats (the Responses API, Anthropic's Messages API).

Their requests are translated into a chat request (``protocol.ChatRequest``'s fields, messages in OpenAI's chat
shape) and run through the chat endpoint's own validation, template, grammar and worker (``app._prepare``); the
answer comes back as the chat endpoint's parsed pieces (content, reasoning) and tool calls, for each format to
shape. Nothing here knows either format.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from mlx_dgemma.server.app import POLL_S, _Meta, read_body, submit
from mlx_dgemma.server.protocol import IGNORED_HEADER, APIError, Plan, read_json
from mlx_dgemma.server.worker import Delta, Event, Failed, Finished, Job

# Our request fields (diffusion options and chat extensions) that the other formats pass through unchanged.
EXTENSIONS = (
    "seed",
    "max_denoising_steps",
    "t_max",
    "t_min",
    "entropy_bound",
    "fast",
    "chat_template_kwargs",
    "parse_special_tokens",
    "stop",
)


async def read_request(request: Request) -> Any:
    """The decoded JSON body, under the server's content-type, size and time limits (as the chat endpoint)."""
    return await asyncio.to_thread(read_json, await read_body(request, request.app.state.limits))


@dataclass
class Run:
    """A translated chat request queued on the worker."""

    job: Job
    events: asyncio.Queue[Event]
    meta: _Meta
    plan: Plan
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return len(self.plan.prompt_ids)


async def start(request: Request, chat: dict[str, Any], ignored: list[str] | tuple[str, ...] = ()) -> Run:
    """Validate, template and queue ``chat`` (a chat request body) exactly as ``/v1/chat/completions`` does.

    ``ignored``: the other format's fields that were accepted and ignored, named in ``X-Ignored-Fields`` with the
    chat path's own ignored sampling fields.
    """
    state = request.app.state
    job_plan, parser, job, events = await submit(
        "chat", chat, request, state.served, state.worker, state.limits
    )
    names = [*ignored, *job_plan.ignored]
    headers = {IGNORED_HEADER: ", ".join(names)} if names else {}
    return Run(job, events, _Meta("chat", state.served.model_id, parser), job_plan, headers)


def streaming(data: dict[str, Any]) -> bool:
    """The request's ``stream`` flag (absent or null: false)."""
    stream = data.get("stream")
    if stream not in (None, True, False):
        raise APIError(400, f"stream must be true or false (got {json.dumps(stream)[:40]})", "stream")
    return stream is True


def renamed(e: APIError, names: dict[str, str]) -> APIError:
    """``e`` with the chat request's field names (in its ``param`` and message) replaced by the other format's."""
    message, param = e.message, e.param
    for old, new in names.items():
        message = re.sub(rf"(?<![\w.]){re.escape(old)}\b", new, message)
        if param is not None and (param == old or param.startswith(f"{old}.")):
            param = new + param[len(old) :]
    return APIError(e.status, message, param, e.type, e.code)


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


async def answer(run: Run, request: Request | None = None) -> AsyncIterator[Text | End]:
    """The answer as ``Text`` pieces, then one ``End``; a failure is raised (its ``APIError``).

    With ``request`` (a non-streaming answer) it polls for the client going away and then just ends. The job is
    cancelled when this ends early (a no-op once it is done).
    """
    try:
        while True:
            if request is None:
                event = await run.events.get()
            else:
                try:
                    event = await asyncio.wait_for(run.events.get(), POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            if isinstance(event, Delta):
                for kind, text in run.meta.pieces(event.text):
                    yield Text(kind, text)
            elif isinstance(event, Failed):
                raise event.error
            elif isinstance(event, Finished):
                rest, calls = run.meta.finish()
                for kind, text in rest:
                    yield Text(kind, text)
                yield End(event, calls)
                return
    finally:
        run.job.cancel()


@dataclass
class Collected:
    """A whole answer (non-streaming)."""

    content: str
    reasoning: str
    calls: list[dict[str, Any]]
    done: Finished


async def collect(run: Run, request: Request) -> Collected | None:
    """The whole answer; None if the client went away first."""
    content, reasoning = [], []
    async for item in answer(run, request):
        if isinstance(item, Text):
            (content if item.kind == "content" else reasoning).append(item.text)
        else:
            return Collected("".join(content), "".join(reasoning), item.calls, item.done)
    return None
