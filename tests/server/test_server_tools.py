"""Tool calls and reasoning (issue 14): mlx-lm's Gemma 4 tool parser on canned model answers, and the real
chat-template round trip of assistant ``tool_calls`` and ``tool`` results, through the ``openai`` client."""

from __future__ import annotations

import dataclasses
import json
import shutil
from typing import Any

import openai
import pytest
from test_server import FAST, HELLO

import mlx_dgemma.server.worker as worker_module
from mlx_dgemma import Commit
from mlx_dgemma.server import BackgroundServer, create_app
from mlx_dgemma.server.output import OutputParser
from tests.conftest import DEMO24

# A Gemma-4-style template (the demo model's own does not render tools): tool declarations, the model's calls
# as <|tool_call>call:name{key:<|"|>value<|"|>}<tool_call|>, results as <|tool_response>response:name{...}.
GEMMA4_TEMPLATE = """{{- bos_token -}}
{%- if tools -%}<start_of_turn>system
{%- for t in tools -%}<|tool>declaration:{{ t.function.name }}{{ t.function.parameters | tojson }}<tool|>{%- endfor -%}
<end_of_turn>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'tool' -%}
{{- '<|tool_response>response:' + message.name + '{value:<|"|>' + message.content + '<|"|>}<tool_response|>' -}}
{%- else -%}
{{- '<start_of_turn>' + ('model' if message.role == 'assistant' else message.role) + '\n' -}}
{{- message.content or '' -}}
{%- for call in message.tool_calls or [] -%}
{{- '<|tool_call>call:' + call.function.name + '{' -}}
{%- for k, v in call.function.arguments.items() -%}
{{- k + ':' -}}{%- if v is string -%}{{- '<|"|>' + v + '<|"|>' -}}{%- else -%}{{- v | tojson -}}{%- endif -%}
{%- if not loop.last -%},{%- endif -%}
{%- endfor -%}
{{- '}<tool_call|>' -}}
{%- endfor -%}
{{- '<end_of_turn>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<start_of_turn>model
{% endif -%}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "lines": {"type": "integer"}},
            },
        },
    }
]
CALL = '<|tool_call>call:read_file{path:<|"|>notes.txt<|"|>,lines:42}<tool_call|>'


class Canned:
    """The worker's generation, with the committed text replaced by canned pieces (one Commit each): the real
    model runs (so every other field is real), the answer is what the test needs. Records the prompts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.pieces: list[str] = []
        self.prompts: list[list[int]] = []
        real = worker_module.run_steps

        def canned(model: Any, tokenizer: Any, request: Any):
            self.prompts.append(list(request.ids))
            pieces, first = list(self.pieces), True
            for event in real(model, tokenizer, request):
                if isinstance(event, Commit):
                    if first:
                        for piece in pieces:
                            yield dataclasses.replace(event, text=piece)
                        first = False
                    continue
                yield event

        monkeypatch.setattr(worker_module, "run_steps", canned)


@pytest.fixture(scope="module")
def gemma4_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools") / "gemma4-style"
    shutil.copytree(DEMO24, folder)
    (folder / "chat_template.jinja").write_text(GEMMA4_TEMPLATE)
    with BackgroundServer(create_app(str(folder))) as srv:
        yield srv


@pytest.fixture()
def agent(gemma4_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gemma4_server.url, api_key="unused", max_retries=0, timeout=600)


def test_the_tokenizer_infers_mlx_lms_gemma4_parser(gemma4_server):
    tokenizer = gemma4_server.app.state.served.tokenizer
    assert tokenizer.tool_call_start == "<|tool_call>" and tokenizer.tool_parser.__module__.endswith("gemma4")


