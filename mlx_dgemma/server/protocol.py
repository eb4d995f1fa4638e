"""The OpenAI wire format: request schemas, the field policy, and the translation into a generation plan.

Everything here is pure (no MLX calls, no I/O): the app validates a request and tokenizes its prompt with
these functions before the request is queued, so that every client error is an HTTP 4xx with the OpenAI
error shape, and the worker only ever sees plans it can serve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import DGemmaError
from ..generation import UNSUPPORTED, sampler_config
from ..model import Model

MIN_TEMPERATURE = 0.01  # temperature 0 (greedy in OpenAI terms) is served as this: the schedule's floor
GREEDY_SEED = 0  # temperature 0 without a seed uses this one, so that it is reproducible as clients expect

# Fields that change nothing for us: accepted and ignored.
IGNORED = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
    "safety_identifier", "parallel_tool_calls",
})

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
    "suffix": (("",), "infilling is not supported by this server"),
    "tool_choice": (("auto", "none"), "the model cannot be forced to call a tool"),
    "modalities": ((["text"],), "this server is text only"),
    "functions": ((), "use tools"),
    "function_call": ((), "use tools and tool_choice"),
    "audio": ((), "this server is text only"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "this server has no web search"),
    "reasoning_effort": ((), "use chat_template_kwargs: {\"enable_thinking\": true}"),
    "verbosity": ((), "ask for brevity in the prompt"),
}

_TEMPLATE_RESERVED = frozenset({"messages", "conversation", "tools", "add_generation_prompt", "tokenize"})


class APIError(Exception):
    """An error answered to the client in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    """``stream_options``: OpenAI's ``include_usage``, and our ``include_drafts`` extension."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_drafts: bool = False


class _Request(BaseModel):
    """Fields shared by both endpoints. Other fields go to ``model_extra`` and through the field policy."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    max_denoising_steps: int | None = Field(None, ge=1)
    t_max: float | None = Field(None, ge=0)
    t_min: float | None = Field(None, ge=0)
    entropy_bound: float | None = Field(None, gt=0)
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema (+ regex, lark): constrain.py


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Request):
    """``POST /v1/completions``: a raw prompt, no chat template."""

    prompt: str | list[str] | list[int] | list[list[int]]


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
    drafts: bool = False
    cache_points: tuple[int, ...] = ()  # prompt prefixes worth keeping in the prompt cache (besides the whole)
    response_format: dict[str, Any] | None = None  # checked by ``response_format_of``


Kind = Literal["chat", "completion"]


def parse(kind: Kind, data: Any) -> ChatRequest | CompletionRequest:
    """Validate a decoded JSON body; raise ``APIError(400)`` naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    schema = ChatRequest if kind == "chat" else CompletionRequest
    try:
        request = schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"invalid field {param!r}: {err['msg']}", param) from None
    check_extra_fields(request.model_extra or {})
    return request


def check_extra_fields(extra: dict[str, Any]) -> None:
    """Apply the field policy to the fields the schema does not model: ignore, accept at neutral, or 400."""
    for name, value in extra.items():
        if name in IGNORED or value is None:
            continue
        if name not in NEUTRAL:
            raise APIError(400, f"unknown field {name!r}: it is not an OpenAI or DiffusionGemma request field",
                           name)
        neutral, why = NEUTRAL[name]
        if not any(_same(value, n) for n in neutral):
            raise APIError(400, f"{name}={value!r} is not supported: {why}", name)


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
        "max_denoising_steps": request.max_denoising_steps, "t_max": request.t_max, "t_min": request.t_min,
        "entropy_bound": request.entropy_bound,
    }
    if request.temperature is not None:
        if request.t_max is not None or request.t_min is not None:
            raise APIError(400, "give either temperature or t_max/t_min, not both", "temperature")
        base = sampler_config(model)
        t = max(request.temperature, MIN_TEMPERATURE)
        opts["t_max"], opts["t_min"] = t, t * base.t_min / base.t_max
    try:
        sampler_config(model, **opts)
    except DGemmaError as e:
        param = next((k for k in opts if k in str(e)), None)
        raise APIError(400, str(e), param) from None
    return {k: v for k, v in opts.items() if v is not None}


def seed_of(request: _Request) -> int | None:
    """The request's seed; temperature 0 without one gets ``GREEDY_SEED`` (reproducible, like greedy)."""
    if request.seed is None and request.temperature == 0:
        return GREEDY_SEED
    return None if request.seed is None else request.seed % 2**64  # MLX keys take 0 <= seed < 2**64


def stops_of(request: _Request) -> list[str]:
    stop = request.stop
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    return [s for s in stops if s]


