"""Bounded constrained answers (issue 28): a canvas whose grammar projection fights the model for
``FOUGHT_STEPS`` steps in a row closes the answer with the shortest completion, so that a forced tool call the
model does not want ends in a fixed number of passes; the closing projection itself is checked on its own."""

from __future__ import annotations

import json

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tool_parsers.gemma4 import parse_tool_call

from mlx_dgemma import load
from mlx_dgemma.decoding import constrain, hooks
from mlx_dgemma.decoding.constrain import FOUGHT_STEPS, make_constraint
from mlx_dgemma.decoding.tool_grammar import tool_call_grammar
from mlx_dgemma.generation import Done, stream_generate
from mlx_dgemma.model.loader import DEFAULT_MODEL, load_tokenizer
from tests.conftest import DEMO24

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}


def lark(tool: dict, tokenizer) -> dict:
    return {"type": "lark", "lark": tool_call_grammar([tool], "required", tokenizer)}


def forced(model, tokenizer, tool: dict, prompt: str, **options) -> tuple[str, Done]:
    text = ""
    for event in stream_generate(model, tokenizer, prompt, response_format=lark(tool, tokenizer), **options):
        text += event.text
    assert isinstance(event, Done)
    return text, event


def check_call(tokenizer, text: str, tool: dict) -> dict:
    """The call mlx-lm's Gemma 4 parser reads from ``text``, checked against the tool's schema."""
    assert text.startswith("<|tool_call>") and text.endswith("<tool_call|>")
    call = parse_tool_call(text, [tool])
    assert call["name"] == tool["function"]["name"]
    jsonschema.validate(call["arguments"], tool["function"]["parameters"])
    return call


# --- the closing projection on its own -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


def constraint_for(tokenizer, tool: dict, max_tokens: int = 256, canvas: int = 128):
    return make_constraint(
        tokenizer, [1, 5], 0, 1024, max_tokens, canvas, response_format=lark(tool, tokenizer)
    )


def garbage(tokenizer, n: int) -> np.ndarray:
    """What the demo model writes when asked for a call: a record, never the call's tokens."""
    ids = tokenizer.encode(
        '{"name": "Maya", "age": 34, "city": "Oslo", "job": "pilot"} ' * 8, add_special_tokens=False
    )
    return np.array(ids[:n], dtype=np.int32)


def test_a_closing_projection_writes_the_shortest_call_then_the_end(demo_tokenizer):
    c = constraint_for(demo_tokenizer, WEATHER)
    argmax = garbage(demo_tokenizer, 128)
    flat = lambda i: np.zeros(1024, dtype=np.float32)  # noqa: E731 (the model ranks nothing)
    open_ended = c.project(0, argmax, flat)
    assert c.overrode and not c.closing
    assert 1 not in open_ended[:64].tolist()  # not closing: the string goes on with the model's tokens
    assert c.close() and c.closing
    closed = c.project(0, argmax, flat).tolist()
    end = closed.index(1)  # the end token, then pad to the canvas's end
    assert closed[end + 1 :] == [0] * (127 - end)
    text = demo_tokenizer.decode(closed[:end])
    assert text == '<|tool_call>call:get_weather{city:<|"|><|"|>}<tool_call|>'
    check_call(demo_tokenizer, text, WEATHER)


def test_closing_keeps_the_models_tokens_where_the_shortest_call_allows(demo_tokenizer):
    c = constraint_for(demo_tokenizer, ADD)
    want = demo_tokenizer.encode("<|tool_call>call:add{a:7,b:5}<tool_call|>", add_special_tokens=False)
    argmax = np.concatenate([np.array([*want, 1], dtype=np.int32), garbage(demo_tokenizer, 127 - len(want))])
    c.close()
    projected = c.project(0, argmax, lambda i: np.zeros(1024, dtype=np.float32)).tolist()
    assert projected[: len(want)] == want and projected[len(want)] == 1  # the model's own call, then the end
    assert not c.overrode  # the model's end token too: nothing replaced before it


