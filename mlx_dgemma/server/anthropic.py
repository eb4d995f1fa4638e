"""``POST /v1/messages``: Anthropic's Messages API, served by the chat path (``bridge.py``).

The request is translated into a chat request (``system`` and content blocks into messages, ``tool_use`` blocks
into assistant ``tool_calls``, ``tool_result`` blocks into ``tool`` messages, ``tools`` / ``tool_choice`` into
chat's, ``stop_sequences`` into ``stop``, ``thinking`` into ``enable_thinking``, ``output_config.format`` into
``response_format``), validated, templated and generated exactly as chat requests are, and the answer is shaped
as an Anthropic ``message`` (``thinking``, ``text`` and ``tool_use`` blocks, ``stop_reason``, ``usage``) or, when
streaming, as Anthropic's events. Errors use Anthropic's shape, ``{"type": "error", "error": {"type",
"message"}}``. ``x-api-key`` and ``anthropic-version`` are accepted and ignored.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mlx_dgemma.server import bridge
from mlx_dgemma.server.app import End, Run, Text
from mlx_dgemma.server.protocol import APIError
from mlx_dgemma.server.worker import Finished

log = logging.getLogger("mlx_dgemma.server")

HANDLED = frozenset(
    {
        "model",
        "messages",
        "system",
        "max_tokens",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "stream",
        "thinking",
        "output_config",
        "output_format",
        *bridge.EXTENSIONS,
    }
)
CHAT_NAMES = {
    "stop": "stop_sequences",
    "response_format": "output_config.format",
}  # in the chat path's errors
QUIET = frozenset({"metadata", "service_tier"})  # metadata: accepted and ignored without a mention

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def register(app: FastAPI) -> None:
    """Add ``POST /v1/messages`` (and ``/v1/messages/count_tokens``) to ``app``."""

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        return await _guarded(_messages(request))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Any:
        return await _guarded(_count(request))


async def _guarded(work: Any) -> Any:
    """The route's answer, its errors in Anthropic's shape."""
    try:
        return await work
    except APIError as e:
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(error_body(e.status, e.message), status_code=e.status, headers=headers)
    except Exception as e:
        log.exception("internal error")
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)


async def _messages(request: Request) -> Any:
    data = await bridge.read_request(request)
    chat, ignored = translate(data)
    stream = bridge.streaming(data)
    run = await bridge.start(request, chat, ignored, CHAT_NAMES)
    msg = Reply(request.app.state.served.model_id, run.prompt_tokens)
    if stream:
        return run.stream(_events(msg, run))
    answer = await run.collect(request)
    if answer is None:  # the client went away
        return JSONResponse({})
    blocks = []
    if answer.reasoning:
        blocks.append(thinking_block(answer.reasoning))
    if answer.content.strip() or not answer.calls:
        blocks.append(text_block(answer.content))
    blocks += [tool_use_block(call) for call in answer.calls]
    return JSONResponse(msg.body(blocks, answer.done, bool(answer.calls)), headers=run.headers)


async def _count(request: Request) -> dict[str, Any]:
    """``/v1/messages/count_tokens``: the prompt's tokens, as the request would be templated."""
    from mlx_dgemma.server.app import _prepare

    data = await bridge.read_request(request)
    if isinstance(data, dict):
        data = {**data, "max_tokens": None}  # counting needs no room for an answer
    chat, _ = translate(data)
    state = request.app.state
    plan, _ = await state.limits.images.run(request, _prepare, "chat", chat, state.served, state.limits)
    return {"input_tokens": len(plan.prompt_ids)}


class Reply:
    """The shapes of one answer."""

    def __init__(self, model: str, prompt_tokens: int):
        self.id, self.model, self.prompt_tokens = f"msg_{uuid.uuid4().hex[:24]}", model, prompt_tokens

    def body(self, blocks: list[dict[str, Any]], done: Finished | None, calls: bool) -> dict[str, Any]:
        out = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": blocks,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.prompt_tokens, "output_tokens": 0},
        }
        if done is not None:
            out.update(
                stop_reason=stop_reason(done, calls), stop_sequence=done.stop_sequence, usage=usage(done)
            )
            out["diffusion"] = done.stats
        return out


def stop_reason(done: Finished, calls: bool) -> str:
    if calls:
        return "tool_use"
    if done.stop_sequence is not None:
        return "stop_sequence"
    return "max_tokens" if done.finish_reason == "length" else "end_turn"


