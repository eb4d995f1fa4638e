"""``POST /v1/responses``: OpenAI's Responses API, served by the chat path (``bridge.py``).

The request is translated into a chat request (``instructions`` and ``input`` items into messages, function
tools and ``tool_choice`` into chat's, ``text.format`` into ``response_format``, ``max_output_tokens`` into
``max_tokens``, ``reasoning.effort`` into ``enable_thinking``), validated, templated and generated exactly as
chat requests are, and the answer is shaped as a ``response`` object: ``reasoning``, ``message`` and
``function_call`` output items, ``usage``, and when streaming the Responses event types.

``previous_response_id`` continues a stored response: stored responses (the conversation's messages: input and
output) are kept in memory, least recently used out first, bounded in count and bytes; ``store: false`` keeps a
response out. As OpenAI does, the previous response's ``instructions`` are not carried over.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from mlx_dgemma.server import bridge
from mlx_dgemma.server.app import End, Run, Text
from mlx_dgemma.server.protocol import IGNORED, APIError
from mlx_dgemma.server.worker import Finished

STORE_COUNT = 1024  # responses kept for previous_response_id
STORE_BYTES = 64 * 1024 * 1024  # their conversations' JSON size, in all (an image's data: URL counts in full)

# The request fields translated here; the others are accepted and ignored (named in X-Ignored-Fields, except the
# metadata that chat also ignores quietly).
HANDLED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "previous_response_id",
        "tools",
        "tool_choice",
        "text",
        "max_output_tokens",
        "temperature",
        "top_p",
        "top_logprobs",
        "stream",
        "store",
        "reasoning",
        "background",
        "conversation",
        "prompt",
        *bridge.EXTENSIONS,
    }
)
NO_THINKING = (None, "none", "minimal")  # reasoning efforts that leave the thinking channel off
CHAT_NAMES = {
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
}  # in the chat path's errors
ITEM_TYPES = {"content": "message", "reasoning": "reasoning"}  # the output item of each kind of answer text


class ResponseStore:
    """Stored responses' conversations (chat messages), for ``previous_response_id``: least recently used out
    first, at most ``max_count`` of them and ``max_bytes`` of their JSON in all (a conversation counts in full in
    each of its responses, so the bound holds however they share it)."""

    def __init__(self, max_count: int = STORE_COUNT, max_bytes: int = STORE_BYTES):
        self.max_count, self.max_bytes = max_count, max_bytes
        self.entries: OrderedDict[str, tuple[list[dict[str, Any]], int]] = OrderedDict()
        self.bytes = 0

    def get(self, response_id: str) -> tuple[list[dict[str, Any]], int] | None:
        entry = self.entries.get(response_id)
        if entry is not None:
            self.entries.move_to_end(response_id)
        return entry

    def put(self, response_id: str, messages: list[dict[str, Any]], size: int) -> None:
        if size > self.max_bytes:
            return
        self.entries[response_id] = (messages, size)
        self.bytes += size
        while len(self.entries) > self.max_count or self.bytes > self.max_bytes:
            _, (_, old) = self.entries.popitem(last=False)
            self.bytes -= old


def register(app: FastAPI, store: ResponseStore | None = None) -> None:
    """Add ``POST /v1/responses`` to ``app`` (whose state holds ``served``, ``worker`` and ``limits``)."""
    app.state.responses = store or ResponseStore()

    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:
        return await _respond(request, app.state.responses)


async def _respond(request: Request, store: ResponseStore) -> Any:
    data = await bridge.read_request(request)
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    stream = bridge.streaming(data)
    turn = Turn(data, store, request.app.state.served.model_id)
    run = await bridge.start(request, turn.chat, turn.ignored, CHAT_NAMES)
    if stream:
        return run.stream(_events(turn, run))
    answer = await run.collect(request)
    if answer is None:  # the client went away
        return JSONResponse({})
    status = "incomplete" if answer.done.finish_reason == "length" else "completed"
    output = turn.output(answer.content, answer.reasoning, answer.calls, status)
    turn.keep(answer.content, answer.calls)
    return JSONResponse(turn.body(answer.done, output), headers=run.headers)


class Turn:
    """One Responses request: its translation into a chat request, and the shapes of its answer."""

    def __init__(self, data: dict[str, Any], store: ResponseStore, model: str):
        self.data, self.store, self.model = data, store, model
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())
        self.ignored = sorted(
            k for k, v in data.items() if k not in HANDLED and k not in IGNORED and v is not None
        )
        for name, why in (
            ("conversation", "use previous_response_id, or send the conversation as input items"),
            ("prompt", "stored prompts are not supported: send instructions and input"),
        ):
            if data.get(name) is not None:
                raise APIError(400, f"{name} is not supported by this server: {why}", name)
        if data.get("background") not in (None, False):
            raise APIError(
                400, "background: true is not supported by this server: send background: false", "background"
            )
        if not isinstance(data.get("store", True), bool):
            raise APIError(400, "store must be true or false", "store")
        self.history, self.history_bytes = self._history(data.get("previous_response_id"))
        self.new = input_messages(data.get("input"))
        if not self.new and not self.history:
            raise APIError(400, "input is empty: give a string or at least one item", "input")
        self.chat = self._chat()

    def _history(self, previous: Any) -> tuple[list[dict[str, Any]], int]:
        if previous is None:
            return [], 0
        if not isinstance(previous, str):
            raise APIError(
                400, "previous_response_id must be a string (a response's id)", "previous_response_id"
            )
        entry = self.store.get(previous)
        if entry is None:
            raise APIError(
                404,
                f"previous_response_id {previous!r} is not stored on this server (it was sent with "
                "store: false, evicted from the bounded store, or the server restarted): send the "
                "conversation as input items",
                "previous_response_id",
                code="previous_response_not_found",
            )
        return entry

    def _chat(self) -> dict[str, Any]:
        """The chat request this request stands for."""
        data = self.data
        instructions = data.get("instructions")
        system: list[dict[str, Any]] = []
        if isinstance(instructions, str):
            system = [{"role": "system", "content": instructions}] if instructions else []
        elif instructions is not None:
            system = [{"role": "system", "content": _content(instructions, "instructions")}]
        chat: dict[str, Any] = {"messages": [*system, *self.history, *self.new]}
        for name in ("model", "temperature", "top_p", "top_logprobs", *bridge.EXTENSIONS):
            if data.get(name) is not None:
                chat[name] = data[name]
        if data.get("max_output_tokens") is not None:
            chat["max_tokens"] = data["max_output_tokens"]
        if data.get("tools"):
            chat["tools"] = tools_of(data["tools"])
        if data.get("tool_choice") is not None:
            chat["tool_choice"] = tool_choice_of(data["tool_choice"])
        text = data.get("text")
        if text is not None:
            if not isinstance(text, dict):
                raise APIError(
                    400, 'text must be an object such as {"format": {"type": "json_schema", ...}}', "text"
                )
            if text.get("verbosity") is not None:
                self.ignored.append("text.verbosity")
            if text.get("format") is not None:
                chat["response_format"] = response_format_of(text["format"])
        reasoning = data.get("reasoning")
        if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
            # none/minimal: off explicitly too, over a server default (--chat-template-args) that turns it on.
            kwargs = chat.get("chat_template_kwargs")
            chat["chat_template_kwargs"] = {
                "enable_thinking": reasoning["effort"] not in NO_THINKING,
                **(kwargs if isinstance(kwargs, dict) else {}),
            }
        elif reasoning is not None and not isinstance(reasoning, dict):
            raise APIError(400, 'reasoning must be an object such as {"effort": "low"}', "reasoning")
        return chat

    # --- the answer ------------------------------------------------------------------------------------------

    def output(
        self, content: str, reasoning: str, calls: list[dict[str, Any]], status: str = "completed"
    ) -> list[dict[str, Any]]:
        """The output items of a whole answer."""
        items = []
        if reasoning:
            items.append(reasoning_item(_id("rs"), reasoning, status))
        if content.strip() or not calls:
            items.append(message_item(_id("msg"), content, status))
        items += [call_item(_id("fc"), call, "completed") for call in calls]
        return items

    def keep(self, content: str, calls: list[dict[str, Any]]) -> None:
        """Store this response's conversation (unless ``store: false``)."""
        if self.data.get("store", True) is False:
            return
        answer: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            answer["tool_calls"] = calls
        new = [*self.new, answer]
        size = self.history_bytes + len(json.dumps(new, ensure_ascii=False))
        self.store.put(self.id, [*self.history, *new], size)

    def body(
        self,
        done: Finished | None,
        output: list[dict[str, Any]],
        status: str | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The ``response`` object; ``done`` None: still in progress (``usage`` null)."""
        data = self.data
        incomplete = None
        if done is not None and status is None:
            status = "incomplete" if done.finish_reason == "length" else "completed"
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
            if done.error:
                error = {"code": done.error.get("code") or "server_error", "message": done.error["message"]}
        text: dict[str, Any] = data["text"] if isinstance(data.get("text"), dict) else {}
        reasoning: dict[str, Any] = data["reasoning"] if isinstance(data.get("reasoning"), dict) else {}
        out = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status or "in_progress",
            "background": False,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": data.get("instructions"),
            "max_output_tokens": data.get("max_output_tokens"),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": data.get("parallel_tool_calls", True),
            "previous_response_id": data.get("previous_response_id"),
            "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
            "store": data.get("store", True),
            "temperature": data.get("temperature"),
            "text": {"format": text.get("format") or {"type": "text"}},
            "tool_choice": data.get("tool_choice") or "auto",
            "tools": data.get("tools") or [],
            "top_p": data.get("top_p"),
            "truncation": data.get("truncation") or "disabled",
            "usage": usage(done) if done is not None else None,
            "user": data.get("user"),
            "metadata": data.get("metadata") or {},
        }
        if done is not None:
            out["completed_at"] = int(time.time()) if status == "completed" else None
            out["diffusion"] = done.stats
        return out


def usage(done: Finished) -> dict[str, Any]:
    return {
        "input_tokens": done.prompt_tokens,
        "input_tokens_details": {"cached_tokens": done.cached_tokens},
        "output_tokens": done.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [{"type": "reasoning_text", "text": text}]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [text_part(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def call_item(
    item_id: str, call: dict[str, Any], status: str, arguments: str | None = None
) -> dict[str, Any]:
    fn = call["function"]
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call["id"],
        "name": fn["name"],
        "arguments": fn["arguments"] if arguments is None else arguments,
        "status": status,
    }


# --- streaming ---------------------------------------------------------------------------------------------------


class _Stream:
    """Server-sent events in the Responses API's types, with their ``sequence_number``."""

    def __init__(self, turn: Turn):
        self.turn, self.seq = turn, 0
        self.items: list[dict[str, Any]] = []  # finished output items
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.text = ""

    def event(self, kind: str, **fields: Any) -> str:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def begin(self, kind: str) -> list[str]:
        """Open a reasoning or message item."""
        index, self.text = len(self.items), ""
        if kind == "reasoning":
            self.open = reasoning_item(_id("rs"), None, "in_progress")
            part = {"type": "reasoning_text", "text": ""}
        else:
            self.open = message_item(_id("msg"), None, "in_progress")
            part = text_part("")
        return [
            self.event("response.output_item.added", output_index=index, item=self.open),
            self.event(
                "response.content_part.added",
                item_id=self.open["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
        ]

    def delta(self, text: str) -> str:
        assert self.open is not None
        self.text += text
        where = {"item_id": self.open["id"], "output_index": len(self.items), "content_index": 0}
        if self.open["type"] == "reasoning":
            return self.event("response.reasoning_text.delta", **where, delta=text)
        return self.event("response.output_text.delta", **where, delta=text, logprobs=[])

    def end(self, status: str = "completed") -> list[str]:
        """Close the open item."""
        if self.open is None:
            return []
        item, index = self.open, len(self.items)
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            done = reasoning_item(item["id"], self.text, status)
            out = [
                self.event("response.reasoning_text.done", **where, text=self.text),
                self.event("response.content_part.done", **where, part=done["content"][0]),
            ]
        else:
            done = message_item(item["id"], self.text, status)
            out = [
                self.event("response.output_text.done", **where, text=self.text, logprobs=[]),
                self.event("response.content_part.done", **where, part=done["content"][0]),
            ]
        self.items.append(done)
        self.open = None
        return [*out, self.event("response.output_item.done", output_index=index, item=done)]

    def call(self, call: dict[str, Any]) -> list[str]:
        index, item_id = len(self.items), _id("fc")
        done = call_item(item_id, call, "completed")
        self.items.append(done)
        where = {"item_id": item_id, "output_index": index}
        return [
            self.event(
                "response.output_item.added",
                output_index=index,
                item=call_item(item_id, call, "in_progress", arguments=""),
            ),
            self.event("response.function_call_arguments.delta", **where, delta=done["arguments"]),
            self.event(
                "response.function_call_arguments.done",
                **where,
                name=done["name"],
                arguments=done["arguments"],
            ),
            self.event("response.output_item.done", output_index=index, item=done),
        ]


async def _events(turn: Turn, run: Run) -> AsyncIterator[str]:
    stream = _Stream(turn)
    content, calls = [], []
    try:
        yield stream.event("response.created", response=turn.body(None, []))
        yield stream.event("response.in_progress", response=turn.body(None, []))
        try:
            async for item in run.answer():
                if isinstance(item, Text):
                    if stream.open is None or stream.open["type"] != ITEM_TYPES[item.kind]:
                        for chunk in [*stream.end(), *stream.begin(item.kind)]:
                            yield chunk
                    if item.kind == "content":
                        content.append(item.text)
                    yield stream.delta(item.text)
                elif isinstance(item, End):
                    calls = item.calls
                    status = "incomplete" if item.done.finish_reason == "length" else "completed"
                    for chunk in stream.end(status):
                        yield chunk
                    if not calls and not any(i["type"] == "message" for i in stream.items):
                        for chunk in [*stream.begin("content"), *stream.end(status)]:
                            yield chunk
                    for call in calls:
                        for chunk in stream.call(call):
                            yield chunk
                    turn.keep("".join(content), calls)
                    final = turn.body(item.done, stream.items)
                    yield stream.event(f"response.{final['status']}", response=final)
        except APIError as e:
            for chunk in stream.end("incomplete"):
                yield chunk
            error = {"code": e.code or e.type, "message": e.message}
            yield stream.event("response.failed", response=turn.body(None, stream.items, "failed", error))
    finally:
        run.job.cancel()


# --- the request's translation -----------------------------------------------------------------------------------


def input_messages(items: Any) -> list[dict[str, Any]]:
    """``input`` (a string, or a list of items) as chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if items is None:
        return []
    if not isinstance(items, list):
        raise APIError(400, "input must be a string or a list of items", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise APIError(
                400, f"{where} must be an object (a message or a function_call(_output) item)", where
            )
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(
                    400,
                    f"{where}.role must be user, system, developer or assistant (got {role!r})",
                    f"{where}.role",
                )
            out.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(item.get(key), str) or not item[key]:
                    raise APIError(400, f"{where}.{key} must be a non-empty string", f"{where}.{key}")
            arguments = item.get("arguments", "{}")
            if not isinstance(arguments, str):
                raise APIError(400, f"{where}.arguments must be a JSON string", f"{where}.arguments")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": arguments or "{}"},
            }
            if out and out[-1]["role"] == "assistant":  # the calls of one answer: one assistant message
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}.call_id must be a string", f"{where}.call_id")
            output = item.get("output")
            if isinstance(output, list):
                output = "".join(p["text"] for p in _parts(output, f"{where}.output", images=False))
            if not isinstance(output, str):
                raise APIError(
                    400, f"{where}.output must be a string or a list of input_text parts", f"{where}.output"
                )
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            continue  # past thoughts are not sent back to the model (chat templates drop them too)
        else:
            raise APIError(
                400,
                f"{where}: items of type {kind!r} are not supported by this server: send message, "
                "function_call and function_call_output items",
                f"{where}.type",
            )
    return out


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", where)
    return _parts(content, where)


def _parts(parts: list[Any], where: str, images: bool = True) -> list[dict[str, Any]]:
    """Responses content parts as chat parts: text, and ``input_image`` (``image_url``: a data: or http(s) URL)."""
    out = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        at = f"{where}.{j}"
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append({"type": "text", "text": part["refusal"]})
        elif kind == "input_image" and images:
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            if not isinstance(url, str) or not url:
                raise APIError(
                    400,
                    f"{at}: an input_image needs image_url (a data: URL or an http(s) URL); file_id "
                    "is not supported",
                    at,
                )
            out.append({"type": "input_image", "image_url": url})
        else:
            allowed = "input_text and input_image" if images else "input_text"
            raise APIError(
                400, f"{at}: content parts of type {kind!r} are not supported here: send {allowed} parts", at
            )
    return out


def tools_of(tools: Any) -> list[dict[str, Any]]:
    """Responses function tools (``{"type": "function", "name", "parameters", ...}``) as chat tools."""
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of function tools", "tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(
                400,
                f"tools[{i}]: only function tools are supported by this server (got {kind!r})",
                f"tools.{i}.type",
            )
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def tool_choice_of(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(
        400,
        'tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}',
        "tool_choice",
    )


def response_format_of(fmt: Any) -> dict[str, Any]:
    """``text.format`` as chat's ``response_format`` (json_schema's fields move under ``json_schema``)."""
    if not isinstance(fmt, dict):
        raise APIError(
            400,
            'text.format must be an object such as {"type": "json_schema", "schema": {...}}',
            "text.format",
        )
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        if "schema" not in spec:
            raise APIError(
                400, 'text.format json_schema needs "schema" (a JSON schema)', "text.format.schema"
            )
        return {"type": "json_schema", "json_schema": spec}
    return fmt  # text, json_object, and our regex and lark grammars, as chat takes them