def chat_prompt_ids(request: ChatRequest, tokenizer: Any) -> tuple[list[int], int | None]:
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
    messages = [_message(i, m) for i, m in enumerate(request.messages)]
    kwargs = dict(request.chat_template_kwargs or {})
    bad = _TEMPLATE_RESERVED & set(kwargs)
    if bad:
        raise APIError(400, f"chat_template_kwargs may not set {sorted(bad)[0]!r}", "chat_template_kwargs")
    if request.tools and _tool_choice(request) != "none":
        if "tools" not in template:
            raise APIError(400, "this model's chat template does not accept tool definitions", "tools")
        kwargs["tools"] = request.tools
    ids = _render(tokenizer, messages, True, kwargs)
    history = _render(tokenizer, messages, False, kwargs)
    return ids, len(history) if 0 < len(history) < len(ids) and ids[: len(history)] == history else None


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool,
            kwargs: dict[str, Any]) -> list[int]:
    # As ``encode_prompt`` does: without enable_thinking, the template's own default (mlx-lm's wrapper would
    # switch thinking on when it spots thinking tokens in the vocabulary).
    render = tokenizer if "enable_thinking" in kwargs else getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        text = render.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False,
                                          **kwargs)
    except Exception as e:  # jinja raises on messages the template rejects (roles out of order, ...)
        raise APIError(400, f"the chat template rejected the messages: {e}", "messages") from None
    # The template writes its own <bos>; don't let the tokenizer add another.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _tool_choice(request: ChatRequest) -> Any:
    return (request.model_extra or {}).get("tool_choice")


def _message(i: int, message: dict[str, Any]) -> dict[str, Any]:
    """One chat message for the template: text parts joined, ``developer`` read as ``system``."""
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise APIError(400, f"messages[{i}].role must be system, developer, user, assistant or tool (got {role!r})",
                       f"messages.{i}.role")
    out = {**message, "role": "system" if role == "developer" else role}
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", f"messages.{i}.content")
            texts.append(part["text"])
        out["content"] = "".join(texts)
    elif content is not None and not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                       f"messages.{i}.content")
    elif content is None and role != "assistant":
        raise APIError(400, f"messages[{i}].content is missing", f"messages.{i}.content")
    return out


def completion_prompt_ids(request: CompletionRequest, tokenizer: Any) -> list[int]:
    """The raw prompt (one string or one list of token ids) as token ids."""
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise APIError(400, f"prompt has {len(prompt)} prompts: send one per request", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt is empty", "prompt")
        return list(tokenizer.encode(prompt))
    if not prompt:
        raise APIError(400, "prompt is empty", "prompt")
    vocab = getattr(tokenizer, "vocab_size", None) or math.inf
    if any(t < 0 or t >= vocab for t in prompt):
        raise APIError(400, f"prompt has token ids outside the vocabulary (0..{vocab - 1})", "prompt")
    return list(prompt)


def max_tokens_of(request: _Request, prompt_tokens: int, context: int, canvas: int) -> int:
    """The exact answer limit; raise ``APIError(400)`` naming both numbers when the prompt does not fit.

    Canvases are denoised whole, so the last one needs all its positions: the prompt plus ``max_tokens``
    rounded up to whole canvases must fit in ``context``. Without ``max_tokens``, the answer may use all the
    room there is.
    """
    room = (context - prompt_tokens) // canvas * canvas
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, but the context length is {context} "
                            f"(and one {canvas}-token canvas must fit after the prompt): shorten the prompt",
                       "messages" if isinstance(request, ChatRequest) else "prompt", "context_length_exceeded")
    asked = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if asked is None:
        return room
    if asked > room:
        name = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        raise APIError(400, f"the context length is {context} tokens, but {prompt_tokens} prompt tokens plus "
                            f"{name}={asked} (rounded up to {canvas}-token canvases: "
                            f"{prompt_tokens + math.ceil(asked / canvas) * canvas}) do not fit: "
                            f"at most {room} new tokens", name, "context_length_exceeded")
    return asked


def plan(kind: Kind, request: ChatRequest | CompletionRequest, tokenizer: Any, model: Model,
         context: int) -> Plan:
    """Everything the worker needs, validated: raises ``APIError`` on any client error."""
    sampler = schedule(request, model)
    history = None
    if isinstance(request, ChatRequest):
        ids, history = chat_prompt_ids(request, tokenizer)
    else:
        assert isinstance(request, CompletionRequest)
        ids = completion_prompt_ids(request, tokenizer)
    max_tokens = max_tokens_of(request, len(ids), context, model.args.canvas_length)
    options = request.stream_options or StreamOptions()
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    return Plan(ids, max_tokens, stops_of(request), seed_of(request), sampler, request.stream,
                options.include_usage, options.include_drafts, () if history is None else (history,),
                response_format=response_format_of(request, tokenizer, model, max_tokens))


def response_format_of(request: _Request, tokenizer: Any, model: Model, max_tokens: int) -> dict[str, Any] | None:
    """The request's ``response_format`` if it constrains the answer; compiled here so that a bad schema,
    or a ``max_tokens`` too small for it, is a 400 before the request is queued."""
    fmt = request.response_format
    if fmt is None or fmt == {"type": "text"}:
        return None
    from ..constrain import make_constraint
    from ..generation import eos_ids

    try:
        make_constraint(tokenizer, sorted(eos_ids(model, tokenizer)), model.args.pad_token_id or 0,
                        model.args.vocab_size, max_tokens, model.args.canvas_length, response_format=fmt)
    except DGemmaError as e:
        raise APIError(400, str(e), "response_format") from None
    return fmt