def test_closing_spills_into_the_next_canvas_when_the_call_is_longer(demo_tokenizer):
    c = constraint_for(demo_tokenizer, WEATHER, canvas=24)
    c.close()
    flat = lambda i: np.zeros(1024, dtype=np.float32)  # noqa: E731
    first = c.project(0, garbage(demo_tokenizer, 24), flat)
    assert 1 not in first.tolist()  # 24 tokens hold no whole call
    c.commit(first.tolist())
    second = c.project(24, garbage(demo_tokenizer, 24), flat).tolist()
    text = demo_tokenizer.decode(first.tolist() + second[: second.index(1)])
    check_call(demo_tokenizer, text, WEATHER)


def test_the_pad_after_the_end_is_no_fight():
    argmax = np.array([7, 8, 1, 9, 9], dtype=np.int32)
    assert not constrain._overrode(argmax, np.array([7, 8, 1, 0, 0]), {1})
    assert constrain._overrode(argmax, np.array([7, 3, 1, 0, 0]), {1})
    assert constrain._overrode(argmax, np.array([7, 8, 5, 0, 0]), {1, 5})  # the end token forced early


# --- through the canvas loop ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return load(dtype=mx.float32)


@pytest.mark.parametrize(("tool", "prompt"), [(WEATHER, "Weather in Oslo?"), (ADD, "Add 2 and 3.")])
@pytest.mark.parametrize("seed", [0, 1])
def test_a_forced_call_the_model_fights_closes_at_the_bound(demo, tool, prompt, seed):
    """The demo model knows only records: every step fights the call's grammar, so the first canvas closes the
    call at step FOUGHT_STEPS (the model's own budget is 96 steps a canvas, up to max_tokens)."""
    model, tokenizer = demo
    text, done = forced(model, tokenizer, tool, prompt, max_tokens=512, seed=seed, drafter="none")
    check_call(tokenizer, text, tool)
    assert done.stats.canvases == 1 and done.stats.decoder_passes == FOUGHT_STEPS
    assert done.finish_reason == "stop"


def test_fast_mode_closes_a_fought_call_at_the_same_bound(demo):
    model, tokenizer = demo
    text, done = forced(model, tokenizer, WEATHER, "Weather in Oslo?", max_tokens=256, seed=0, fast=True)
    check_call(tokenizer, text, WEATHER)
    assert done.stats.fast and done.stats.canvases == 1 and done.stats.decoder_passes <= FOUGHT_STEPS + 1


def test_a_spilling_call_takes_one_pass_a_canvas_after_the_bound(monkeypatch):
    """On 24-token canvases the call spans several canvases: after the closing step, each later canvas is one
    pass (the closing projection, then done)."""
    model, tokenizer = load(DEMO24, dtype=mx.float32)
    monkeypatch.setattr(hooks, "FOUGHT_STEPS", 3)
    text, done = forced(
        model, tokenizer, WEATHER, "Fill the record: Maya, 34.", max_tokens=96, seed=0, drafter="none"
    )
    check_call(tokenizer, text, WEATHER)
    assert done.stats.canvases >= 2
    assert done.stats.decoder_passes == 3 + done.stats.canvases - 1


def test_an_answer_the_model_agrees_with_is_not_closed(demo, monkeypatch):
    """The demo model's own record under its schema: the projection does not fight it, the answer is the
    model's (the bound set to one step: any fought step would close it)."""
    model, tokenizer = demo
    monkeypatch.setattr(hooks, "FOUGHT_STEPS", 1)
    schema = json.loads((DEFAULT_MODEL.parents[1] / "demo" / "record_schema.json").read_text())
    prompt = "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi."
    answer = "".join(
        e.text
        for e in stream_generate(model, tokenizer, prompt, 128, seed=0, json_schema=schema, drafter="auto")
    )
    assert json.loads(answer) == {
        "name": "Maya",
        "age": 34,
        "city": "Oslo",
        "job": "pilot",
        "languages": ["Greek", "Hindi"],
    }
