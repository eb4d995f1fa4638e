"""One request path for the other wire formats (the Responses API, Anthropic's Messages API).

Their requests are translated into a chat request (``protocol.ChatRequest``'s fields, messages in OpenAI's chat
shape) and run through the chat endpoint's own validation, template, grammar and worker (``app._prepare``); the
answer comes back as the chat endpoint's parsed pieces (content, reasoning) and tool calls (``app.Run``: ``answer``,
``collect``, ``stream``), for each format to shape. Nothing here knows either format.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from typing import Any

from fastapi import Request

from mlx_dgemma.server.app import Run, read_body, submit
from mlx_dgemma.server.protocol import APIError, read_json

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


async def start(
    request: Request, chat: dict[str, Any], ignored: Sequence[str] = (), names: dict[str, str] | None = None
) -> Run:
    """Validate, template and queue ``chat`` (a chat request body) exactly as ``/v1/chat/completions`` does.

    ``ignored``: the other format's fields that were accepted and ignored, named in ``X-Ignored-Fields`` with the
    chat path's own ignored sampling fields. ``names``: the chat request's field names as the other format calls
    them (``{"max_tokens": "max_output_tokens"}``), put into the chat path's errors (:func:`renamed`).
    """
    state = request.app.state
    try:
        return await submit("chat", chat, request, state.served, state.worker, state.limits, ignored)
    except APIError as e:
        raise renamed(e, names or {}) from None


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
