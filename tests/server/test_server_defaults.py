"""Server defaults and the tolerant field policy (issue 28): ``--max-tokens``, ``--chat-template-args``, unknown
fields ignored and named in ``X-Ignored-Fields`` (``--strict``: 400s), ``reasoning_effort`` onto the template's
thinking switch. Policy checks call ``protocol.plan`` on the served model (no generation); the HTTP checks
generate a few tokens of the demo model with few denoising steps."""

from __future__ import annotations

import types
from typing import Any

import httpx
import pytest

from mlx_dgemma.errors import DGemmaError
from mlx_dgemma.server import BackgroundServer, create_app, main
from mlx_dgemma.server.protocol import DEFAULT_MAX_TOKENS, APIError, _thinking_of, knows_thinking, parse, plan
from tests.conftest import DEMO24

FAST = {"max_denoising_steps": 3}
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(create_app(str(DEMO24), max_concurrency=8)) as srv:
        yield srv


def plan_of(
    server: BackgroundServer,
    body: dict[str, Any],
    kind: str = "chat",
    strict: bool = False,
    max_tokens: int | None = None,
    template_kwargs: dict[str, Any] | None = None,
):
    served = server.app.state.served
    return plan(
        kind,
        parse(kind, body),
        served.tokenizer,
        served.model,
        served.context_length,
        strict,  # type: ignore[arg-type]
        max_tokens,
        template_kwargs,
    )


def post(server: BackgroundServer, body: dict[str, Any], path: str = "chat/completions") -> httpx.Response:
    return httpx.post(f"{server.url}/{path}", json=body, timeout=600)


# --- --max-tokens ---------------------------------------------------------------------------------------------


def test_the_default_answer_limit_is_512_in_whole_canvases(server):
    canvas = server.app.state.served.model.args.canvas_length
    default = server.app.state.limits.max_tokens
    assert default % canvas == 0 and DEFAULT_MAX_TOKENS <= default < DEFAULT_MAX_TOKENS + canvas
    assert plan_of(server, {"messages": HELLO}, max_tokens=default).max_tokens == default


def test_the_request_s_own_limit_wins_and_zero_means_the_whole_context(server):
    assert plan_of(server, {"messages": HELLO}, max_tokens=40).max_tokens == 40
    assert plan_of(server, {"messages": HELLO, "max_tokens": 100}, max_tokens=40).max_tokens == 100
    assert plan_of(server, {"messages": HELLO, "max_completion_tokens": 7}, max_tokens=40).max_tokens == 7
    whole = plan_of(server, {"messages": HELLO}).max_tokens  # no default: all the room there is
    assert whole > 512 and plan_of(server, {"messages": HELLO}, max_tokens=10**9).max_tokens == whole
    with pytest.raises(APIError) as e:  # the request's own value is still bounded by the context
        plan_of(server, {"messages": HELLO, "max_tokens": 10**9}, max_tokens=40)
    assert e.value.code == "context_length_exceeded"


def test_a_request_without_a_limit_gets_the_server_default(server, monkeypatch):
    body = {"messages": HELLO, "seed": 1, **FAST}
    explicit = post(server, {**body, "max_tokens": 3}).json()
    assert explicit["choices"][0]["finish_reason"] == "length"  # cut by the limit, not ended by the model
    monkeypatch.setattr(server.app.state.limits, "max_tokens", 3)
    default = post(server, body).json()
    assert default["choices"] == explicit["choices"]  # the same answer, cut at the same place
    assert default["usage"]["completion_tokens"] == explicit["usage"]["completion_tokens"] <= 3
    # The Responses bridge translates into a chat request: the same default.
    r = post(server, {"input": "Hello there", "seed": 1, **FAST}, "responses").json()
    assert r["usage"]["output_tokens"] <= 3


