"""Structured output (mlx_dgemma.decoding.constrain): on a random model, whose unconstrained output is noise, every
answer under a spread of JSON schemas parses and validates; infill keeps every fixed token; bad input is one
line."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import mlx.core as mx
import pytest

from mlx_dgemma import load
from mlx_dgemma.decoding.constrain import ConstraintError
from mlx_dgemma.generation import Commit, Done, stream_generate
from mlx_dgemma.model.config import ModelArgs
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.model.loader import load_tokenizer, read_config
from tests.conftest import DEMO24

RECORD_SCHEMA = Path(__file__).resolve().parents[2] / "demo" / "record_schema.json"  # the record task's

FAST = {"max_denoising_steps": 3, "drafter": "none"}

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            }
        },
        "required": ["person"],
        "additionalProperties": False,
    },
    "bounded_array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 2,
        "maxItems": 4,
    },
    "enum_number": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["color", "score"],
        "additionalProperties": False,
    },
    "pattern_optional": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "note": {"type": "string", "maxLength": 8},
            "ok": {"type": "boolean"},
        },
        "required": ["code"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def random_model():
    """The demo model's architecture and tokenizer with random weights: unconstrained output is noise."""
    mx.random.seed(7)
    args = ModelArgs.from_config(read_config(DEMO24), source="random")
    model = Model(args, {"eos_token_id": [1, 5], "pad_token_id": 0})
    model.eval()
    return model, load_tokenizer(DEMO24)


class Answer:
    """The answer's text (from the commits: ``Done`` carries statistics) and its ``Done`` event."""

    def __init__(self, events: list):
        self.text = "".join(e.text for e in events if isinstance(e, Commit))
        self.done = events[-1]
        assert isinstance(self.done, Done)
        self.finish_reason, self.stats = self.done.finish_reason, self.done.stats


def answer(model, tokenizer, prompt="Give me the data.", max_tokens=48, seed=0, **kw) -> Answer:
    return Answer(list(stream_generate(model, tokenizer, prompt, max_tokens, seed=seed, **FAST, **kw)))


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_answer_validates_on_a_random_model(random_model, name, fast):
    model, tokenizer = random_model
    for seed in range(3):
        done = answer(model, tokenizer, seed=seed, json_schema=SCHEMAS[name], fast=fast)
        jsonschema.validate(json.loads(done.text), SCHEMAS[name])


def test_unconstrained_random_output_is_not_json(random_model):
    model, tokenizer = random_model
    text = answer(model, tokenizer, max_tokens=24).text
    with pytest.raises(ValueError):
        json.loads(text)


def test_budget_end_closes_the_answer(random_model):
    """A long free string would run past max_tokens: near the end the projection closes it in time."""
    model, tokenizer = random_model
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    for seed in range(2):
        done = answer(model, tokenizer, max_tokens=30, seed=seed, json_schema=schema)
        jsonschema.validate(json.loads(done.text), schema)
        assert done.stats.generated_tokens <= 30


def test_response_format_types(random_model):
    model, tokenizer = random_model
    obj = answer(model, tokenizer, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.text), dict)
    schema = SCHEMAS["enum_number"]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    jsonschema.validate(json.loads(answer(model, tokenizer, response_format=fmt).text), schema)
    assert (
        answer(model, tokenizer, response_format={"type": "regex", "regex": "[a-c]{3}-[0-9]{2}"}).text[3]
        == "-"
    )


@pytest.mark.parametrize("fast", [False, True])
def test_infill_keeps_every_fixed_token(random_model, fast):
    model, tokenizer = random_model
    template = "def add(a, b):\n    return {{4}}\n\nprint(add({{2}}, 2))"
    parts = [
        tokenizer.encode(p, add_special_tokens=False)
        for p in ("def add(a, b):\n    return ", "\n\nprint(add(", ", 2))")
    ]
    fixed = [*parts[0], *[None] * 4, *parts[1], None, None, *parts[2]]
    for seed in range(2):
        events = list(
            stream_generate(model, tokenizer, "Fill it.", 48, seed=seed, **FAST, infill=template, fast=fast)
        )
        tokens = [t for e in events if isinstance(e, Commit) for t in e.tokens]
        assert len(tokens) == len(fixed) and Answer(events).finish_reason == "stop"
        assert all(f is None or f == t for f, t in zip(fixed, tokens))
        assert all(t not in (0, 1, 5) for t in tokens)  # holes hold no pad or end token


