"""``POST /v1/responses`` (issue 28): the Responses API through the real ``openai`` SDK (``responses.create``,
``responses.stream``, ``responses.parse``) and an ``openai-agents`` agent with a function tool.

The server is the demo weights behind a Gemma-4-style template (``test_server_tools.GEMMA4_TEMPLATE``), so that
function tools and their results render; canned answers (``test_server_tools.Canned``) stand in for the model
where a test needs a given answer, and grammars (json_schema, a forced tool call) make the real model's answer
valid where it does not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from test_server_tools import CALL, GEMMA4_TEMPLATE
from test_vision_server import data_url, png

import mlx_dgemma.server.worker as worker_module
from mlx_dgemma import Commit
from mlx_dgemma.generation import Done
from mlx_dgemma.server import BackgroundServer, create_app
from mlx_dgemma.server.responses import ResponseStore
from tests.conftest import DEMO24

FAST = {"max_denoising_steps": 3, "seed": 0}
TOOLS = [
    {
        "type": "function",
        "name": "read_file",
        "description": "Read a file",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "lines": {"type": "integer"}},
        },
    }
]


class Script:
    """The worker's generation with canned answers, in turn (the last one repeats): the real model runs (so every
    other field is real) and its committed text is replaced by the answer's pieces (one Commit each), as in
    ``test_server_tools.Canned``; the answer then ends as ``finish`` says (default: at an end of turn, "stop"; None:
    as the real model's did). Records the prompts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *answers: list[str], finish: str | None = "stop"):
        self.answers, self.prompts, self.generated = (
            list(answers),
            [],
            [],
        )  # generated: the model's own tokens
        real = worker_module.run_steps

        def canned(model: Any, tokenizer: Any, request: Any):
            self.prompts.append(list(request.ids))
            pieces, first = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0], True
            for event in real(model, tokenizer, request):
                if isinstance(event, Commit):
                    if first:
                        for piece in pieces:
                            yield dataclasses.replace(event, text=piece)
                        first = False
                    continue
                if isinstance(event, Done):
                    self.generated.append(event.stats.generated_tokens)
                if isinstance(event, Done) and finish is not None:
                    event = dataclasses.replace(event, finish_reason=finish)
                yield event

        monkeypatch.setattr(worker_module, "run_steps", canned)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("responses") / "gemma4-style"
    shutil.copytree(DEMO24, folder)
    (folder / "chat_template.jinja").write_text(GEMMA4_TEMPLATE)
    with BackgroundServer(create_app(str(folder))) as srv:
        yield srv


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def prompt_text(server: BackgroundServer, canned: Script) -> str:
    return server.app.state.served.tokenizer.decode(canned.prompts[-1])


def test_text_instructions_and_usage(client, server, monkeypatch):
    canned = Script(monkeypatch, ["Hello ", "world."])
    r = client.responses.create(
        model="default", input="Hi there", instructions="Be brief.", max_output_tokens=24, extra_body=FAST
    )
    assert r.status == "completed" and r.output_text == "Hello world." and r.object == "response"
    assert r.id.startswith("resp_") and r.instructions == "Be brief." and r.output[0].type == "message"
    assert r.usage.input_tokens == len(canned.prompts[-1]) and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    prompt = prompt_text(server, canned)
    assert (
        "<start_of_turn>system\nBe brief.<end_of_turn>" in prompt
        and "<start_of_turn>user\nHi there" in prompt
    )


def test_previous_response_id_continues_the_conversation(client, server, monkeypatch):
    canned = Script(monkeypatch, ["First answer."], ["Second answer."])
    first = client.responses.create(
        model="default",
        input="Question one",
        instructions="Only once.",
        max_output_tokens=24,
        extra_body=FAST,
    )
    second = client.responses.create(
        model="default",
        input="Question two",
        previous_response_id=first.id,
        max_output_tokens=24,
        extra_body=FAST,
    )
    assert second.output_text == "Second answer." and second.previous_response_id == first.id
    prompt = prompt_text(server, canned)
    assert prompt.index("Question one") < prompt.index("First answer.") < prompt.index("Question two")
    assert "Only once." not in prompt  # as OpenAI does: instructions are not carried over
    # A streamed response is stored too, and continues the chain.
    canned.answers = [["Third answer."], ["Fourth answer."]]
    with client.responses.stream(
        model="default",
        input="Question three",
        previous_response_id=second.id,
        max_output_tokens=24,
        extra_body=FAST,
    ) as stream:
        third = stream.get_final_response()
    client.responses.create(
        model="default",
        input="Question four",
        previous_response_id=third.id,
        max_output_tokens=24,
        extra_body=FAST,
    )
    prompt = prompt_text(server, canned)
    assert prompt.index("Second answer.") < prompt.index("Question three") < prompt.index("Third answer.")
    # store: false keeps a response out of the store.
    unstored = client.responses.create(
        model="default", input="Hi", store=False, max_output_tokens=8, extra_body=FAST
    )
    with pytest.raises(openai.NotFoundError, match="is not stored on this server"):
        client.responses.create(
            model="default", input="Hi", previous_response_id=unstored.id, max_output_tokens=8
        )


