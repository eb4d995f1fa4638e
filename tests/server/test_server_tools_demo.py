"""Agent plumbing with the embedded demo model (issue 28), no canned answers: its chat template renders tools,
tool calls, tool results and thinking in Gemma 4's tool syntax, renders every conversation without them exactly as
the template the model was trained on (kept in ``tests/fixtures/demo_chat_template_v1.jinja``), and the server's
forced tool calls come back parsed, valid under the tool's schema, within the bound on fought canvases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from mlx_lm.tool_parsers.gemma4 import parse_tool_call

from mlx_dgemma.decoding.constrain import FOUGHT_STEPS
from mlx_dgemma.model.loader import DEFAULT_MODEL, load_tokenizer
from mlx_dgemma.prompt.chat_template import render
from mlx_dgemma.server import BackgroundServer, create_app
from tests.conftest import HANG_S

OLD_TEMPLATE = Path(__file__).resolve().parents[1] / "fixtures" / "demo_chat_template_v1.jinja"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city"},
                "days": {"type": "integer"},
                "units": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
# Gemma 4's declaration of WEATHER, as its chat template writes it (keys sorted, strings <|"|>-quoted, types upper).
WEATHER_DECLARATION = (
    '<|tool>declaration:get_weather{description:<|"|>The weather in a city<|"|>,parameters:{properties:{'
    'city:{description:<|"|>The city<|"|>,type:<|"|>STRING<|"|>},days:{type:<|"|>INTEGER<|"|>},'
    'units:{enum:[<|"|>c<|"|>,<|"|>f<|"|>],type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],'
    'type:<|"|>OBJECT<|"|>}}<tool|>'
)

SYSTEM, USER = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Fill the record: Maya, 34."},
)
ANSWER = {"role": "assistant", "content": '{"name": "Maya", "age": 34}'}
PLAIN = [
    [USER],
    [SYSTEM, USER],
    [SYSTEM, USER, ANSWER, {"role": "user", "content": "  And Hugo, 51?\n"}],
    [USER, {"role": "model", "content": "<start_of_thought>hm<end_of_thought>  ok "}, USER],
    [USER, {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    [
        {"role": "user", "content": [{"type": "text", "text": "parts "}]},
        {"role": "assistant", "content": None},
    ],
    [USER, ANSWER, {"role": "system", "content": "late system"}, USER, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


# --- the template -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conversation", range(len(PLAIN)))
@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("thinking", [None, False])
def test_a_conversation_without_tools_renders_as_the_trained_template(
    tokenizer, conversation, generation_prompt, thinking
):
    hf = tokenizer._tokenizer
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    messages = PLAIN[conversation]
    new = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
    old = hf.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=generation_prompt,
        chat_template=OLD_TEMPLATE.read_text(),
        **kwargs,
    )
    assert new == old


def test_the_tokenizer_reads_the_new_template_and_infers_the_gemma4_parser(tokenizer):
    shipped = (DEFAULT_MODEL / "chat_template.jinja").read_text()
    config = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())
    assert tokenizer.chat_template == shipped == config["chat_template"]  # the copy in the config agrees
    assert shipped != OLD_TEMPLATE.read_text()
    assert tokenizer.tool_call_start == "<|tool_call>" and tokenizer.tool_parser.__module__.endswith("gemma4")


def test_tools_calls_and_results_render_in_gemma4s_syntax(tokenizer):
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
    }
    messages = [
        SYSTEM,
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "reasoning_content": "Ask the tool.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = render(tokenizer, messages, True, tools=[WEATHER])
    assert text.startswith("<bos><start_of_turn>system\nBe brief." + WEATHER_DECLARATION + "<end_of_turn>\n")
    turn = (
        "<start_of_turn>model\n<start_of_thought>Ask the tool.<end_of_thought>"
        '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>'
        '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
    )
    assert text.endswith(turn)  # the model's turn stays open: it answers after the result, as in Gemma 4
    written = turn[turn.index("<|tool_call>") + len("<|tool_call>") : turn.index("<tool_call|>")]
    assert parse_tool_call(written) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    answered = render(
        tokenizer, [*messages, {"role": "assistant", "content": "Sunny."}], True, tools=[WEATHER]
    )
    assert answered == text + "Sunny.<end_of_turn>\n<start_of_turn>model\n<start_of_thought><end_of_thought>"


def test_arguments_of_every_json_type_round_trip_through_mlx_lms_parser(tokenizer):
    args = {
        "s": 'a "quoted", {braced} text',
        "n": -3,
        "x": 2.5,
        "t": True,
        "f": False,
        "l": [1, "b"],
        "o": {"k": 1},
    }
    call = {"type": "function", "function": {"name": "f", "arguments": args}}
    text = render(tokenizer, [USER, {"role": "assistant", "tool_calls": [call]}], False, tools=[WEATHER])
    written = text[text.index("<|tool_call>") + len("<|tool_call>") : text.index("<tool_call|>")]
    assert parse_tool_call(written) == {"name": "f", "arguments": args}


def test_thinking_is_switched_as_in_gemma4(tokenizer):
    """On: ``<|think|>`` at the top of the system turn, the thought left for the model to open (the server's
    parser reads a ``<start_of_thought>`` it writes); off: the empty thought the model was trained with."""
    on = render(tokenizer, [SYSTEM, USER], True, {"enable_thinking": True})
    off = render(tokenizer, [SYSTEM, USER], True, {"enable_thinking": False})
    assert on == off.replace("system\n", "system\n<|think|>\n").removesuffix(
        "<start_of_thought><end_of_thought>"
    )
    alone = render(tokenizer, [USER], True, {"enable_thinking": True})
    assert alone.startswith("<bos><start_of_turn>system\n<|think|>\n<end_of_turn>\n<start_of_turn>user\n")


def test_a_tool_result_without_its_call_is_refused_in_one_line(tokenizer):
    with pytest.raises(Exception, match="tool message must follow"):
        render(tokenizer, [USER, {"role": "tool", "content": "x"}], True, tools=[WEATHER])


# --- the server, the demo model answering -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(create_app()) as srv:
        yield srv


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=HANG_S)


def forced_call(response: Any, tool: dict[str, Any]) -> dict[str, Any]:
    """The one tool call of ``response``, checked: parsed, valid under the tool's schema, within the bound."""
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    stats = response.model_extra["diffusion"]
    # The model fights the call's grammar: its canvas closes at the bound (one more pass if the drafter's guard
    # restarted it), where it would otherwise run 96 steps a canvas up to max_tokens.
    assert stats["canvases"] == 1 and stats["decoder_passes"] <= FOUGHT_STEPS + 1
    return {"id": call.id, "name": call.function.name, "arguments": arguments}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_tool_call_comes_back_parsed_and_bounded(client, choice):
    r = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice=choice,
        seed=0,
    )
    forced_call(r, WEATHER)


