"""``POST /v1/messages`` (issue 28): Anthropic's Messages API through the real ``anthropic`` SDK
(``messages.create``, ``messages.stream``), on the demo weights behind a Gemma-4-style template (see
``test_server_responses.py``: canned answers where a test needs a given answer, grammars where it does not)."""

from __future__ import annotations

import base64
import json
import shutil

import anthropic
import httpx
import jsonschema
import pytest
from test_server_responses import FAST, Script
from test_server_tools import CALL, GEMMA4_TEMPLATE
from test_vision_server import png

from mlx_dgemma.server import BackgroundServer, create_app
from tests.conftest import DEMO24

TOOLS = [
    {
        "name": "read_file",
        "description": "Read a file",
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "lines": {"type": "integer"}},
        },
    }
]
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("anthropic") / "gemma4-style"
    shutil.copytree(DEMO24, folder)
    (folder / "chat_template.jinja").write_text(GEMMA4_TEMPLATE)
    with BackgroundServer(create_app(str(folder))) as srv:
        yield srv


@pytest.fixture()
def client(server) -> anthropic.Anthropic:
    # The SDK sends x-api-key and anthropic-version: accepted and ignored.
    return anthropic.Anthropic(
        base_url=server.url.removesuffix("/v1"), api_key="unused", max_retries=0, timeout=120
    )


def prompt_text(server: BackgroundServer, canned: Script) -> str:
    return server.app.state.served.tokenizer.decode(canned.prompts[-1])


def test_text_system_and_usage(client, server, monkeypatch):
    canned = Script(monkeypatch, ["Hello ", "world."])
    m = client.messages.create(
        model="default", max_tokens=24, system="Be brief.", messages=HELLO, extra_body=FAST
    )
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text == "Hello world."
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == len(canned.prompts[-1])
    assert m.usage.output_tokens > 0
    assert "<start_of_turn>system\nBe brief.<end_of_turn>" in prompt_text(server, canned)


def test_stop_sequences_and_max_tokens(client, monkeypatch):
    Script(monkeypatch, ["Hello world. STOP and more"])
    m = client.messages.create(
        model="default", max_tokens=24, messages=HELLO, stop_sequences=["STOP"], extra_body=FAST
    )
    assert (
        m.content[0].text == "Hello world. "
        and m.stop_reason == "stop_sequence"
        and m.stop_sequence == "STOP"
    )
    Script(monkeypatch, ["Never ending"], finish="length")
    m = client.messages.create(model="default", max_tokens=4, messages=HELLO, extra_body=FAST)
    assert m.stop_reason == "max_tokens" and m.stop_sequence is None and m.content[0].text == "Never ending"


def test_tool_use_and_tool_result_round_trip(client, server, monkeypatch):
    canned = Script(monkeypatch, ["Let me read it.", CALL], ["It says hello world."])
    messages = [{"role": "user", "content": "What is in notes.txt?"}]
    first = client.messages.create(
        model="default", max_tokens=30, messages=messages, tools=TOOLS, extra_body=FAST
    )
    assert first.stop_reason == "tool_use" and [b.type for b in first.content] == ["text", "tool_use"]
    use = first.content[1]
    assert use.name == "read_file" and use.input == {"path": "notes.txt", "lines": 42}
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": use.id,
                    "content": [{"type": "text", "text": "hello world"}],
                }
            ],
        },
    ]
    second = client.messages.create(
        model="default", max_tokens=30, messages=messages, tools=TOOLS, extra_body=FAST
    )
    assert second.content[0].text == "It says hello world." and second.stop_reason == "end_turn"
    prompt = prompt_text(server, canned)
    assert CALL in prompt and '<|tool_response>response:read_file{value:<|"|>hello world<|"|>}' in prompt
    assert "<|tool>declaration:read_file" in prompt