def test_a_two_turn_tool_exchange_through_the_openai_client(agent, gemma4_server, monkeypatch):
    canned = Canned(monkeypatch)
    canned.pieces = ["Let me read it.", CALL]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is in notes.txt?"}]
    first = agent.chat.completions.create(
        model="default", messages=messages, tools=TOOLS, max_tokens=30, extra_body=FAST
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "read_file" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"path": "notes.txt", "lines": 42}
    assert choice.message.content == "Let me read it."

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "hello world"},
    ]
    canned.pieces = ["It says hello world."]
    second = agent.chat.completions.create(
        model="default", messages=messages, tools=TOOLS, max_tokens=30, extra_body=FAST
    )
    assert second.choices[0].finish_reason != "tool_calls"
    assert (
        second.choices[0].message.content == "It says hello world."
        and not second.choices[0].message.tool_calls
    )
    # The real template rendered the call and its result back into the second prompt.
    prompt = gemma4_server.app.state.served.tokenizer.decode(canned.prompts[-1])
    assert CALL in prompt and '<|tool_response>response:read_file{value:<|"|>hello world<|"|>}' in prompt
    assert "<|tool>declaration:read_file" in prompt


def test_streamed_tool_calls(agent, monkeypatch):
    canned = Canned(monkeypatch)
    canned.pieces = ["Reading <|tool_", CALL.removeprefix("<|tool_")[:20], CALL.removeprefix("<|tool_")[20:]]
    chunks = list(
        agent.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Go"}],
            tools=TOOLS,
            max_tokens=30,
            stream=True,
            extra_body=FAST,
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Reading "  # the marker's first half was held back, never sent as text
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "read_file"
    assert json.loads(calls[0].function.arguments) == {"path": "notes.txt", "lines": 42}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]


def test_without_tools_a_call_stays_text(agent, monkeypatch):
    Canned(monkeypatch).pieces = [CALL]
    r = agent.chat.completions.create(model="default", messages=HELLO, max_tokens=30, extra_body=FAST)
    assert r.choices[0].message.content == CALL and not r.choices[0].message.tool_calls


# --- reasoning ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_server():
    with BackgroundServer(create_app(str(DEMO24))) as srv:
        yield srv


def test_thinking_is_returned_in_reasoning_content(demo_server, monkeypatch):
    client = openai.OpenAI(base_url=demo_server.url, api_key="unused", max_retries=0, timeout=600)
    Canned(monkeypatch).pieces = ["First, think.<end_", "of_thought>The answer."]
    thinking = {**FAST, "chat_template_kwargs": {"enable_thinking": True}}
    r = client.chat.completions.create(model="default", messages=HELLO, max_tokens=30, extra_body=thinking)
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == "First, think." and message.content == "The answer."
    chunks = list(
        client.chat.completions.create(
            model="default", messages=HELLO, max_tokens=30, stream=True, extra_body=thinking
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "First, think."
    assert "".join(d.content or "" for d in deltas) == "The answer."
    plain = client.chat.completions.create(model="default", messages=HELLO, max_tokens=30, extra_body=FAST)
    assert "reasoning_content" not in plain.choices[0].message.model_extra  # thinking off: text as it came
    assert plain.choices[0].message.content == "First, think.<end_of_thought>The answer."


def test_output_parser_holds_back_only_possible_markers():
    class Tok:
        chat_template = "<end_of_thought>"
        tool_call_start, tool_call_end = "<|tool_call>", "<tool_call|>"

        @staticmethod
        def tool_parser(text: str, tools: Any) -> dict[str, Any]:
            return {"name": "f", "arguments": {"raw": text}}

    p = OutputParser(Tok(), thinking=True, tools=True, prompt_tail="model\n<start_of_thought>")
    assert p.feed("abc<end") == [("reasoning", "abc")]
    assert p.feed("_of_thought>x < y <|to") == [("content", "x < y ")]
    assert p.feed("ol_call>call:f{}<tool_call|> done") == [("content", " done")]
    rest, calls = p.finish()
    assert rest == [] and calls[0]["function"] == {"name": "f", "arguments": '{"raw": "call:f{}"}'}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "read_file"}}])
def test_a_forced_tool_call_returns_valid_tool_calls(agent, choice):
    """No canned answer: the demo model knows nothing of tools, and the grammar still makes its answer a call."""
    import jsonschema

    r = agent.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Read notes.txt"}],
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=48,
        seed=1,
        extra_body={"max_denoising_steps": 4},
    )
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "read_file"
    jsonschema.validate(json.loads(calls[0].function.arguments), TOOLS[0]["function"]["parameters"])


def test_a_forced_tool_call_needs_tools(agent):
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        agent.chat.completions.create(model="default", messages=HELLO, tool_choice="required", max_tokens=8)
