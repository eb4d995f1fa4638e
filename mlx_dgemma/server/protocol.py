"""The OpenAI wire format: request schemas, the field policy, and the translation into a generation plan.

Everything here is pure (no MLX calls, no I/O): the app validates a request and tokenizes its prompt with
these functions before the request is queued, so that every client error is an HTTP 4xx with the OpenAI
error shape, and the worker only ever sees plans it can serve.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from mlx_dgemma.decoding.constrain import FillInMiddle
from mlx_dgemma.errors import DGemmaError, GrammarBusy
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.prompt import chat_template
from mlx_dgemma.prompt.special_text import PlainText
from mlx_dgemma.request import (  # noqa: F401
    MIN_TEMPERATURE,
    UNSUPPORTED,
    GenerationRequest,
    prepare,
    sampler_config,
    temperature_schedule,
)

GREEDY_SEED = 0  # temperature 0 without a seed uses this one, so that it is reproducible as clients expect

# Fields that change nothing for us: accepted and ignored.
IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "safety_identifier",
        "parallel_tool_calls",
    }
)

# Autoregressive-only sampling knobs that clients (and their SDKs) send by default: ignored unless --strict,
# and named in the X-Ignored-Fields response header. Fields that change the response's shape stay 400s.
SAMPLING_ONLY = frozenset(
    {"top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"}
)
# Fields of ``NEUTRAL`` ignored (and named) unless --strict: they change neither the response's shape nor what
# it means (a hint we cannot follow, a latency optimisation). The other ``NEUTRAL`` fields stay 400s.
TOLERATED = SAMPLING_ONLY | {"verbosity", "prediction"}
IGNORED_HEADER = "X-Ignored-Fields"
# ``reasoning_effort`` onto the chat template's thinking switch (``enable_thinking``).
EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True, "xhigh": True}
DEFAULT_MAX_TOKENS = 512  # the server's default answer limit (--max-tokens), rounded up to whole canvases

_PENALTY = UNSUPPORTED["presence_penalty"]
_NO_LOGPROBS = UNSUPPORTED["logprobs"]

# Fields we cannot honour: accepted only at the value that means "off" (None always is), else HTTP 400.
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "one answer per request: send several requests"),
    "best_of": ((1,), "one answer per request: send several requests"),
    "top_p": ((1,), UNSUPPORTED["top_p"]),
    "top_k": ((0, -1), UNSUPPORTED["top_k"]),
    "min_p": ((0,), UNSUPPORTED["min_p"]),
    "presence_penalty": ((0,), _PENALTY),
    "frequency_penalty": ((0,), _PENALTY),
    "repetition_penalty": ((1,), _PENALTY),
    "logprobs": ((False,), _NO_LOGPROBS),
    "top_logprobs": ((0,), _NO_LOGPROBS),
    "logit_bias": (({},), "a canvas is denoised as a whole; there is no per-token bias"),
    "echo": ((False,), "the prompt is not returned; prepend it yourself"),
    "suffix": (("",), "fill-in-the-middle is for /v1/completions (prompt + suffix)"),
    "tool_choice": (("auto", "none"), 'use "required" or {"type": "function", "function": {"name": ...}}'),
    "modalities": ((["text"],), "this server is text only"),
    "functions": ((), "use tools"),
    "function_call": ((), "use tools and tool_choice"),
    "audio": ((), "this server is text only"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "this server has no web search"),
    "verbosity": ((), "ask for brevity in the prompt"),
}


class APIError(Exception):
    """An error answered to the client in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    """``stream_options``: OpenAI's ``include_usage``, and our ``include_previews`` extension (``include_drafts``,
    its old name, still works and keeps the old chunk key); other options (``include_obfuscation``, ...) are
    ignored and named (``--strict``: 400s)."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    include_previews: bool = False
    include_drafts: bool = False

    def preview_key(self) -> str | None:
        """The chunk key of per-step canvas previews: ``preview``, ``draft`` when asked by the old name, or None."""
        return "preview" if self.include_previews else "draft" if self.include_drafts else None


# The shape of chat messages and tools, checked in ``parse`` before anything reads them: a wrong JSON type anywhere
# is a 400 naming its field. The request keeps the client's dicts (chat templates read them as sent).
_Name = Field(min_length=1)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Open):
    name: str = _Name
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; a decoded object is accepted too


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None  # parts are checked by ``_message`` (text, images)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Open):
    name: str = _Name
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema: checked against the metaschema in ``parse``
    strict: bool | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class _ChatShape(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[Message]
    tools: list[Tool] | None = None


def read_json(body: bytes) -> Any:
    """The decoded JSON body; ``APIError(400)`` for anything a client sent wrong (not a 500).

    Python's parser raises ``RecursionError`` on deep nesting and ``ValueError`` on integers past 4300
    digits; JSON also allows lone surrogates (``"\\ud800"``), which cannot be tokenized nor echoed back.
    """
    try:
        data = json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError, so are huge integers
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    _check_strings(data)
    return data


def _check_strings(data: Any) -> None:
    """Reject text that is not valid Unicode (lone surrogates); iterative, so any depth is safe."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in value.items())
            stack.extend((k, path) for k in value)
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(
                    400,
                    f'{path or "the body"} holds a lone UTF-16 surrogate (e.g. "\\ud800"): '
                    "send valid Unicode text",
                    path or None,
                ) from None