def test_the_store_is_bounded_in_count_and_bytes():
    store = ResponseStore(max_count=2, max_bytes=100)
    store.put("a", [{"role": "user", "content": "a"}], 10)
    store.put("b", [], 10)
    store.get("a")  # used: b is now the least recently used
    store.put("c", [], 10)
    assert set(store.entries) == {"a", "c"}
    store.put("d", [], 95)  # over the count and the bytes: the least recently used go
    assert set(store.entries) == {"d"} and store.bytes == 95
    store.put("e", [], 101)  # larger than the whole store: not stored
    assert "e" not in store.entries


def test_function_tools_and_their_outputs(client, server, monkeypatch):
    canned = Script(monkeypatch, ["Let me read it.", CALL], ["It says hello world."], ["Done."])
    first = client.responses.create(
        model="default", input="What is in notes.txt?", tools=TOOLS, max_output_tokens=30, extra_body=FAST
    )
    message, call = first.output
    assert message.type == "message" and message.content[0].text == "Let me read it."
    assert call.type == "function_call" and call.name == "read_file" and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"path": "notes.txt", "lines": 42}
    # Round trip through input items (as agents send them): the output items, then the tool's output.
    items = [
        *(item.model_dump(exclude_none=True) for item in first.output),
        {"type": "function_call_output", "call_id": call.call_id, "output": "hello world"},
    ]
    second = client.responses.create(
        model="default",
        input=[{"role": "user", "content": "What is in notes.txt?"}, *items],
        tools=TOOLS,
        max_output_tokens=30,
        extra_body=FAST,
    )
    assert second.output_text == "It says hello world."
    prompt = prompt_text(server, canned)
    assert CALL in prompt and '<|tool_response>response:read_file{value:<|"|>hello world<|"|>}' in prompt
    # And through previous_response_id: only the tool's output is new.
    third = client.responses.create(
        model="default",
        previous_response_id=first.id,
        tools=TOOLS,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "hello world"}],
        max_output_tokens=30,
        extra_body=FAST,
    )
    assert third.output_text == "Done."
    assert CALL in prompt_text(server, canned) and 'hello world<|"|>}' in prompt_text(server, canned)