def test_demo_model_record_schema():
    model, tokenizer = load(DEMO24)
    schema = json.loads(RECORD_SCHEMA.read_text())
    prompt = "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi."
    done = Answer(
        list(stream_generate(model, tokenizer, prompt, 64, seed=0, max_denoising_steps=8, json_schema=schema))
    )
    record = json.loads(done.text)
    jsonschema.validate(record, schema)
    assert record["name"] == "Maya" and record["age"] == 34


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"json_schema": {"type": "foo"}}, "invalid or unsupported"),
        ({"json_schema": "{not json"}, "not valid JSON"),
        ({"response_format": {"type": "xml"}}, "not supported"),
        (
            {"json_schema": {"type": "array", "items": {"type": "integer"}, "minItems": 20}, "max_tokens": 8},
            "too small",
        ),
        ({"infill": "a {{30}} b", "max_tokens": 8}, "raise max_tokens"),
        ({"infill": "no holes here"}, "no holes"),
        ({"infill": "x {{}} y"}, "needs a size"),
    ],
)
def test_bad_input_is_one_line(random_model, kw, words):
    model, tokenizer = random_model
    kw = {"max_tokens": 24, **kw}
    with pytest.raises(ConstraintError) as e:
        answer(model, tokenizer, **kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_fast_mode_holds_a_schema_the_model_disagrees_with():
    """Fast mode on the trained demo model (which freezes most of a record early) under a schema that forbids
    what the model wants (``maximum: 30`` against the prompt's 34): the committed record holds the schema, with
    the rest of it right, as under the reference sampler. ``test_fast.py`` checks the unfreezing itself."""
    model, tokenizer = load(DEMO24)
    schema = json.loads(RECORD_SCHEMA.read_text())
    schema["properties"]["age"]["maximum"] = 30
    prompt = "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi."
    for fast in (False, True):
        done = Answer(
            list(
                stream_generate(
                    model,
                    tokenizer,
                    prompt,
                    64,
                    seed=0,
                    max_denoising_steps=8,
                    drafter="none",
                    json_schema=schema,
                    fast=fast,
                )
            )
        )
        record = json.loads(done.text)
        jsonschema.validate(record, schema)
        assert record["name"] == "Maya" and record["city"] == "Oslo"


def test_server_response_format_through_the_openai_client():
    import openai

    from mlx_dgemma.server import BackgroundServer, create_app

    schema = json.loads(RECORD_SCHEMA.read_text())
    prompt = [
        {"role": "user", "content": "Fill the record: Leo (41) works as a baker in Lima and speaks Hindi."}
    ]
    with BackgroundServer(create_app(max_concurrency=2)) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=600)
        fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": True}}
        r = client.chat.completions.create(
            model="default",
            messages=prompt,
            max_tokens=64,
            seed=0,
            response_format=fmt,
            extra_body={"max_denoising_steps": 8},
        )
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="default",
                messages=prompt,
                max_tokens=64,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "foo"}},
                },
            )
        assert e.value.body["param"] == "response_format" and "foo" in e.value.message


