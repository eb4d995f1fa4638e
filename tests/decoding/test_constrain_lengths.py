"""Structured output near ``max_tokens`` on the embedded demo model (issue 28): with a budget just large enough for
the answer, every JSON Schema type gives valid JSON and, where the unconstrained model's answer fits the schema, the
same answer. Greedy decoding under fixed seeds: deterministic, whatever the machine's speed."""

from __future__ import annotations

import json

import jsonschema
import pytest

from mlx_dgemma import load
from mlx_dgemma.decoding.constrain import make_constraint
from mlx_dgemma.generation import generate
from mlx_dgemma.request import eos_ids

PROMPT = "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi."
RECORD = {
    "name": {"type": "string"},
    "age": {"type": "integer"},
    "city": {"type": "string"},
    "job": {"type": "string"},
    "languages": {"type": "array", "items": {"type": "string"}},
}


def record(**fields):
    """The demo record's schema (its fields in the order the model writes them), with ``fields`` retyped or added
    after them; every field required."""
    props = {**RECORD, **fields}
    return {"type": "object", "properties": props, "required": list(props)}


# The model's own record fits these: the constrained answer must be the unconstrained one.
FITS = {
    "integer": record(),
    "number": record(age={"type": "number"}),
    "string": record(city={"type": "string", "maxLength": 20}),
    "integer_or_null": record(age={"type": ["integer", "null"]}),
    "array": record(languages={"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4}),
    "array_of_enum": record(languages={"type": "array", "items": {"enum": ["Greek", "Hindi", "French"]}}),
    "enum": record(city={"enum": ["Oslo", "Lima", "Kyoto"]}),
}
# Tokens over the answer's that the closing check may count: it is a greedy search, an upper bound. In an empty
# array of enum items it opens an item (quotes rank before ']') and counts an enum value that the model's
# answer, already past that point, never needs.
SLACK = {"array_of_enum": 2}
# These add a field the model never writes (its value cannot be the model's): the answer must be valid.
ADDS = {
    "boolean": (record(pilot={"type": "boolean"}), ', "pilot": false'),
    "null": (record(spouse={"type": "null"}), ', "spouse": null'),
    "nested_object": (
        record(home={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        ', "home": {"city": ""}',
    ),
}


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load()
    free = generate(model, tokenizer, PROMPT, max_tokens=256, seed=0)
    return model, tokenizer, free


def tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_the_unconstrained_answer_is_the_record(demo):
    _, _, free = demo
    assert json.loads(free) == {
        "name": "Maya",
        "age": 34,
        "city": "Oslo",
        "job": "pilot",
        "languages": ["Greek", "Hindi"],
    }


@pytest.mark.parametrize("name", sorted(FITS))
def test_a_budget_just_large_enough_gives_the_models_answer(demo, name):
    model, tokenizer, free = demo
    budget = tokens(tokenizer, free) + 1 + SLACK.get(name, 0)  # the answer and its end-of-turn token
    text = generate(model, tokenizer, PROMPT, max_tokens=budget, seed=0, json_schema=FITS[name])
    jsonschema.validate(json.loads(text), FITS[name])
    assert json.loads(text) == json.loads(free)


@pytest.mark.parametrize("name", sorted(ADDS))
def test_a_budget_just_large_enough_gives_valid_json(demo, name):
    model, tokenizer, free = demo
    schema, added = ADDS[name]
    budget = tokens(tokenizer, free) + tokens(tokenizer, added) + 1
    text = generate(model, tokenizer, PROMPT, max_tokens=budget, seed=0, json_schema=schema)
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("age", [{"type": "integer"}, {"type": "number"}])
def test_an_unbounded_number_is_not_forced_to_zero(demo, age):
    """Issue 28's report: three fields, an unbounded number, a budget within a canvas (128) of the answer."""
    model, tokenizer, _ = demo
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": age, "city": {"type": "string"}},
        "required": ["name", "age", "city"],
    }
    for max_tokens in (64, 128):
        record = json.loads(
            generate(model, tokenizer, PROMPT, max_tokens=max_tokens, seed=0, json_schema=schema)
        )
        assert (record["name"], record["age"], record["city"]) == ("Maya", 34, "Oslo")


@pytest.mark.parametrize("name", sorted(FITS))
def test_the_closing_check_fits_the_models_answer(demo, name):
    """The shortest-answer search (``need``) never counts more tokens than the model's own answer takes from
    any point of it, so a budget that holds that answer never cuts it short (an unbounded number used to count
    as never closing: digits ranked cheaper than the ``,`` that ends it)."""
    model, tokenizer, free = demo
    ids = tokenizer.encode(free, add_special_tokens=False)
    c = make_constraint(
        tokenizer,
        sorted(eos_ids(model, tokenizer)),
        model.args.pad_token_id or 0,
        model.args.vocab_size,
        len(ids) + 1,
        model.args.canvas_length,
        json_schema=FITS[name],
    )
    m = c.matcher.deep_copy()
    for i, t in enumerate(ids):
        need = c.need(m, 2 * len(ids))
        assert need is not None and need <= len(ids) - i + SLACK.get(name, 0), (
            i,
            tokenizer.decode(ids[:i]),
            need,
        )
        assert m.consume_token(t)