def test_streaming_events(client, monkeypatch):
    Script(monkeypatch, ["Reading ", CALL[:20], CALL[20:]])
    with client.responses.stream(
        model="default", input="Go", tools=TOOLS, max_output_tokens=30, extra_body=FAST
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.function_call_arguments.delta" in kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert text == "Reading " and json.loads(arguments) == {"path": "notes.txt", "lines": 42}
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output_text == "Reading " and final.usage.output_tokens > 0


def test_json_schema_format_is_a_grammar(client):
    """No canned answer: the grammar makes the real model's answer valid."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model="default",
        input="Fill the record: Meet Maya, 34, a pilot.",
        max_output_tokens=48,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
        extra_body={"max_denoising_steps": 4, "seed": 1},
    )
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "read_file"}])
def test_a_forced_tool_choice_is_a_valid_call(client, choice):
    r = client.responses.create(
        model="default",
        input="Read notes.txt",
        tools=TOOLS,
        tool_choice=choice,
        max_output_tokens=48,
        extra_body={"max_denoising_steps": 4, "seed": 1},
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "read_file"
    jsonschema.validate(json.loads(calls[0].arguments), TOOLS[0]["parameters"])


def test_image_input(client, server, monkeypatch):
    canned = Script(monkeypatch, ["A picture."])
    content = [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": data_url(png(1)), "detail": "auto"},
    ]
    r = client.responses.create(
        model="default", input=[{"role": "user", "content": content}], max_output_tokens=8, extra_body=FAST
    )
    assert r.output_text == "A picture." and r.usage.input_tokens > 100  # the image's soft tokens
    assert server.app.state.served.model.vision_args.image_token_id in canned.prompts[-1]


def test_errors_and_ignored_fields(server):
    url = f"{server.url}/responses"
    bad = httpx.post(url, json={"input": "Hi", "tools": [{"type": "web_search"}]})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    assert "only function tools" in bad.json()["error"]["message"]
    assert httpx.post(url, json={"input": [{"type": "file_search_call"}]}).status_code == 400
    assert httpx.post(url, json={"input": "Hi", "model": "gpt-4o"}).status_code == 404
    too_long = httpx.post(url, json={"input": "Hi", "max_output_tokens": 10**9})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert (
        too_long.json()["error"]["param"] == "max_output_tokens"
    )  # the chat path's error, in this API's names
    assert "max_output_tokens=1000000000" in too_long.json()["error"]["message"]
    assert httpx.post(url, json={"input": "Hi", "stream": "yes"}).json()["error"]["param"] == "stream"
    ok = httpx.post(
        url,
        json={
            "input": "Hi",
            "max_output_tokens": 4,
            "truncation": "auto",
            "include": [],
            "top_p": 0.9,
            "metadata": {"a": "b"},
            **FAST,
        },
        timeout=120,
    )
    assert ok.status_code == 200, ok.text
    assert ok.headers["X-Ignored-Fields"] == "include, truncation, top_p"  # metadata: ignored quietly


def test_an_openai_agents_agent_runs_a_function_tool(server, monkeypatch):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"Sunny in {city}"

    script = Script(
        monkeypatch,
        ['<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'],
        ["It is sunny in Oslo."],
    )
    client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    provider = agents.OpenAIProvider(openai_client=client, use_responses=True)
    config = agents.RunConfig(model_provider=provider)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the tool.",
        tools=[get_weather],
        model="default",
        model_settings=agents.ModelSettings(max_tokens=30, extra_body=FAST),
    )

    async def run() -> tuple[Any, Any, list[str]]:
        result = await agents.Runner.run(agent, "Weather in Oslo?", run_config=config)
        # Streamed (responses.create(stream=True) under the hood): the same kind of run, event by event.
        script.answers = [
            ['<|tool_call>call:get_weather{city:<|"|>Bergen<|"|>}<tool_call|>'],
            ["Rain in Bergen."],
        ]
        streamed = agents.Runner.run_streamed(agent, "Weather in Bergen?", run_config=config)
        kinds = [event.type async for event in streamed.stream_events()]
        return result, streamed, kinds

    result, streamed, kinds = asyncio.run(asyncio.wait_for(run(), 300))
    assert calls == ["Oslo", "Bergen"]
    assert result.final_output == "It is sunny in Oslo." and streamed.final_output == "Rain in Bergen."
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds


def test_max_output_tokens_reached_is_incomplete(client, monkeypatch):
    Script(monkeypatch, ["Never ", "ending"], finish="length")
    r = client.responses.create(model="default", input="Hi", max_output_tokens=4, extra_body=FAST)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "Never ending" and r.output[0].status == "incomplete"
    with client.responses.stream(model="default", input="Hi", max_output_tokens=4, extra_body=FAST) as stream:
        kinds = [e.type for e in stream]
    assert kinds[-1] == "response.incomplete"


def test_reasoning_items(monkeypatch):
    """``reasoning.effort`` turns the demo template's thinking channel on: the thought is a reasoning item."""
    with BackgroundServer(create_app(str(DEMO24))) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
        Script(monkeypatch, ["First, think.<end_", "of_thought>The answer."])
        r = client.responses.create(
            model="default", input="Hi", reasoning={"effort": "low"}, max_output_tokens=30, extra_body=FAST
        )
        assert [item.type for item in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == "First, think." and r.output_text == "The answer."
        with client.responses.stream(
            model="default", input="Hi", reasoning={"effort": "low"}, max_output_tokens=30, extra_body=FAST
        ) as stream:
            events = list(stream)
            final = stream.get_final_response()
        assert (
            "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "First, think."
        )
        assert [item.type for item in final.output] == [
            "reasoning",
            "message",
        ] and final.output_text == "The answer."
        plain = client.responses.create(model="default", input="Hi", max_output_tokens=30, extra_body=FAST)
        assert (
            plain.output_text == "First, think.<end_of_thought>The answer."
        )  # thinking off: text as it came


def test_a_failure_after_the_stream_began_is_response_failed(client, monkeypatch):
    def broken(*args: Any, **kwargs: Any):
        raise RuntimeError("boom")
        yield

    monkeypatch.setattr(worker_module, "run_steps", broken)
    with client.responses.stream(model="default", input="Hi", max_output_tokens=4, extra_body=FAST) as stream:
        events = list(stream)
    assert events[0].type == "response.created" and events[-1].type == "response.failed"
    assert "boom" in events[-1].response.error.message
    with pytest.raises(openai.InternalServerError, match="boom"):
        client.responses.create(model="default", input="Hi", max_output_tokens=4, extra_body=FAST)