def test_cli_json_schema_and_its_errors(tmp_path, capsys):
    from mlx_dgemma.cli.generate import main

    schema = RECORD_SCHEMA
    args = ["--steps", "8", "--seed", "0", "-m", "64", "--drafter", "none"]
    assert main([*args, "--json-schema", str(schema)]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), json.loads(schema.read_text()))
    (tmp_path / "bad.json").write_text('{"type": "object", "properties": {"a": {"type": "strnig"}}}')
    assert main([*args, "--json-schema", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "strnig" in err


def test_projection_keeps_allowed_tokens_and_replaces_the_rest():
    """Left to right: an allowed argmax is kept, a rejected one becomes the best allowed token by its logits,
    and once the grammar is complete the end token is written and pad after it."""
    import numpy as np

    from mlx_dgemma.decoding.constrain import GrammarConstraint, grammar_of, ll_tokenizer

    tokenizer = load_tokenizer(DEMO24)
    llt = ll_tokenizer(tokenizer, [1, 5], 1024)
    schema = {
        "type": "object",
        "properties": {"age": {"type": "integer"}},
        "required": ["age"],
        "additionalProperties": False,
    }
    c = GrammarConstraint(
        llt, grammar_of(json_schema=schema), [1, 5], 0, 1024, max_tokens=100, canvas_length=24
    )
    good = llt.tokenize_str('{"age": 34}')
    noise = [400] * 12
    argmax = np.array([*good[:3], 400, *good[4:], *noise])[:16]  # one wrong token inside, noise after
    logits = np.zeros((16, 1024), dtype=np.float32)
    logits[3, good[3]] = 5.0  # the rejected position's best allowed token
    logits[:, 5] = 1.0  # end of turn is the model's second choice everywhere
    out = c.project(0, argmax, lambda i: logits[i])
    n = len(good)
    assert out[:n].tolist() == good and out[n] == 5 and (out[n + 1 :] == 0).all()
    c.commit(out.tolist())
    assert c.ended


def test_a_grammar_compiles_once_and_each_constraint_has_its_own_state():
    """The server compiles a request's format to check it and generation builds it again: the second build is
    a copy of the first (same compiled tables), whose matcher advances on its own."""
    from mlx_dgemma.decoding.constrain import make_constraint

    tokenizer = load_tokenizer(DEMO24)
    schema = {
        "type": "object",
        "properties": {"age": {"type": "integer"}},
        "required": ["age"],
        "additionalProperties": False,
    }
    build = [make_constraint(tokenizer, [1, 5], 0, 1024, 40, 24, json_schema=schema) for _ in range(2)]
    a, b = build
    assert a is not b and a.matcher is not b.matcher and a.order is b.order and a.min_length == b.min_length
    a.commit([*tokenizer.encode('{"age": 34}', add_special_tokens=False), 5])
    assert a.ended and not b.ended and not b.matcher.is_stopped()
    c = make_constraint(tokenizer, [1, 5], 0, 1024, 40, 24, json_schema=schema)  # after a finished: untouched
    assert not c.ended and c.committed == 0 and not c.matcher.is_stopped()
    other = make_constraint(tokenizer, [1, 5], 0, 1024, 41, 24, json_schema=schema)  # another budget: its own
    assert other.max_tokens == 41 and c.max_tokens == 40


def test_constrained_step_feeds_projected_and_held_tokens_back():
    """The next decoder input carries every token the projection changed and every held token; the other
    positions keep the sampler's canvas (accepted samples and fresh noise)."""
    import numpy as np

    from mlx_dgemma.decoding.constrain import Constraint, constrained_step
    from mlx_dgemma.decoding.sampler import StepOutput

    class Stub(Constraint):
        def fixed(self, offset, length):
            return {0: 7}

        def project(self, offset, argmax, row):
            out = argmax.copy()
            out[0], out[2] = 7, 9
            return out

    raw = mx.array([[1, 2, 3, 4]])
    sampled = mx.array([[11, 12, 13, 14]])
    logits = mx.zeros((1, 4, 16))

    def step_fn(*args):
        return StepOutput(
            sampled,
            raw,
            logits,
            mx.array([False]),
            mx.zeros((1, 1, 4), dtype=mx.int32),
            mx.ones((1, 4), dtype=mx.bool_),
        )

    out = constrained_step(step_fn, Stub(), 0)(None, None, None, None, None, None, 1, None)
    assert np.array(out.argmax).tolist() == [[7, 2, 9, 4]]
    assert np.array(out.canvas).tolist() == [[7, 12, 9, 14]]


def test_forced_tool_call_parses_and_its_arguments_validate(random_model):
    """tool_choice "required" / a named function: a Gemma 4 call that mlx-lm's parser reads, with arguments
    under the tool's schema, even from a random model."""
    from mlx_lm.tool_parsers.gemma4 import parse_tool_call

    from mlx_dgemma.decoding.tool_grammar import tool_call_grammar

    model, tokenizer = random_model
    weather = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "pattern": "[A-Z][a-z]{1,8}"},
            "days": {"type": "integer"},
            "unit": {"enum": ["c", "f"]},
        },
        "required": ["city"],
    }
    search = {
        "type": "object",
        "properties": {"q": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["q", "n"],
    }
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": weather}},
        {"type": "function", "function": {"name": "search", "parameters": search}},
    ]
    for seed, choice in enumerate(["required", {"type": "function", "function": {"name": "search"}}]):
        fmt = {"type": "lark", "lark": tool_call_grammar(tools, choice, tokenizer)}
        call = parse_tool_call(answer(model, tokenizer, max_tokens=96, seed=seed, response_format=fmt).text)
        assert choice == "required" or call["name"] == "search"
        jsonschema.validate(call["arguments"], weather if call["name"] == "get_weather" else search)
    with pytest.raises(ConstraintError, match="not in tools"):
        tool_call_grammar(tools, {"type": "function", "function": {"name": "nope"}})