def test_a_tool_result_round_trips_into_the_next_prompt(client, tokenizer):
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = client.chat.completions.create(
        model="default", messages=messages, tools=[WEATHER], tool_choice="required", seed=1
    )
    call = forced_call(first, WEATHER)
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"},
    ]
    second = client.chat.completions.create(
        model="default", messages=messages, tools=[WEATHER], tool_choice="required", seed=1
    )
    forced_call(second, WEATHER)
    # The server rendered the call and its result (named after the call) into the prompt: the same prompt here.
    expected = render(
        tokenizer,
        [
            messages[0],
            {"role": "assistant", "tool_calls": [{"id": call["id"], "function": call}]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"},
        ],
        True,
        tools=[WEATHER],
    )
    assert '<|tool_response>response:get_weather{value:<|"|>sunny, 21 C<|"|>}<tool_response|>' in expected
    assert second.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))


def test_auto_tool_choice_renders_the_tools_and_answers(client, tokenizer):
    messages = [{"role": "user", "content": "Fill the record: Meet Maya, 34, a pilot living in Oslo."}]
    r = client.chat.completions.create(
        model="default", messages=messages, tools=[WEATHER], max_tokens=128, seed=0
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    for call in choice.message.tool_calls or []:  # a call the model writes on its own must parse
        json.loads(call.function.arguments)
    assert choice.message.content or choice.message.tool_calls
    expected = render(tokenizer, messages, True, tools=[WEATHER])
    assert WEATHER_DECLARATION in expected
    assert r.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))
    # One 128-token canvas, the model's own stopping: its 96 steps at most, and the drafter guard's rejected pass.
    assert r.model_extra["diffusion"]["decoder_passes"] <= 96 + 1


def test_thinking_renders_with_tools_and_the_call_stays_bounded(client, tokenizer):
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    r = client.chat.completions.create(
        model="default",
        messages=messages,
        tools=[WEATHER],
        tool_choice="required",
        seed=2,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    forced_call(r, WEATHER)
    expected = render(tokenizer, messages, True, {"enable_thinking": True}, tools=[WEATHER])
    assert expected.startswith("<bos><start_of_turn>system\n<|think|>\n<|tool>declaration:get_weather")
    assert expected.endswith("<end_of_turn>\n<start_of_turn>model\n")  # the model opens its thought, if any
    assert r.usage.prompt_tokens == len(tokenizer.encode(expected, add_special_tokens=False))


def test_the_responses_api_and_anthropic_messages_force_bounded_calls_too(server, client):
    """openai-agents and langchain speak the Responses API; Claude clients Anthropic's: the same call, the same bound."""
    import anthropic

    fn = WEATHER["function"]
    r = client.responses.create(
        model="default",
        input="What is the weather in Oslo?",
        tools=[{"type": "function", **fn}],
        tool_choice="required",
        extra_body={"seed": 0},
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), fn["parameters"])
    assert r.model_extra["diffusion"]["decoder_passes"] <= FOUGHT_STEPS + 1

    claude = anthropic.Anthropic(
        base_url=server.url.removesuffix("/v1"), api_key="unused", max_retries=0, timeout=HANG_S
    )
    m = claude.messages.create(
        model="default",
        max_tokens=256,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[{"name": fn["name"], "description": fn["description"], "input_schema": fn["parameters"]}],
        tool_choice={"type": "any"},
        extra_body={"seed": 0},
    )
    uses = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and len(uses) == 1 and uses[0].name == "get_weather"
    jsonschema.validate(uses[0].input, fn["parameters"])
    assert m.model_extra["diffusion"]["decoder_passes"] <= FOUGHT_STEPS + 1