def usage(done: Finished) -> dict[str, Any]:
    """Anthropic's counts: ``input_tokens`` are those not read from the (prompt) cache."""
    return {
        "input_tokens": done.prompt_tokens - done.cached_tokens,
        "output_tokens": done.completion_tokens,
        "cache_read_input_tokens": done.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def thinking_block(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": text, "signature": ""}


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_use_block(call: dict[str, Any], input_: Any = None) -> dict[str, Any]:
    fn = call["function"]
    if input_ is None:
        input_ = json.loads(fn["arguments"] or "{}")
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": input_}


# --- streaming ---------------------------------------------------------------------------------------------------


def _sse(kind: str, obj: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **obj}, ensure_ascii=False)}\n\n"


async def _events(msg: Reply, run: Run) -> AsyncIterator[str]:
    """``message_start``, then each block (``content_block_start``, ``content_block_delta``s,
    ``content_block_stop``), ``message_delta`` (``stop_reason``, ``usage``) and ``message_stop``; a failure is an
    ``error`` event."""
    index, open_kind = -1, None
    try:
        yield _sse("message_start", {"message": msg.body([], None, False)})
        async for item in run.answer():
            if isinstance(item, Text):
                if item.kind != open_kind:
                    if open_kind is not None:
                        yield _sse("content_block_stop", {"index": index})
                    index, open_kind = index + 1, item.kind
                    block = thinking_block("") if item.kind == "reasoning" else text_block("")
                    yield _sse("content_block_start", {"index": index, "content_block": block})
                delta: dict[str, Any] = (
                    {"type": "thinking_delta", "thinking": item.text}
                    if item.kind == "reasoning"
                    else {"type": "text_delta", "text": item.text}
                )
                yield _sse("content_block_delta", {"index": index, "delta": delta})
            elif isinstance(item, End):
                if open_kind is not None:
                    yield _sse("content_block_stop", {"index": index})
                if (
                    index < 0 and not item.calls
                ):  # an empty answer: one empty text block, as when not streaming
                    index += 1
                    yield _sse("content_block_start", {"index": index, "content_block": text_block("")})
                    yield _sse("content_block_stop", {"index": index})
                for call in item.calls:
                    index += 1
                    yield _sse(
                        "content_block_start", {"index": index, "content_block": tool_use_block(call, {})}
                    )
                    yield _sse(
                        "content_block_delta",
                        {
                            "index": index,
                            "delta": {
                                "type": "input_json_delta",
                                "partial_json": call["function"]["arguments"],
                            },
                        },
                    )
                    yield _sse("content_block_stop", {"index": index})
                done = item.done
                delta = {
                    "stop_reason": stop_reason(done, bool(item.calls)),
                    "stop_sequence": done.stop_sequence,
                }
                yield _sse("message_delta", {"delta": delta, "usage": usage(done), "diffusion": done.stats})
                yield _sse("message_stop", {})
    except APIError as e:
        yield _sse("error", {"error": error_body(e.status, e.message)["error"]})
    finally:
        run.job.cancel()


# --- the request's translation -----------------------------------------------------------------------------------