class _Request(BaseModel):
    """Fields shared by both endpoints. Other fields go to ``model_extra`` and through the field policy."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)  # strict: "5" and true are not token counts
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_denoising_steps: StrictInt | None = Field(None, ge=1)
    t_max: float | None = Field(None, ge=0)
    t_min: float | None = Field(None, ge=0)
    entropy_bound: float | None = Field(None, gt=0)
    fast: StrictBool | None = (
        None  # fast decoding (mlx_dgemma.decoding.fast); None: the server's --fast default
    )
    response_format: dict[str, Any] | None = (
        None  # text, json_object, json_schema (+ regex, lark): constrain.py
    )


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]]  # typed by ``Message`` in ``parse`` (kept as dicts for the chat template)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Our extension: true reads special-token spellings in message text as special tokens (pre-templated text
    # sent on purpose); by default they are plain text, as OpenAI reads them (``mlx_dgemma.prompt.special_text``).
    parse_special_tokens: StrictBool = False


class CompletionRequest(_Request):
    """``POST /v1/completions``: a raw prompt, no chat template; with ``suffix``, fill-in-the-middle."""

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    # The text after the gap: the answer is the middle between ``prompt`` and it (``fim_suffix``); "": none.
    suffix: str | None = None


@dataclass
class Plan:
    """A validated request, ready for the worker."""

    prompt_ids: list[int]
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    sampler: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    preview_key: str | None = None  # send per-step canvas previews under this chunk key (StreamOptions)
    cache_points: tuple[
        int, ...
    ] = ()  # prompt prefixes worth keeping in the prompt cache (besides the whole)
    tools: bool = False  # parse tool calls out of the answer (the request offered tools)
    thinking: bool = False  # split the thinking channel into reasoning_content (enable_thinking was on)
    ignored: tuple[str, ...] = ()  # autoregressive-only fields ignored (named in X-Ignored-Fields)
    fast: bool | None = None  # fast decoding; None: the server's default
    image_prompt: Any = (
        None  # mlx_dgemma.prompt.multimodal.ImagePrompt of a request with images (ids already expanded)
    )
    response_format: dict[str, Any] | None = None  # a grammar: the request's, or a forced tool call's
    # The field a grammar or infill error names (``tool_choice``: a forced call; ``suffix``: fill-in-the-middle)
    format_param: str = "response_format"
    suffix: list[int] | None = None  # fill-in-the-middle: the suffix's token ids (the answer is the middle)
    # The library's request (``request.prepare``), built from the fields above by ``request_of``: on the thread
    # that plans it (rank 0), on the worker elsewhere. Not sent to other ranks (they build their own).
    request: GenerationRequest | None = field(default=None, repr=False, compare=False)


Kind = Literal["chat", "completion"]


def parse(kind: Kind, data: Any) -> ChatRequest | CompletionRequest:
    """Validate a decoded JSON body; raise ``APIError(400)`` naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    schema = ChatRequest if kind == "chat" else CompletionRequest
    try:
        request = schema.model_validate(data)
        if kind == "chat":
            _ChatShape.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _param_of(data, err) or None
        raise APIError(400, f"invalid field {param!r}: {_pydantic_reason(err)}", param) from None
    if isinstance(request, ChatRequest):
        for i, tool in enumerate(request.tools or []):
            check_schema(tool["function"].get("parameters"), f"tools.{i}.function.parameters")
    return request