def test_streaming_events(client, monkeypatch):
    canned = Script(monkeypatch, ["Reading ", CALL[:20], CALL[20:]])
    with client.messages.stream(
        model="default", max_tokens=30, messages=HELLO, tools=TOOLS, extra_body=FAST
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert "content_block_delta" in kinds and kinds.count("content_block_start") == 2
    assert (
        "".join(
            e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
        )
        == "Reading "
    )
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.stop_reason == "tool_use"
    assert final.content[0].text == "Reading " and final.content[1].input == {
        "path": "notes.txt",
        "lines": 42,
    }
    # The model's own answer's tokens (the canned text replaces its text, not its count; on this out-of-domain
    # prompt at 3 steps a canvas the demo model may end at once).
    assert final.usage.output_tokens == canned.generated[-1]


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "read_file"}])
def test_a_forced_tool_choice_is_a_valid_call(client, choice):
    """No canned answer: the grammar makes the real model's answer a call."""
    m = client.messages.create(
        model="default",
        max_tokens=48,
        messages=[{"role": "user", "content": "Read it"}],
        tools=TOOLS,
        tool_choice=choice,
        extra_body={"max_denoising_steps": 4, "seed": 1},
    )
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "read_file"
    jsonschema.validate(uses[0].input, TOOLS[0]["input_schema"])


def test_image_blocks(client, server, monkeypatch):
    canned = Script(monkeypatch, ["A picture."])
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png(1)).decode()},
    }
    m = client.messages.create(
        model="default",
        max_tokens=8,
        extra_body=FAST,
        messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}],
    )
    assert m.content[0].text == "A picture."
    assert server.app.state.served.model.vision_args.image_token_id in canned.prompts[-1]


def test_errors_in_anthropics_shape(client, server):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(
            model="default",
            max_tokens=8,
            messages=HELLO,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    assert "server tools" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=HELLO)
    url = f"{server.url}/messages"
    bad = httpx.post(url, json={"max_tokens": 8, "messages": [{"role": "system", "content": "x"}]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert (
        httpx.post(url, content=b"{", headers={"content-type": "application/json"}).json()["type"] == "error"
    )
    ok = httpx.post(
        url,
        headers={"x-api-key": "anything"},
        timeout=120,
        json={
            "max_tokens": 4,
            "messages": HELLO,
            "metadata": {"user_id": "u"},
            "top_k": 5,
            "container": "c",
            **FAST,
        },
    )
    assert ok.status_code == 200, ok.text
    assert ok.headers["X-Ignored-Fields"] == "container, top_k"  # metadata: ignored quietly


def test_count_tokens(client, server, monkeypatch):
    canned = Script(monkeypatch, ["Hi."])
    counted = client.messages.count_tokens(model="default", messages=HELLO, system="Be brief.")
    client.messages.create(model="default", max_tokens=8, messages=HELLO, system="Be brief.", extra_body=FAST)
    assert counted.input_tokens == len(canned.prompts[-1])


def test_thinking_blocks(tmp_path, monkeypatch):
    """The demo template's thinking channel (``thinking: enabled``) comes back as a thinking block."""
    with BackgroundServer(create_app(str(DEMO24))) as srv:
        client = anthropic.Anthropic(
            base_url=srv.url.removesuffix("/v1"), api_key="x", max_retries=0, timeout=120
        )
        Script(monkeypatch, ["First, think.<end_", "of_thought>The answer."])
        thinking = {"type": "enabled", "budget_tokens": 1024}
        m = client.messages.create(
            model="default", max_tokens=30, messages=HELLO, thinking=thinking, extra_body=FAST
        )
        assert [b.type for b in m.content] == ["thinking", "text"]
        assert m.content[0].thinking == "First, think." and m.content[1].text == "The answer."
        with client.messages.stream(
            model="default", max_tokens=30, messages=HELLO, thinking=thinking, extra_body=FAST
        ) as stream:
            final = stream.get_final_message()
        assert [b.type for b in final.content] == ["thinking", "text"] and final.content[
            1
        ].text == "The answer."
        assert json.dumps(final.model_dump())  # the accumulated message is whole


def test_a_failure_after_the_stream_began_is_an_error_event(client, monkeypatch):
    import mlx_dgemma.server.worker as worker_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")
        yield

    monkeypatch.setattr(worker_module, "run_steps", broken)
    stream = client.messages.stream(model="default", max_tokens=4, messages=HELLO, extra_body=FAST)
    with pytest.raises(anthropic.APIStatusError, match="boom"), stream as events:
        list(events)
    with pytest.raises(anthropic.InternalServerError, match="boom") as e:
        client.messages.create(model="default", max_tokens=4, messages=HELLO, extra_body=FAST)
    assert e.value.body["error"]["type"] == "api_error"