def translate(data: Any) -> tuple[dict[str, Any], list[str]]:
    """The chat request a Messages request stands for, and the fields accepted and ignored."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    ignored = sorted(k for k, v in data.items() if k not in HANDLED and k not in QUIET and v is not None)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of user and assistant messages", "messages")
    system = data.get("system")
    chat_messages = []
    if system:
        if isinstance(system, list):
            system = "".join(b["text"] for b in _text_blocks(system, "system"))
        if not isinstance(system, str):
            raise APIError(400, "system must be a string or a list of text blocks", "system")
        chat_messages.append({"role": "system", "content": system})
    for i, message in enumerate(messages):
        chat_messages += _message(i, message)
    chat: dict[str, Any] = {"messages": chat_messages}
    for name in ("model", "max_tokens", "temperature", "top_p", "top_k", *bridge.EXTENSIONS):
        if data.get(name) is not None:
            chat[name] = data[name]
    if data.get("stop_sequences") is not None:
        chat["stop"] = data["stop_sequences"]
    if data.get("tools"):
        chat["tools"] = tools_of(data["tools"])
    if data.get("tool_choice") is not None:
        choice = tool_choice_of(data["tool_choice"])
        if choice != "auto" or data.get("tools"):
            chat["tool_choice"] = choice
    thinking = data.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled", "adaptive"):
            raise APIError(
                400,
                'thinking must be {"type": "enabled", "budget_tokens": N}, {"type": "adaptive"} or '
                '{"type": "disabled"}',
                "thinking",
            )
        # Disabled: off explicitly too, over a server default (--chat-template-args) that turns it on.
        kwargs = chat.get("chat_template_kwargs")
        chat["chat_template_kwargs"] = {
            "enable_thinking": thinking["type"] != "disabled",
            **(kwargs if isinstance(kwargs, dict) else {}),
        }
    fmt = data.get("output_format")
    config = data.get("output_config")
    if config is not None:
        if not isinstance(config, dict):
            raise APIError(
                400,
                'output_config must be an object such as {"format": {"type": "json_schema", ...}}',
                "output_config",
            )
        fmt = config.get("format") if config.get("format") is not None else fmt
        if config.get("effort") is not None:
            ignored.append("output_config.effort")
    if fmt is not None:
        chat["response_format"] = _response_format(fmt)
    return chat, ignored


def _message(i: int, message: Any) -> list[dict[str, Any]]:
    """One Messages message as chat messages: ``tool_result`` blocks become ``tool`` messages (before the rest of
    the user's turn), ``tool_use`` blocks the assistant's ``tool_calls``; thinking blocks are dropped."""
    where = f"messages.{i}"
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ("user", "assistant"):
        raise APIError(400, f"{where}.role must be user or assistant (got {role!r})", f"{where}.role")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise APIError(
            400, f"{where}.content must be a string or a list of content blocks", f"{where}.content"
        )
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append(_image(block, at))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise APIError(400, f"{at}: a tool_use block needs an id and a name", at)
            calls.append(
                {
                    "id": block["id"],
                    "type": "function",
                    "function": {
                        "name": block["name"],
                        "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
                    },
                }
            )
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise APIError(400, f"{at}: a tool_result block needs the tool_use_id it answers", at)
            result = block.get("content", "")
            if isinstance(result, list):
                result = "".join(b["text"] for b in _text_blocks(result, f"{at}.content"))
            if not isinstance(result, str):
                raise APIError(
                    400, f"{at}.content must be a string or a list of text blocks", f"{at}.content"
                )
            if block.get("is_error"):
                result = f"Error: {result}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # past thoughts are not sent back to the model (chat templates drop them too)
        else:
            allowed = "text, image and tool_result" if role == "user" else "text, tool_use and thinking"
            raise APIError(
                400,
                f"{at}: {role} content blocks of type {kind!r} are not supported by this server: "
                f"send {allowed} blocks",
                f"{at}.type",
            )
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": parts or None}
        if calls:
            out["tool_calls"] = calls
        return [out]
    return [*results, *([{"role": "user", "content": parts}] if parts or not results else [])]


def _text_blocks(blocks: list[Any], where: str) -> list[dict[str, Any]]:
    for j, block in enumerate(blocks):
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            raise APIError(400, f"{where}.{j}: only text blocks are supported here", f"{where}.{j}")
    return blocks


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    """An image block (base64 or url source) as a chat ``image_url`` part."""
    source: Any = block.get("source")  # JSON: checked below
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64" and isinstance(source.get("data"), str) and isinstance(source.get("media_type"), str):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif kind == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise APIError(
            400,
            f"{where}: an image block needs a source of type base64 (media_type and data) or url; "
            "file sources are not supported",
            f"{where}.source",
        )
    return {"type": "image_url", "image_url": {"url": url}}


def tools_of(tools: Any) -> list[dict[str, Any]]:
    """Anthropic client tools (``name``, ``description``, ``input_schema``) as chat function tools."""
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of tools", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "custom") not in ("custom", None):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise APIError(
                400,
                f"tools[{i}]: server tools ({kind!r}) are not supported by this server: define "
                "client tools (name, description, input_schema)",
                f"tools.{i}",
            )
        fn = {"name": tool.get("name"), "parameters": tool.get("input_schema") or {"type": "object"}}
        if tool.get("description") is not None:
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def tool_choice_of(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(
        400,
        'tool_choice must be {"type": "auto"}, {"type": "any"}, {"type": "none"} or '
        '{"type": "tool", "name": ...}',
        "tool_choice",
    )


def _response_format(fmt: Any) -> dict[str, Any]:
    if (
        not isinstance(fmt, dict)
        or fmt.get("type") != "json_schema"
        or not isinstance(fmt.get("schema"), dict)
    ):
        raise APIError(
            400,
            'output_config.format must be {"type": "json_schema", "schema": {...}}',
            "output_config.format",
        )
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