def _param_of(data: Any, err: Any) -> str:
    """The dotted path of a pydantic error in the request (``messages.1.tool_calls.0.id``), without the union
    members pydantic adds to it (``content.str``): the path stops where the request's own data does."""
    path, node = [], data
    loc = list(err["loc"])
    for i, part in enumerate(loc):
        inside = isinstance(node, dict) and part in node
        if inside or (isinstance(node, list) and isinstance(part, int) and part < len(node)):
            node = node[part]
        elif err["type"] == "missing" and i == len(loc) - 1:
            pass  # the missing field itself
        else:
            break
        path.append(str(part))
    return ".".join(path)


def _pydantic_reason(err: Any) -> str:
    """Pydantic's message, with the value sent when it is short (``got 'x'``), as one line."""
    msg = " ".join(str(err["msg"]).split())
    value = err.get("input")
    if err["type"] != "missing" and isinstance(value, (str, int, float, bool, list, type(None))):
        shown = json.dumps(value)
        if len(shown) <= 40:
            msg += f" (got {shown})"
    return msg


def check_schema(schema: Any, param: str) -> None:
    """A JSON schema checked against its metaschema (Draft 2020-12, or the ``$schema`` it names): a wrong type
    anywhere (``"pattern": 5``, ``"minItems": "2"``, ``"properties": []``) is a 400 naming where it is."""
    if schema is None:
        return
    from mlx_dgemma.decoding.constrain import ConstraintError, check_json_schema

    try:
        check_json_schema(schema)
    except ConstraintError as e:
        raise APIError(400, f"{param}: {e}", f"{param}.{e.where}" if e.where else param) from None


def check_extra_fields(extra: dict[str, Any], strict: bool = True) -> list[str]:
    """Apply the field policy to the fields the schema does not model: ignore, accept at neutral, or 400.

    Returns the fields that were ignored (only when not ``strict``): unknown fields, and autoregressive-only
    sampling fields (``TOLERATED``) away from their neutral value. Fields that change the response's shape
    (``n``, ``logprobs``, ``audio``, ...) are 400s either way unless neutral.
    """
    ignored = []
    for name, value in extra.items():
        if name in IGNORED or value is None:
            continue
        if name not in NEUTRAL:
            if not strict:
                ignored.append(name)
                continue
            raise APIError(
                400,
                f"unknown field {name!r}: it is not an OpenAI or DiffusionGemma request field "
                "(the server runs with --strict)",
                name,
            )
        neutral, why = NEUTRAL[name]
        if not any(_same(value, n) for n in neutral):
            if not strict and name in TOLERATED:
                ignored.append(name)
                continue
            raise APIError(400, f"{name}={value!r} is not supported: {why}", name)
    return ignored


def _same(value: Any, neutral: Any) -> bool:
    if isinstance(neutral, bool) or isinstance(value, bool):
        return value is neutral
    return value == neutral


def schedule(request: _Request, model: Model) -> dict[str, Any]:
    """The sampler options of a request, with ``temperature`` mapped onto the (t_max, t_min) schedule.

    ``temperature`` T sets ``t_max = T`` and keeps the checkpoint's ratio ``t_min / t_max`` (1/2 in the
    released config, whose 0.8/0.4 is T = 0.8). T = 0 is served as ``MIN_TEMPERATURE``.
    """
    opts: dict[str, Any] = {
        "max_denoising_steps": request.max_denoising_steps,
        "t_max": request.t_max,
        "t_min": request.t_min,
        "entropy_bound": request.entropy_bound,
    }
    if request.temperature is not None:
        if request.t_max is not None or request.t_min is not None:
            raise APIError(400, "give either temperature or t_max/t_min, not both", "temperature")
        opts["t_max"], opts["t_min"] = temperature_schedule(model, request.temperature)
    for name in ("t_max", "t_min", "entropy_bound"):
        with np.errstate(over="ignore"):  # the overflow is what we look for
            finite = opts[name] is None or np.isfinite(np.float32(opts[name]))
        if not finite:
            raise APIError(
                400, f"{name}={opts[name]!r} is not a finite 32-bit float: use a value below 3.4e38", name
            )
    limit = max_steps(model)
    if (request.max_denoising_steps or 0) > limit:
        raise APIError(
            400,
            f"max_denoising_steps={request.max_denoising_steps} is more than this model allows "
            f"(at most {limit})",
            "max_denoising_steps",
        )
    try:
        sampler_config(model, **opts)
    except DGemmaError as e:
        param = next((k for k in opts if k in str(e)), None)
        raise APIError(400, str(e), param) from None
    return {k: v for k, v in opts.items() if v is not None}


