"""Forced tool calls: a grammar for one call in Gemma 4's tool-call syntax with the arguments of a tool's schema.

Gemma 4 (DiffusionGemma's chat format) writes a call as ``<|tool_call>call:NAME{key:VALUE,...}<tool_call|>``:
keys bare, strings between ``<|"|>`` delimiters, numbers, booleans, arrays and objects as in JSON (mlx-lm's
``tool_parsers/gemma4.py`` reads it back). :func:`tool_call_grammar` writes a Lark grammar (llguidance's dialect)
that admits exactly such calls to the chosen tool(s), with arguments following their JSON schemas, for
``tool_choice: "required"`` (any offered tool) or ``{"type": "function", "function": {"name": ...}}``. Pass it as
``response_format={"type": "lark", "lark": grammar}``.

Supported schema keywords: ``type`` (object, string, integer, number, boolean, null, array), ``properties`` with
``required`` (required keys in the listed order, then the optional ones, each optional), ``enum``, ``const``,
``items``, ``minItems`` (0 or more), ``pattern`` on strings. Strings may not contain ``<`` (it opens the delimiter).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from mlx_dgemma.decoding.constrain import ConstraintError, check_json_schema

START, END, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'


class _Writer:
    def __init__(self, literal: Callable[[str], str]) -> None:
        self.rules: list[str] = []
        self.lit = literal

    def rule(self, body: str) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}: {body}")
        return name

    def value(self, s: Any, where: str) -> str:
        if not isinstance(s, dict):
            raise ConstraintError(f"tool schema at {where} must be an object")
        if "const" in s or "enum" in s:
            options = [s["const"]] if "const" in s else s["enum"]
            return self.rule(" | ".join(self._literal_value(v) for v in options))
        kind = s.get("type", "object" if "properties" in s else None)
        if not isinstance(kind, str):
            raise ConstraintError(
                f"tool schema at {where}: give one type (got {kind!r}); a list of types is not "
                "supported in forced tool calls"
            )
        if kind == "string":
            body = s.get("pattern", "[^<]*").removeprefix("^").removesuffix("$")
            return self.rule(f"{self.lit(QUOTE)} /{body}/ {self.lit(QUOTE)}")
        simple = {
            "integer": "/-?(0|[1-9][0-9]*)/",
            "number": "/-?(0|[1-9][0-9]*)(\\.[0-9]+)?/",
            "boolean": '"true" | "false"',
            "null": '"null"',
        }
        if kind in simple:
            return self.rule(simple[kind])
        if kind == "array":
            item = self.value(s.get("items", {"type": "string"}), f"{where}.items")
            listed = f'{item} ("," {item})*'
            return self.rule(f'"[" {listed} "]"' if s.get("minItems", 0) >= 1 else f'"[" ({listed})? "]"')
        if kind == "object":
            return self._object(s, where)
        raise ConstraintError(f"tool schema at {where}: type {kind!r} is not supported in forced tool calls")

    def _literal_value(self, v: Any) -> str:
        return self.lit(f"{QUOTE}{v}{QUOTE}") if isinstance(v, str) else json.dumps(json.dumps(v))

    def _object(self, s: dict[str, Any], where: str) -> str:
        props = s.get("properties") or {}
        required = [k for k in s.get("required", []) if k in props]
        for k in props:
            if not re.fullmatch(r"\w+", k):
                raise ConstraintError(
                    f"tool schema at {where}: key {k!r} cannot be written bare in a Gemma 4 call"
                )
        pair = {k: f"{json.dumps(k + ':')} {self.value(v, f'{where}.{k}')}" for k, v in props.items()}
        optional = [k for k in props if k not in required]
        if required:
            body = ' "," '.join(pair[k] for k in required)
            body += "".join(f' ("," {pair[k]})?' for k in optional)
            return self.rule(f'"{{" {body} "}}"')
        if not optional:
            return self.rule('"{" "}"')
        item = self.rule(" | ".join(pair[k] for k in optional))
        return self.rule(f'"{{" ({item} ("," {item})*)? "}}"')


def tool_call_grammar(tools: list[dict[str, Any]], tool_choice: Any, tokenizer: Any = None) -> str:
    """A Lark grammar for one tool call that ``tool_choice`` ("required" or a named function) allows."""
    specs = {
        t["function"]["name"]: t["function"]
        for t in tools or []
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    }
    if tool_choice == "required":
        names = list(specs)
    elif isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        names = [tool_choice["function"].get("name")]
    else:
        raise ConstraintError(
            f'tool_choice must be "required" or {{"type": "function", "function": {{"name": ...}}}}'
            f", got {tool_choice!r}"
        )
    if not names or any(not isinstance(n, str) or n not in specs for n in names):
        raise ConstraintError(f"tool_choice names a tool that is not in tools: {names!r}")
    w = _Writer(_literal_for(tokenizer))
    calls = []
    for name in names:
        schema = specs[name].get("parameters") or {"type": "object", "properties": {}}
        check_json_schema(
            schema, f"the parameters of {name!r}"
        )  # keywords of the right JSON types from here on
        args = w.value(schema, name)
        calls.append(f"{json.dumps('call:' + name)} {args}")
    return "\n".join([f"start: {w.lit(START)} ({' | '.join(calls)}) {w.lit(END)}", *w.rules])


def _literal_for(tokenizer: Any) -> Callable[[str], str]:
    """Literals as text, except a marker that is one special token of ``tokenizer``: llguidance's ``<[id]>``."""

    def literal(text: str) -> str:
        if tokenizer is not None:
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            special = set(getattr(tokenizer, "all_special_ids", []) or [])
            if len(ids) == 1 and ids[0] in special:
                return f"<[{ids[0]}]>"
        return json.dumps(text)

    return literal