def test_bad_defaults_are_refused_before_loading(capsys):
    with pytest.raises(DGemmaError, match="max_tokens"):
        create_app(str(DEMO24), max_tokens=-1)
    with pytest.raises(DGemmaError, match="'tools': it is reserved"):
        create_app(str(DEMO24), chat_template_args={"tools": []})
    with pytest.raises(SystemExit) as e:
        main(
            [
                "--model",
                str(DEMO24),
                "--chat-template-args",
                '{"add_generation_prompt": false}',
                "--port",
                "0",
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'add_generation_prompt': it is reserved" in err and err.count("\n") == 1


# --- --chat-template-args ---------------------------------------------------------------------------------------


def test_chat_template_args_go_under_the_request_s_own(server):
    plain = plan_of(server, {"messages": HELLO})
    on = plan_of(server, {"messages": HELLO}, template_kwargs={"enable_thinking": True})
    assert on.thinking and not plain.thinking and on.prompt_ids != plain.prompt_ids
    own = plan_of(
        server,
        {"messages": HELLO, "chat_template_kwargs": {"enable_thinking": False}},
        template_kwargs={"enable_thinking": True},
    )
    assert not own.thinking
    explicit = plan_of(server, {"messages": HELLO, "chat_template_kwargs": {"enable_thinking": True}})
    assert explicit.prompt_ids == on.prompt_ids


# --- unknown fields ---------------------------------------------------------------------------------------------


def test_unknown_fields_are_ignored_and_named(server, monkeypatch):
    body = {"messages": HELLO, "max_tokens": 2, **FAST, "banana": 1, "prompt_cache_options": {"x": 1}}
    r = post(server, body)
    assert r.status_code == 200 and r.headers["X-Ignored-Fields"] == "banana, prompt_cache_options"
    stream = {**body, "stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}}
    with httpx.stream("POST", f"{server.url}/chat/completions", json=stream, timeout=600) as s:
        text = "".join(s.iter_text())
        assert s.status_code == 200
        assert (
            s.headers["X-Ignored-Fields"]
            == "banana, prompt_cache_options, stream_options.include_obfuscation"
        )
    assert '"usage"' in text and text.endswith("data: [DONE]\n\n")
    monkeypatch.setattr(server.app.state.limits, "strict", True)  # --strict: 400s
    r = post(server, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "banana"
    r = post(server, {**stream, "banana": None, "prompt_cache_options": None})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.include_obfuscation"


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 2),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("echo", True),
        ("audio", {"voice": "alloy"}),
        ("modalities", ["text", "audio"]),
    ],
)
def test_fields_that_change_the_response_s_shape_stay_400s(server, field, value):
    r = post(server, {"messages": HELLO, "max_tokens": 2, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_hints_we_cannot_follow_are_ignored_unless_strict(server):
    body = {"messages": HELLO, "verbosity": "low", "prediction": {"type": "content", "content": "Hi"}}
    assert plan_of(server, body).ignored == ("verbosity", "prediction")
    with pytest.raises(APIError) as e:
        plan_of(server, body, strict=True)
    assert e.value.param == "verbosity"


# --- reasoning_effort -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "effort,on", [("none", False), ("minimal", False), ("low", True), ("medium", True), ("high", True)]
)
def test_reasoning_effort_is_the_thinking_switch(server, effort, on):
    assert knows_thinking(server.app.state.served.tokenizer)  # the demo template reads enable_thinking
    p = plan_of(
        server, {"messages": HELLO, "reasoning_effort": effort}, template_kwargs={"enable_thinking": not on}
    )
    assert p.thinking is on and p.ignored == ()
    switch = plan_of(server, {"messages": HELLO, "chat_template_kwargs": {"enable_thinking": on}})
    assert p.prompt_ids == switch.prompt_ids
    own = {"messages": HELLO, "reasoning_effort": effort, "chat_template_kwargs": {"enable_thinking": not on}}
    assert plan_of(server, own).thinking is (not on)  # the request's own chat_template_kwargs wins


def test_reasoning_effort_without_a_thinking_switch_is_ignored_and_named(server):
    plain = types.SimpleNamespace(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not knows_thinking(plain) and _thinking_of("high", plain, strict=False) is None
    with pytest.raises(APIError) as e:
        _thinking_of("high", plain, strict=True)
    assert e.value.param == "reasoning_effort"
    p = plan_of(
        server, {"prompt": "Hello", "reasoning_effort": "low"}, kind="completion"
    )  # no template at all
    assert p.ignored == ("reasoning_effort",)
    with pytest.raises(APIError) as e:
        plan_of(server, {"messages": HELLO, "reasoning_effort": "maximal"})
    assert e.value.param == "reasoning_effort"


def test_the_bridges_switch_thinking_off_over_a_server_default():
    from mlx_dgemma.server import anthropic

    base = {"model": "default", "max_tokens": 5, "messages": HELLO}
    chat, _ = anthropic.translate({**base, "thinking": {"type": "disabled"}})
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}  # over --chat-template-args
    chat, _ = anthropic.translate(
        {
            **base,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "chat_template_kwargs": {"enable_thinking": False},
        }
    )
    assert chat["chat_template_kwargs"] == {"enable_thinking": False}  # the request's own kwargs win
