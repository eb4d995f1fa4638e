"""Type confusion and hostile grammars (issue 26): every wrong JSON type in a request, every schema or grammar that
cannot be compiled or answered, is a one-line 400 naming the field (never a 500, a panic text or a hang), grammar
compiles are bounded in size, time and concurrency, and a plain request is served right after each.

Nothing here depends on the machine's speed: a compile is held with an event, never raced; the only time bounds
are hang guards.
"""

from __future__ import annotations

import json
import shutil
import threading
from typing import Any

import httpx
import pytest
from test_server import FAST, HELLO
from test_server_tools import GEMMA4_TEMPLATE

import mlx_dgemma.decoding.constrain as constrain
from mlx_dgemma.decoding.constrain import ConstraintError, engine_reason
from mlx_dgemma.decoding.grammar_bounds import shortest_json, shortest_lark
from mlx_dgemma.server import BackgroundServer, create_app
from mlx_dgemma.server.protocol import APIError, parse
from tests.conftest import DEMO24

U = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo model with a Gemma-4-style template (one that renders tools and tool calls, so that tool fields
    reach the template and the tool grammar)."""
    folder = tmp_path_factory.mktemp("validation") / "gemma4-style"
    shutil.copytree(DEMO24, folder)
    (folder / "chat_template.jinja").write_text(GEMMA4_TEMPLATE)
    with BackgroundServer(create_app(str(folder), max_concurrency=4)) as srv:
        yield srv


def post(srv: BackgroundServer, body: Any, path: str = "chat/completions") -> httpx.Response:
    return httpx.post(
        f"{srv.url}/{path}",
        content=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        timeout=120,
    )  # a hang guard only


def plain_request_succeeds(srv: BackgroundServer) -> None:
    r = post(srv, {"messages": HELLO, "max_tokens": 2, **FAST})
    assert r.status_code == 200, r.text


def assert_clean_400(r: httpx.Response, param: str, *words: str) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    message = error["message"]
    assert "\n" not in message and param.split(".")[0] in message, message
    for bad in ("panicked", "backtrace", "<state>", "Traceback", "internal error"):
        assert bad not in message, message
    for word in words:
        assert word in message, message
    return error


def tool(parameters: dict[str, Any], name: str = "f") -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": name, "parameters": parameters}}]


def call(**fields: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": [fields]}


def obj(**props: Any) -> dict[str, Any]:
    return {"type": "object", "properties": props}


GOOD_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}

# (body fields, the param of the error). Each was a 500 (or a silent 200) before issue 26.
WRONG_TYPES = {
    "call-with-only-an-id": ({"messages": [*U, call(id="c1")]}, "messages.1.tool_calls.0.function"),
    "call-is-a-string": (
        {"messages": [*U, {"role": "assistant", "tool_calls": ["c1"]}]},
        "messages.1.tool_calls.0",
    ),
    "function-is-a-string": (
        {"messages": [*U, call(id="c1", type="function", function="f")]},
        "messages.1.tool_calls.0.function",
    ),
    "call-without-name": (
        {"messages": [*U, call(id="c1", function={"arguments": "{}"})]},
        "messages.1.tool_calls.0.function.name",
    ),
    "call-id-is-a-list": (
        {"messages": [*U, call(**{**GOOD_CALL, "id": ["c1"]})]},
        "messages.1.tool_calls.0.id",
    ),
    "tool-call-id-is-a-list": (
        {
            "messages": [
                *U,
                {"role": "assistant", "tool_calls": [GOOD_CALL]},
                {"role": "tool", "tool_call_id": ["c1"], "content": "x"},
            ]
        },
        "messages.2.tool_call_id",
    ),
    "tool-calls-is-an-object": (
        {"messages": [*U, {"role": "assistant", "tool_calls": GOOD_CALL}]},
        "messages.1.tool_calls",
    ),
    "arguments-is-a-number": (
        {"messages": [*U, call(**{**GOOD_CALL, "function": {"name": "f", "arguments": 5}})]},
        "messages.1.tool_calls.0.function.arguments",
    ),
    "arguments-not-an-object": (
        {"messages": [*U, call(**{**GOOD_CALL, "function": {"name": "f", "arguments": "[1, 2]"}})]},
        "messages.1.tool_calls.0.function.arguments",
    ),
    "arguments-not-json": (
        {"messages": [*U, call(**{**GOOD_CALL, "function": {"name": "f", "arguments": "{"}})]},
        "messages.1.tool_calls.0.function.arguments",
    ),
    "role-unknown": ({"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role"),
    "message-is-a-string": ({"messages": ["hello"]}, "messages.0"),
    "content-is-a-number": ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    "tool-without-name": (
        {"messages": U, "tools": [{"type": "function", "function": {"parameters": {}}}]},
        "tools.0.function.name",
    ),
    "tool-name-empty": ({"messages": U, "tools": tool({}, name="")}, "tools.0.function.name"),
    "tool-is-a-string": ({"messages": U, "tools": ["f"]}, "tools.0"),
    "tool-type-unknown": (
        {"messages": U, "tools": [{"type": "retrieval", "function": {"name": "f"}}]},
        "tools.0.type",
    ),
    "parameters-is-a-list": (
        {"messages": U, "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
        "tools.0.function.parameters",
    ),
    "pattern-is-a-number": (
        {"messages": U, "tools": tool(obj(a={"type": "string", "pattern": 5}))},
        "tools.0.function.parameters.properties.a.pattern",
    ),
    "minItems-is-a-string": (
        {"messages": U, "tools": tool(obj(a={"type": "array", "minItems": "2"}))},
        "tools.0.function.parameters.properties.a.minItems",
    ),
    "enum-is-a-number": (
        {"messages": U, "tools": tool(obj(a={"enum": 5}))},
        "tools.0.function.parameters.properties.a.enum",
    ),
    "properties-is-a-list": (
        {"messages": U, "tools": tool({"type": "object", "properties": ["a"]})},
        "tools.0.function.parameters.properties",
    ),
    "required-is-a-number": (
        {"messages": U, "tools": tool({**obj(a={"type": "string"}), "required": 3})},
        "tools.0.function.parameters.required",
    ),
    "forced-pattern-is-a-number": (
        {"messages": U, "tools": tool(obj(a={"type": "string", "pattern": 5})), "tool_choice": "required"},
        "tools.0.function.parameters.properties.a.pattern",
    ),
    "forced-name-is-a-list": (
        {
            "messages": U,
            "tools": tool(obj()),
            "tool_choice": {"type": "function", "function": {"name": ["f"]}},
        },
        "tool_choice",
    ),
    "forced-type-list": (
        {"messages": U, "tools": tool(obj(a={"type": ["string", "null"]})), "tool_choice": "required"},
        "tool_choice",
    ),
    "max-tokens-string": ({"messages": U, "max_tokens": "5"}, "max_tokens"),
    "max-tokens-bool": ({"messages": U, "max_tokens": True}, "max_tokens"),
    "max-completion-tokens-bool": ({"messages": U, "max_completion_tokens": True}, "max_completion_tokens"),
    "seed-bool": ({"messages": U, "seed": True}, "seed"),
    "steps-string": ({"messages": U, "max_denoising_steps": "3"}, "max_denoising_steps"),
    "schema-pattern-is-a-number": (
        {
            "messages": U,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": obj(a={"type": "string", "pattern": 5})},
            },
        },
        "response_format",
    ),
    "schema-required-is-a-number": (
        {
            "messages": U,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {**obj(a={"type": "string"}), "required": 3}},
            },
        },
        "response_format",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_wrong_json_types_are_400_naming_the_field(server, case):
    body, param = WRONG_TYPES[case]
    assert_clean_400(post(server, {"max_tokens": 8, **body}), param)
    plain_request_succeeds(server)


def test_the_same_fields_of_the_right_types_are_served(server):
    """No false refusals: a tool exchange with a recursive tool schema, and a forced call."""
    params = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "tree": {"$ref": "#"}},
        "required": ["a"],
    }
    history = [
        *U,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    r = post(server, {"messages": history, "tools": tool(params), "max_tokens": 4, **FAST})
    assert r.status_code == 200, r.text
    flat = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = post(
        server, {"messages": U, "tools": tool(flat), "tool_choice": "required", "max_tokens": 48, **FAST}
    )
    assert r.status_code == 200, r.text


def test_a_completion_prompt_of_booleans_is_400(server):
    r = post(server, {"prompt": [True, False], "max_tokens": 2}, path="completions")
    assert_clean_400(r, "prompt")
    assert post(server, {"prompt": "Once", "max_tokens": 2, **FAST}, path="completions").status_code == 200


def schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


# (response_format, words of the message). A $ref cycle and a grammar that matches nothing were compiled without a
# word (or failed with the parser's internals); a 1 MB grammar returned the engine's panic text and backtrace.
HOSTILE = {
    "ref-cycle": (
        schema_format({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}),
        ["$ref cycle can never end", "#/$defs/a"],
    ),
    "ref-root-required": (
        schema_format({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}),
        ["$ref cycle can never end"],
    ),
    "ref-through-array": (
        schema_format(
            {
                "$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}},
                "$ref": "#/$defs/n",
            }
        ),
        ["$ref cycle can never end"],
    ),
    "schema-false-required": (
        schema_format({"type": "object", "properties": {"a": False}, "required": ["a"]}),
        ["accepts no value"],
    ),
    "empty-enum": (schema_format({"enum": []}), ["accepts no value"]),
    "min-over-max": (schema_format({"type": "string", "minLength": 5, "maxLength": 2}), ["minLength"]),
    "type-unknown": (schema_format({"type": "foo"}), ["foo"]),
    "lark-never-ends": ({"type": "lark", "lark": 'start: a\na: "x" a'}, ["matches nothing", "'a'"]),
    "lark-cycle": ({"type": "lark", "lark": 'start: r0\nr0: "q" r1\nr1: r0 "z"'}, ["matches nothing"]),
    "lark-unknown-rule": ({"type": "lark", "lark": "start: a b"}, ["unknown name"]),
    "regex-unclosed": ({"type": "regex", "regex": "(("}, ["unclosed group"]),
    "lark-1mb": (
        {"type": "lark", "lark": "start: " + " | ".join(f'"w{i}"' for i in range(100000))},
        ["bytes", "shorten it"],
    ),
    "lark-too-nested": ({"type": "lark", "lark": "start: " + "(" * 5000 + '"a"' + ")" * 5000}, ["nested"]),
    "schema-1mb": (schema_format({"enum": ["x" * 1000] * 1100}), ["bytes", "shorten it"]),
    "regex-too-nested": ({"type": "regex", "regex": "(" * 3000 + "a" + ")" * 3000}, ["nested"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_grammars_are_a_clean_400(server, case):
    fmt, words = HOSTILE[case]
    assert_clean_400(
        post(server, {"messages": U, "max_tokens": 64, "response_format": fmt}), "response_format", *words
    )
    plain_request_succeeds(server)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "minLength": 10**9},
        {"type": "array", "minItems": 100000},
        {"type": "object", "minProperties": 50000},
        {
            "type": "object",
            "properties": {
                "a": {"type": "array", "items": {"type": "string", "minLength": 500}, "minItems": 20}
            },
            "required": ["a"],
        },
    ],
    ids=["minLength", "minItems", "minProperties", "nested-required"],
)
def test_a_schema_whose_shortest_answer_exceeds_max_tokens_is_400(server, schema):
    r = post(server, {"messages": U, "max_tokens": 64, "response_format": schema_format(schema)})
    assert_clean_400(r, "response_format", "max_tokens=64 is too small", "raise max_tokens")
    plain_request_succeeds(server)


def test_a_grammar_whose_shortest_answer_exceeds_max_tokens_is_400(server):
    fmt = {"type": "lark", "lark": 'start: x~100000\nx: "a"'}
    r = post(server, {"messages": U, "max_tokens": 64, "response_format": fmt})
    assert_clean_400(r, "response_format", "max_tokens=64 is too small", "grammar")
    plain_request_succeeds(server)


def test_a_long_chain_of_rules_compiles_without_killing_the_server(server):
    """llguidance recurses along chained rules: 5000 of them overflowed a thread's default stack (SIGSEGV)."""
    n = 5000
    lark = "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(n)) + f'\nr{n}: "ok"'
    r = post(
        server, {"messages": U, "max_tokens": 8, "response_format": {"type": "lark", "lark": lark}, **FAST}
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "ok"
    plain_request_succeeds(server)


class HeldCompile:
    """Grammar compiles held until released (``constrain.GrammarConstraint`` replaced by a held one)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.entered, self.release, real = (
            threading.Semaphore(0),
            threading.Event(),
            constrain.GrammarConstraint,
        )

        def held(*args: Any, **kwargs: Any):
            self.entered.release()
            assert self.release.wait(300)
            return real(*args, **kwargs)

        monkeypatch.setattr(constrain, "GrammarConstraint", held)


def regex_format(i: int) -> dict[str, Any]:
    return {
        "type": "regex",
        "regex": f"held{i}-[a-z]{{3}}",
    }  # a new grammar each: never in the compiled cache


def test_grammar_compiles_are_bounded_in_concurrency(server, monkeypatch):
    """Compiles beyond COMPILE_SLOTS are a 429 at once; a plain request is served while the slots are held."""
    held = HeldCompile(monkeypatch)
    monkeypatch.setattr(constrain, "COMPILE_TIMEOUT_S", 600.0)  # held compiles are waited for, however long
    results: dict[int, httpx.Response] = {}
    threads = [
        threading.Thread(
            target=lambda i=i: results.update(
                {
                    i: post(
                        server, {"messages": U, "max_tokens": 16, "response_format": regex_format(i), **FAST}
                    )
                }
            )
        )
        for i in range(constrain.COMPILE_SLOTS)
    ]
    try:
        for t in threads:
            t.start()
        for _ in threads:
            assert held.entered.acquire(timeout=120)
        r = post(server, {"messages": U, "max_tokens": 16, "response_format": regex_format(99)})
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert (
            error["code"] == "grammars_busy"
            and error["param"] == "response_format"
            and "\n" not in error["message"]
        )
        assert r.headers["retry-after"] == "1"
        plain_request_succeeds(server)
    finally:
        held.release.set()
        for t in threads:
            t.join(120)
    assert all(results[i].status_code == 200 for i in results), {i: r.text for i, r in results.items()}
    assert len(results) == constrain.COMPILE_SLOTS


def test_a_compile_past_its_time_is_400_and_holds_its_slot_until_done(server, monkeypatch):
    held = HeldCompile(monkeypatch)
    monkeypatch.setattr(constrain, "COMPILE_TIMEOUT_S", 0.05)  # the compile is held: it cannot finish in time
    try:
        r = post(server, {"messages": U, "max_tokens": 16, "response_format": regex_format(100)})
        assert_clean_400(r, "response_format", "to compile", "simplify it")
        plain_request_succeeds(server)
    finally:
        held.release.set()


# --- the pieces, without a server -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", "5"),
        ("max_tokens", True),
        ("max_tokens", 1.5),
        ("seed", True),
        ("seed", "1"),
        ("max_denoising_steps", False),
        ("max_completion_tokens", "8"),
        ("stream", "yes"),
    ],
)
def test_counts_and_seeds_are_strict_integers(field, value):
    with pytest.raises(APIError) as e:
        parse("chat", {"messages": U, field: value})
    assert e.value.status == 400 and e.value.param == field and "\n" not in e.value.message


def test_integers_still_pass():
    request = parse("chat", {"messages": U, "max_tokens": 5, "seed": 2**70, "max_denoising_steps": 3})
    assert request.max_tokens == 5 and request.seed == 2**70


def test_engine_errors_become_one_short_line():
    panic = (
        "thread '<unnamed>' panicked at parser/src/earley/grammar.rs:123:5:\nassertion failed\n"
        "stack backtrace:\n   0: rust_begin_unwind\n   1: core::panicking"
    )
    assert (
        engine_reason(panic) == "the grammar engine cannot compile it (too large or too complex): simplify it"
    )
    dump = 'NoExtensionBias\n<state>\nTokens: ⟦⟧\n</state><grammar>{"grammars": []}</grammar>'
    assert "<state>" not in engine_reason(dump) and "never ends" in engine_reason(dump)
    regex = (
        'at 1(8): invalid regex "((" (in regex): regex parse error:\n    ((\n     ^\nerror: unclosed group\n'
    )
    assert engine_reason(regex) == 'at 1(8): invalid regex "((" (in regex): regex parse error: unclosed group'


@pytest.mark.parametrize(
    "schema,size",
    [
        ({"type": "string", "minLength": 3}, 5),
        ({"type": "integer"}, 1),
        ({"enum": ["ab", 7, None]}, 1),
        ({"type": "object", "properties": {"k": {"const": "é"}}, "required": ["k"]}, 2 + 3 + 1 + 4),
        (
            {
                "type": "array",
                "prefixItems": [{"const": "abc"}],
                "items": {"type": "string", "minLength": 3},
                "minItems": 3,
            },
            2 + 5 + 5 + 5 + 2,
        ),
        ({"type": "object", "properties": {"a": {"$ref": "#"}}}, 2),  # the recursion is optional: {} ends it
        (
            {
                "$defs": {
                    "n": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"$ref": "#/$defs/n"}}]}
                },
                "$ref": "#/$defs/n",
            },
            2,
        ),
        ({"type": ["string", "null"], "minLength": 9}, 4),
        ({"allOf": [{"type": "string", "minLength": 4}, {"minLength": 2}]}, 6),
    ],
)
def test_the_shortest_json_bound(schema, size):
    assert shortest_json(schema) == (size, [])


def test_the_shortest_json_bound_gives_up_rather_than_guess():
    assert shortest_json({"$ref": "https://example.com/schema.json"}) is None
    assert shortest_json({"$dynamicRef": "#node"}) is None


@pytest.mark.parametrize(
    "lark,size,endless",
    [
        ('start: "ab"+ ("c" | "de")', 3, []),
        ('start: x~3\nx: "ab"', 6, []),
        ('start: a\na: "x" a | "y"', 1, []),
        ('start: <[5]> "x"', 11, []),  # a special token counts as a whole token (10 bytes here)
        ('start: x\nx.2: "ab" | "c" -> alias\n    | "d"', 1, []),
        ('%import common.WS\n%ignore WS\nstart: "a" b?\nb: b "c"', 1, ["b"]),
        ('start: a\na: "x" a', float("inf"), ["start", "a"]),
    ],
)
def test_the_shortest_lark_bound(lark, size, endless):
    assert shortest_lark(lark, 10) == (size, endless)


def test_the_shortest_lark_bound_gives_up_on_what_it_does_not_read():
    assert shortest_lark('start: %json {"type": "object"}', 10) is None
    assert shortest_lark("%llguidance {}\nstart: /a/", 10) is None


def test_a_schema_of_wrong_types_is_one_line_naming_its_keyword():
    with pytest.raises(ConstraintError) as e:
        constrain.check_json_schema({"type": "object", "properties": {"a": {"minItems": "2"}}})
    assert e.value.where == "properties.a.minItems" and "\n" not in str(e.value)