def max_steps(model: Model) -> int:
    """The most denoising steps a request may ask for: one step per canvas position (the finest schedule
    that can commit a token per step), or the checkpoint's default if that is larger."""
    return max(sampler_config(model).max_denoising_steps, model.args.canvas_length)


def seed_of(request: _Request) -> int | None:
    """The request's seed; temperature 0 without one gets ``GREEDY_SEED`` (reproducible, like greedy)."""
    if request.seed is None and request.temperature == 0:
        return GREEDY_SEED
    return None if request.seed is None else request.seed % 2**64  # MLX keys take 0 <= seed < 2**64


def stops_of(request: _Request) -> list[str]:
    stop = request.stop
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return [s for s in stops if s]


def chat_prompt_ids(
    request: ChatRequest,
    tokenizer: Any,
    context: int | None = None,
    images: list | None = None,
    placeholder: str = "",
) -> tuple[list[int], int | None]:
    """The chat template applied to the messages (plus tools and ``chat_template_kwargs``), as token ids, and
    where the conversation so far ends in them (before the generation prompt), if it is a prefix.

    The next turn's prompt extends the conversation, not necessarily this prompt: templates often render
    the generation prompt (e.g. an empty thought block) differently from the answer that follows it.
    """
    if not request.messages:
        raise APIError(400, "messages is empty: give at least one message", "messages")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
    plain = (
        None
        if request.parse_special_tokens
        else PlainText(
            tokenizer, [request.messages, request.tools, request.chat_template_kwargs, template, placeholder]
        )
    )
    messages = _with_tool_names(
        [_message(i, m, images, placeholder, plain) for i, m in enumerate(request.messages)]
    )
    kwargs = dict(request.chat_template_kwargs or {})
    try:
        chat_template.check_kwargs(kwargs)
    except DGemmaError as e:
        raise APIError(400, str(e), "chat_template_kwargs") from None
    if request.tools and _tool_choice(request) != "none":
        if "tools" not in template:
            raise APIError(400, "this model's chat template does not accept tool definitions", "tools")
        kwargs["tools"] = request.tools
    ids = _render(tokenizer, messages, True, kwargs, context, plain)
    history = _render(tokenizer, messages, False, kwargs, context, plain)
    return ids, len(history) if 0 < len(history) < len(ids) and ids[: len(history)] == history else None


def _render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    generation_prompt: bool,
    kwargs: dict[str, Any],
    context: int | None = None,
    plain: PlainText | None = None,
) -> list[int]:
    """The template rendered and tokenized; with ``plain``, special-token spellings in message text are text."""
    template_kwargs = {
        k: v for k, v in kwargs.items() if k != "tools"
    }  # tools: set by the server, not the client
    tools = kwargs.get("tools")
    try:  # the template's own code is time-limited (mlx_dgemma.prompt.chat_template)
        text = chat_template.render(tokenizer, messages, generation_prompt, template_kwargs, tools)
    except chat_template.TemplateTooSlow as e:
        raise APIError(400, str(e), "messages") from None
    except Exception as e:  # jinja raises on messages the template rejects (roles out of order, ...)
        raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None
    if plain is not None:
        text, typed = plain.unmark(text)
        if typed:  # a message holds a special-token spelling: tokenized as text
            check_length(tokenizer, text, context, "messages")
            return plain.encode(text, typed)
    # The template writes its own <bos>; don't let the tokenizer add another.
    return encode(tokenizer, text, False, context, "messages")


@functools.lru_cache(maxsize=8)
def max_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for: a vocabulary entry's spelling is at least as long as
    its text (SentencePiece's "▁" is one space, a byte token "<0x0A>" one byte), so this bounds it."""
    vocab = tokenizer.get_vocab()
    return max((len(t) for t in vocab), default=1) or 1


def encode(tokenizer: Any, text: str, special: bool, context: int | None, param: str) -> list[int]:
    """Token ids of ``text``. A text too long for ``context`` tokens whatever its tokens (more characters
    than ``context`` of the longest tokens) is refused before tokenizing: tokenizing megabytes costs
    seconds of CPU for a request that cannot be served."""
    check_length(tokenizer, text, context, param)
    backend = getattr(getattr(tokenizer, "_tokenizer", tokenizer), "backend_tokenizer", None)
    if backend is not None and not special:  # the Rust tokenizer directly: 3x faster, and without the GIL
        return list(backend.encode_batch([text], add_special_tokens=False)[0].ids)
    return list(tokenizer.encode(text, add_special_tokens=special))


def check_length(tokenizer: Any, text: str, context: int | None, param: str) -> None:
    """``APIError(400)`` when ``text`` has more characters than ``context`` of the longest tokens."""
    if context is not None and len(text) > context * max_token_chars(tokenizer):
        at_least = -(-len(text) // max_token_chars(tokenizer))
        raise APIError(
            400,
            f"the prompt has at least {at_least} tokens ({len(text)} characters), but the "
            f"context length is {context}: shorten the prompt",
            param,
            code="context_length_exceeded",
        )


def _tool_choice(request: ChatRequest) -> Any:
    return (request.model_extra or {}).get("tool_choice")


def _message(
    i: int,
    message: dict[str, Any],
    images: list | None = None,
    placeholder: str = "",
    plain: PlainText | None = None,
) -> dict[str, Any]:
    """One chat message for the template: text parts joined, ``developer`` read as ``system``; image parts
    (collected into ``images`` when given) become ``placeholder``; the text marked by ``plain`` (read as text)."""
    mark = plain.mark if plain is not None else str
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise APIError(
            400,
            f"messages[{i}].role must be system, developer, user, assistant or tool (got {role!r})",
            f"messages.{i}.role",
        )
    out = {**message, "role": "system" if role == "developer" else role}
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                images is not None
                and isinstance(part, dict)
                and part.get("type") in ("image_url", "input_image")
            ):
                images.append((f"messages.{i}.content.{j}", part))
                texts.append(placeholder)
                continue
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise APIError(
                    400, f"messages[{i}].content: only text parts are supported", f"messages.{i}.content"
                )
            texts.append(mark(part["text"]))
        out["content"] = "".join(texts)
    elif content is not None and not isinstance(content, str):
        raise APIError(
            400, f"messages[{i}].content must be a string or a list of text parts", f"messages.{i}.content"
        )
    elif content is None and role != "assistant":
        raise APIError(400, f"messages[{i}].content is missing", f"messages.{i}.content")
    elif content is not None:
        out["content"] = mark(content)
    if role == "assistant" and message.get("tool_calls"):
        out["tool_calls"] = _tool_calls_for_template(i, message["tool_calls"])
    return out


def _tool_calls_for_template(i: int, calls: Any) -> list[dict[str, Any]]:
    """An assistant's OpenAI ``tool_calls`` with ``arguments`` decoded: chat templates (Gemma 4's among
    them) iterate the arguments as a mapping, while OpenAI sends them as a JSON string."""
    if not isinstance(calls, list):
        raise APIError(400, f"messages[{i}].tool_calls must be a list", f"messages.{i}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(
                400, f"messages[{i}].tool_calls[{j}] needs function.name", f"messages.{i}.tool_calls"
            )
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise APIError(
                    400,
                    f"messages[{i}].tool_calls[{j}].function.arguments is not JSON",
                    f"messages.{i}.tool_calls.{j}.function.arguments",
                ) from None
        if not isinstance(args, dict):
            raise APIError(
                400,
                f"messages[{i}].tool_calls[{j}].function.arguments must be a JSON object "
                f"(got {type(args).__name__}): send the call's arguments as an object",
                f"messages.{i}.tool_calls.{j}.function.arguments",
            )
        out.append({**call, "function": {**fn, "arguments": args}})
    return out


def _with_tool_names(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool results named after the call they answer (OpenAI sends only ``tool_call_id``; templates such as
    Gemma 4's write ``response:NAME{...}``)."""
    names: dict[str, str] = {}
    for m in messages:
        for call in m.get("tool_calls") or []:
            if call.get("id"):
                names[call["id"]] = call["function"]["name"]
        if m["role"] == "tool" and not m.get("name") and m.get("tool_call_id") in names:
            m["name"] = names[m["tool_call_id"]]
    return messages


def completion_prompt_ids(
    request: CompletionRequest, tokenizer: Any, context: int | None = None
) -> list[int]:
    """The raw prompt (one string or one list of token ids) as token ids."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError(400, f"prompt has {len(prompt)} prompts: send one per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        return encode(tokenizer, prompt, True, context, "prompt")
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    ids = cast(list[int], prompt)  # a list of prompts is its one prompt by now, and a string was encoded
    vocab = getattr(tokenizer, "vocab_size", None) or math.inf
    if any(t < 0 or t >= vocab for t in ids):
        raise APIError(400, f"prompt has token ids outside the vocabulary (0..{vocab - 1})", "prompt")
    return list(ids)


def fim_suffix(request: _Request, tokenizer: Any, canvas: int) -> list[int] | None:
    """Fill-in-the-middle: the token ids of a completion's ``suffix`` (``None``: none, a plain completion).

    The plan passes them to the library as ``infill=FillInMiddle(ids)``: the middle is an open hole of
    ``max_tokens`` positions with the suffix held right after it, in one canvas (``constrain.FillInMiddle``,
    which refuses a suffix that does not fit beside the middle; ``request_of`` answers that as a 400 naming
    ``suffix``). A suffix is text for the middle to lead into, so it cannot be combined with a grammar; a suffix
    of more characters than a canvas of the longest tokens is refused before tokenizing it."""
    if not isinstance(request, CompletionRequest) or not request.suffix:
        return None
    if request.response_format not in (None, {"type": "text"}):
        raise APIError(
            400,
            "suffix (fill-in-the-middle) cannot be combined with response_format: the middle is free text "
            "between the prompt and the suffix; send one or the other",
            "suffix",
        )
    if len(request.suffix) > canvas * max_token_chars(tokenizer):
        raise APIError(
            400,
            f"the suffix has at least {-(-len(request.suffix) // max_token_chars(tokenizer))} tokens "
            f"({len(request.suffix)} characters), but it shares one {canvas}-token canvas with the middle: "
            f"send at most {canvas - 1} tokens of it (its beginning)",
            "suffix",
        )
    return encode(tokenizer, request.suffix, False, None, "suffix")


def max_tokens_of(
    request: _Request, prompt_tokens: int, context: int, canvas: int, default: int | None = None
) -> int:
    """The exact answer limit; raise ``APIError(400)`` naming both numbers when the prompt does not fit.

    Canvases are denoised whole, so the last one needs all its positions: the prompt plus ``max_tokens``
    rounded up to whole canvases must fit in ``context``. Without ``max_tokens``, the answer may use
    ``default`` tokens (the server's ``--max-tokens``) or all the room there is, whichever is less (no
    ``default``: all the room).
    """
    room = (context - prompt_tokens) // canvas * canvas
    if room <= 0:
        raise APIError(
            400,
            f"the prompt has {prompt_tokens} tokens, but the context length is {context} "
            f"(and one {canvas}-token canvas must fit after the prompt): shorten the prompt",
            "messages" if isinstance(request, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )
    asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if asked is None:
        return room if default is None else min(default, room)
    if asked > room:
        name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        raise APIError(
            400,
            f"the context length is {context} tokens, but {prompt_tokens} prompt tokens plus "
            f"{name}={asked} (rounded up to {canvas}-token canvases: "
            f"{prompt_tokens + math.ceil(asked / canvas) * canvas}) do not fit: "
            f"at most {room} new tokens",
            name,
            code="context_length_exceeded",
        )
    return asked


def plan(
    kind: Kind,
    request: ChatRequest | CompletionRequest,
    tokenizer: Any,
    model: Model,
    context: int,
    strict: bool = True,
    max_tokens: int | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> Plan:
    """Everything the worker needs, validated: raises ``APIError`` on any client error.

    Not ``strict``: unknown fields, unknown ``stream_options`` and autoregressive-only sampling fields are
    ignored (listed in ``Plan.ignored``), not 400s. ``max_tokens``: the answer limit of a request that sets
    none (``--max-tokens``). ``template_kwargs``: ``chat_template_kwargs`` under the request's own
    (``--chat-template-args``).
    """
    extra = dict(request.model_extra or {})
    forced = _forced_tool_choice(request, extra)
    effort = extra.pop("reasoning_effort", None)
    ignored = check_extra_fields(extra, strict)
    ignored += _stream_options_ignored(request, strict)
    if isinstance(request, ChatRequest):
        effort_on = _thinking_of(effort, tokenizer, strict)
        if effort is not None and effort_on is None:
            ignored.append("reasoning_effort")
        switch = {} if effort_on is None else {"enable_thinking": effort_on}  # under the request's own kwargs
        request.chat_template_kwargs = {
            **(template_kwargs or {}),
            **switch,
            **(request.chat_template_kwargs or {}),
        } or None
    elif effort is not None:
        _thinking_of(effort, None, strict)  # no template: a bad value is still a 400, a good one ignored
        ignored.append("reasoning_effort")
    sampler = schedule(request, model)
    history, image_prompt = None, None
    if isinstance(request, ChatRequest):
        vision = getattr(model, "vision_args", None)
        images: list | None = [] if vision is not None else None
        placeholder = tokenizer.convert_ids_to_tokens(vision.image_token_id) if vision is not None else ""
        ids, history = chat_prompt_ids(request, tokenizer, context, images, placeholder)
        if images:
            image_prompt = _image_prompt(model, ids, images)
            if history is not None:  # every image is in the conversation so far
                history += len(image_prompt.ids) - len(ids)
            ids = image_prompt.ids
    else:
        assert isinstance(request, CompletionRequest)
        ids = completion_prompt_ids(request, tokenizer, context)
    canvas = model.args.canvas_length
    suffix = fim_suffix(request, tokenizer, canvas)
    max_tokens = max_tokens_of(request, len(ids), context, canvas, max_tokens)
    if suffix is not None and request.max_tokens is None:  # the middle's default: the room beside the suffix
        max_tokens = min(max_tokens, max(canvas - len(suffix), 1))
    options = request.stream_options or StreamOptions()
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    chat = isinstance(request, ChatRequest)
    tools = isinstance(request, ChatRequest) and bool(request.tools) and _tool_choice(request) != "none"
    thinking = chat and bool((getattr(request, "chat_template_kwargs", None) or {}).get("enable_thinking"))
    fmt, param = response_format_of(request, tokenizer, forced)
    return Plan(
        ids,
        max_tokens,
        stops_of(request),
        seed_of(request),
        sampler,
        request.stream,
        options.include_usage,
        options.preview_key(),
        () if history is None else (history,),
        tools,
        thinking,
        tuple(ignored),
        fast=request.fast,
        image_prompt=image_prompt,
        response_format=fmt,
        format_param="suffix" if suffix is not None else param,
        suffix=suffix,
    )


def request_of(
    plan: Plan, model: Model, tokenizer: Any, proposer: Any = None, fast: bool = False
) -> GenerationRequest:
    """The library's request for ``plan`` (``request.prepare``), its grammar compiled here, once, in a bounded
    slot: a bad schema, or a ``max_tokens`` too small for it, is a 400 before the request is queued.
    ``proposer``: the server's drafter; ``fast``: fast decoding for a request that does not say."""
    try:
        request = prepare(
            model,
            tokenizer,
            None,
            plan.max_tokens,
            prompt_ids=plan.prompt_ids,
            seed=plan.seed,
            drafter=proposer or "none",
            fast=fast if plan.fast is None else plan.fast,
            response_format=plan.response_format,
            infill=None if plan.suffix is None else FillInMiddle(plan.suffix),
            bounded_grammar=True,
            previews=plan.preview_key is not None,
            **plan.sampler,
        )
    except GrammarBusy as e:
        raise APIError(
            429, str(e), plan.format_param, type_="rate_limit_error", code="grammars_busy"
        ) from None
    except DGemmaError as e:
        kind = (plan.response_format or {}).get("type")
        param = plan.format_param
        label = param if param == "tool_choice" or not isinstance(kind, str) else f"{param}.{kind}"
        raise APIError(400, f"{label}: {e}", param) from None
    return replace(request, images=plan.image_prompt)


def knows_thinking(tokenizer: Any) -> bool:
    """Whether the chat template has a thinking switch (it reads ``enable_thinking``)."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return bool(template) and "enable_thinking" in str(template)


def _thinking_of(effort: Any, tokenizer: Any, strict: bool) -> bool | None:
    """``reasoning_effort`` as the template's ``enable_thinking`` (none/minimal: off, low and up: on); None when
    not given or the template has no thinking switch (ignored; ``strict``: a 400)."""
    if effort is None:
        return None
    if effort not in EFFORTS:
        raise APIError(
            400,
            f"reasoning_effort must be one of {', '.join(EFFORTS)} (got {json.dumps(effort)[:40]})",
            "reasoning_effort",
        )
    if not knows_thinking(tokenizer):
        if strict:
            raise APIError(
                400,
                "reasoning_effort is not supported: this model's chat template has no thinking "
                "switch (enable_thinking)",
                "reasoning_effort",
            )
        return None
    return EFFORTS[effort]


def _stream_options_ignored(request: _Request, strict: bool) -> list[str]:
    """``stream_options`` we do not know (``include_obfuscation``, ...): ignored and named; ``strict``: a 400."""
    options = request.stream_options
    names = (
        [k for k, v in (options.model_extra or {}).items() if v is not None] if options is not None else []
    )
    if names and strict:
        raise APIError(
            400,
            f"unknown field 'stream_options.{names[0]}': stream_options takes include_usage and "
            "include_previews (the server runs with --strict)",
            f"stream_options.{names[0]}",
        )
    return [f"stream_options.{k}" for k in names]


def _image_prompt(model: Model, ids: list[int], parts: list[tuple[str, dict]]) -> Any:
    """Fetch or decode the images (``server.images``: fetch and pixel limits), process them and expand their
    placeholders."""
    from mlx_dgemma.server.images import image_prompt

    try:
        return image_prompt(model, ids, parts)
    except DGemmaError as e:
        raise APIError(400, f"messages: {e}", "messages") from None


def _forced_tool_choice(request: _Request, extra: dict[str, Any]) -> Any:
    """``tool_choice`` when it forces a call ("required" or a named function), taken out of ``extra``; else None."""
    choice = extra.get("tool_choice")
    if not isinstance(request, ChatRequest) or choice in (None, "auto", "none"):
        return None
    if not request.tools:
        raise APIError(400, f"tool_choice={choice!r} needs tools to choose from: send tools", "tool_choice")
    return extra.pop("tool_choice")


def response_format_of(
    request: _Request, tokenizer: Any, tool_choice: Any = None
) -> tuple[dict[str, Any] | None, str]:
    """The grammar the answer must follow, and the field it comes from: the request's ``response_format``, or
    one tool call when ``tool_choice`` forces it (``tool_grammar.py``: the call's arguments under the tool's
    schema). It is compiled with the request (``request_of``)."""
    fmt, param = request.response_format, "response_format"
    if fmt == {"type": "text"}:
        fmt = None
    if tool_choice is not None:
        if fmt is not None:
            raise APIError(
                400, "give either response_format or a forced tool_choice, not both", "tool_choice"
            )
        from mlx_dgemma.decoding.tool_grammar import tool_call_grammar

        # _forced_tool_choice forces calls only in chats that send tools
        assert isinstance(request, ChatRequest) and request.tools is not None
        try:
            fmt, param = (
                {"type": "lark", "lark": tool_call_grammar(request.tools, tool_choice, tokenizer)},
                "tool_choice",
            )
        except DGemmaError as e:
            raise APIError(
                400, f"tool_choice: {e}".replace("tool_choice: tool_choice", "tool_choice"), "tool_choice"
            ) from None
    return fmt, param
