"""How short an answer a grammar allows: a lower bound on the bytes of the shortest JSON text a schema accepts,
or of the shortest string a Lark grammar derives.

``constrain.check_shortest`` uses these bounds to refuse, before compiling, a schema or grammar that accepts
nothing, recurses without end (a ``$ref`` cycle every answer must follow), or whose shortest answer cannot fit
in ``max_tokens`` (``minLength: 10**9``): otherwise such a request would run to its length limit and return text
that does not parse. The bounds are computed from the schema or grammar text alone (no engine), and an analysis
that meets something it cannot model (a remote ``$ref``, ``%json``) gives up (``None``) rather than guess.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from typing import Any


class _Unknown(Exception):
    """The shortest-answer bound cannot be computed (a construct it does not model): no bound, no refusal."""


_ALL_TYPES = ("null", "boolean", "object", "array", "number", "string", "integer")


class _Shortest:
    """A lower bound on the bytes of the shortest JSON text a schema accepts (``math.inf``: none), the way the
    shortest derivations of a grammar are found: every ``$ref`` starts at infinity and is lowered to what its
    target needs until nothing changes; a ``$ref`` still infinite at the end only ever refers back to itself
    (a cycle that can never end). Only keywords that force length are read (``minLength``, ``minItems``,
    ``minProperties``, ``required``, ``const``, ``enum``, ``allOf``/``anyOf``/``oneOf``); anything else is
    assumed to cost nothing, so the bound is never above the truth."""

    def __init__(self, root: dict[str, Any], budget: int = 1_000_000):
        self.root = root
        self.refs: dict[str, float] = {}  # "#/..." -> current estimate
        self.budget = budget  # schema nodes visited before giving up (refs into large, nested targets)

    def run(self) -> tuple[float, list[str]]:
        """(bytes, the $refs that never end)."""
        for _ in range(64):
            before = dict(self.refs)
            for ref in list(self.refs):
                self.refs[ref] = self.value(self._target(ref), 0)
            size = self.value(self.root, 0)
            if self.refs == before:
                return size, [r for r, v in self.refs.items() if v == math.inf]
        raise _Unknown

    def _target(self, ref: str) -> Any:
        node: Any = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise _Unknown
        return node

    def value(self, s: Any, depth: int) -> float:
        self.budget -= 1
        if depth > 200 or self.budget < 0:
            raise _Unknown
        if s is True or s == {}:
            return 1
        if s is False:
            return math.inf
        if (
            not isinstance(s, dict)
            or ("$id" in s and depth)
            or any(k in s for k in ("$dynamicRef", "$recursiveRef"))
        ):
            raise _Unknown
        bounds: list[float] = []
        ref = s.get("$ref")
        if isinstance(ref, str):
            if not (ref == "#" or ref.startswith("#/")):
                raise _Unknown
            bounds.append(self.refs.setdefault(ref, math.inf))
        if "const" in s:
            bounds.append(_json_len(s["const"]))
        if isinstance(s.get("enum"), list):
            bounds.append(min((_json_len(v) for v in s["enum"]), default=math.inf))
        bounds += [self.value(sub, depth + 1) for sub in s.get("allOf") or []]
        for key in ("anyOf", "oneOf"):
            if s.get(key):
                bounds.append(min(self.value(sub, depth + 1) for sub in s[key]))
        kind = s.get("type", _ALL_TYPES)
        kinds = [kind] if isinstance(kind, str) else kind
        bounds.append(min((self._typed(k, s, depth) for k in kinds), default=math.inf))
        return max(bounds)

    def _typed(self, kind: str, s: dict[str, Any], depth: int) -> float:
        if kind == "string":
            return 2 + _count(s, "minLength")  # a character is at least a byte
        if kind == "array":
            n = _count(s, "minItems")
            prefix = s.get("prefixItems") or (s["items"] if isinstance(s.get("items"), list) else [])
            rest = s.get("items") if not isinstance(s.get("items"), list) else s.get("additionalItems")
            head = [self.value(p, depth + 1) for p in prefix[:n]]
            tail = n - len(head)
            each = self.value(rest, depth + 1) if rest is not None and tail > 0 else 1
            return 2 + sum(head) + (tail * each if tail > 0 else 0) + max(n - 1, 0)
        if kind == "object":
            props: dict[str, Any] = s["properties"] if isinstance(s.get("properties"), dict) else {}
            extra = s.get("additionalProperties", True) if not s.get("patternProperties") else True
            keys = list(dict.fromkeys(k for k in s.get("required") or [] if isinstance(k, str)))
            size = sum(_json_len(k) + 1 + self.value(props.get(k, extra), depth + 1) for k in keys)
            n = max(len(keys), _count(s, "minProperties"))
            return 2 + size + 4 * (n - len(keys)) + max(n - 1, 0)  # another pair is at least '"":0'
        return {"null": 4, "boolean": 4, "number": 1, "integer": 1}.get(kind, 0)


def _json_len(v: Any) -> int:
    """The fewest bytes JSON can write ``v`` in (UTF-8, no spaces; a float as 1, whatever its spelling)."""
    if isinstance(v, str):
        return len(json.dumps(v, ensure_ascii=False).encode("utf-8"))
    if isinstance(v, bool) or v is None:
        return 5 if v is False else 4
    if isinstance(v, int):
        return len(str(v))
    if isinstance(v, list):
        return 2 + sum(_json_len(x) for x in v) + max(len(v) - 1, 0)
    if isinstance(v, dict):
        return 2 + sum(_json_len(str(k)) + 1 + _json_len(x) for k, x in v.items()) + max(len(v) - 1, 0)
    return 1


def _count(s: dict[str, Any], key: str) -> int:
    n = s.get(key, 0)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def shortest_json(schema: Any) -> tuple[float, list[str]] | None:
    """A lower bound on the bytes of the shortest JSON text ``schema`` accepts and the ``$ref``s that can never
    end (:class:`_Shortest`); ``None`` when the schema uses what the bound does not model."""
    try:
        return _Shortest(schema).run() if isinstance(schema, dict) else None
    except (_Unknown, RecursionError, TypeError, ValueError, OverflowError):
        return None


_LARK_TOKEN = re.compile(
    r"""\s*(?://[^\n]*|(?P<tok>"(?:[^"\\\n]|\\.)*"i?|/(?:[^/\\\n]|\\.)+/[a-z]*|<\[[0-9]+\]>"""
    r"""|[_a-zA-Z][_a-zA-Z0-9]*|[0-9]+|->|\.\.|[:|()\[\]?*+~.]|\S))"""
)


def shortest_lark(lark: str, token_bytes: int) -> tuple[float, list[str]] | None:
    """A lower bound on the shortest text a Lark grammar (llguidance's dialect) accepts, in bytes with a special
    token ``<[id]>`` as ``token_bytes``, and the rules that can never end; ``None`` for a construct this reading
    does not model (then no bound). Regexes count as empty."""
    try:
        return _shortest_lark(lark, token_bytes)
    except (_Unknown, RecursionError, IndexError):
        return None


def _shortest_lark(lark: str, token_bytes: int) -> tuple[float, list[str]] | None:
    imported: set[str] = set()
    lines = []
    for line in lark.splitlines():
        stripped = line.strip()
        if stripped.startswith("%"):
            if not stripped.startswith(("%ignore", "%import")):
                return None
            if stripped.startswith("%import"):  # imported terminals: known, of unknown (zero) length
                imported.update(re.findall(r"[_a-zA-Z]\w*", stripped.split(None, 1)[-1]))
            continue
        lines.append(line)
    tokens, at_start = [], True
    for line in lines:
        pos = 0
        while pos < len(line):
            m = _LARK_TOKEN.match(line, pos)
            if m is None or m.end() == pos:
                break
            pos = m.end()
            if m.group("tok") is not None:
                tokens.append((m.group("tok"), at_start))
                at_start = False
        at_start = True
    # Definitions: NAME [. NUMBER] ":" first on a line.
    defs: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(tokens):
        tok, first = tokens[i]
        head = [t for t, _ in tokens[i : i + 4]]
        if (
            first
            and re.fullmatch(r"[_a-zA-Z]\w*", tok)
            and (head[1:2] == [":"] or (head[1:2] == ["."] and head[3:4] == [":"]))
        ):
            skip = 2 if head[1] == ":" else 4
            defs.append((tok, []))
            i += skip
            continue
        if not defs:
            return None
        defs[-1][1].append(tok)
        i += 1
    parsed = {}
    for name, body in defs:
        parser = _LarkExpr(body, token_bytes)
        parsed[name] = parser.expansions()
        if parser.pos != len(body):
            return None
    names = set(parsed) | imported
    if "start" not in parsed or any(ref not in names for expr in parsed.values() for ref in _refs(expr)):
        return None
    # Knuth's generalization of Dijkstra (sums and minima only grow): settle the cheapest rule, then re-evaluate
    # the rules that use it with only settled values; each rule is settled once.
    users: dict[str, set[str]] = {name: set() for name in names}
    for name, expr in parsed.items():
        for ref in _refs(expr):
            users[ref].add(name)
    values = dict.fromkeys(names, math.inf)
    settled: dict[str, float] = {}
    heap = [(0, name) for name in imported] + [
        (v, n) for n, e in parsed.items() if (v := _lark_value(e, settled)) < math.inf
    ]
    heapq.heapify(heap)
    while heap:
        v, name = heapq.heappop(heap)
        if name in settled:
            continue
        settled[name] = values[name] = v
        for user in users[name]:
            if user not in settled and (u := _lark_value(parsed[user], settled)) < values[user]:
                values[user] = u
                heapq.heappush(heap, (u, user))
    return values["start"], [n for n in parsed if values[n] == math.inf]


class _LarkExpr:
    """Expressions of one rule: ("alt", [seq...]), ("seq", [item...]), ("rep", item, min), ("lit", bytes),
    ("ref", name)."""

    def __init__(self, body: list[str], token_bytes: int):
        self.body, self.pos, self.token_bytes = body, 0, token_bytes

    def peek(self) -> str | None:
        return self.body[self.pos] if self.pos < len(self.body) else None

    def expansions(self) -> tuple:
        alts = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            alts.append(self.sequence())
        return ("alt", alts)

    def sequence(self) -> tuple:
        items = []
        while self.peek() not in (None, "|", ")", "]"):
            if self.peek() == "->":  # an alias
                self.pos += 2
                continue
            items.append(self.item())
        return ("seq", items)

    def item(self) -> tuple:
        atom = self.atom()
        op = self.peek()
        if op in ("?", "*"):
            self.pos += 1
            return ("rep", atom, 0)
        if op == "+":
            self.pos += 1
            return ("rep", atom, 1)
        if op == "~":
            n = self.body[self.pos + 1] if self.pos + 1 < len(self.body) else ""
            if not n.isdigit():
                raise _Unknown
            self.pos += 2
            if self.peek() == "..":
                self.pos += 2
            return ("rep", atom, int(n))
        return atom

    def atom(self) -> tuple:
        tok = self.peek()
        if tok is None:
            raise _Unknown
        self.pos += 1
        if tok in ("(", "["):
            inner = self.expansions()
            if self.peek() != {"(": ")", "[": "]"}[tok]:
                raise _Unknown
            self.pos += 1
            return inner if tok == "(" else ("rep", inner, 0)
        if tok.startswith('"'):
            body = tok[1:-2] if tok.endswith("i") else tok[1:-1]
            if self.peek() == "..":  # a range "a".."z"
                self.pos += 2
            return ("lit", len(re.sub(r"\\.", "x", body)))
        if tok.startswith("/"):
            return ("lit", 0)
        if tok.startswith("<["):
            return ("lit", self.token_bytes)
        if re.fullmatch(r"[_a-zA-Z]\w*", tok):
            return ("ref", tok)
        raise _Unknown


def _refs(expr: tuple) -> list[str]:
    kind = expr[0]
    if kind == "ref":
        return [expr[1]]
    if kind in ("alt", "seq"):
        return [r for sub in expr[1] for r in _refs(sub)]
    if kind == "rep":
        return _refs(expr[1])
    return []


def _lark_value(expr: tuple, values: dict[str, float]) -> float:
    kind = expr[0]
    if kind == "lit":
        return expr[1]
    if kind == "ref":
        return values.get(expr[1], math.inf)
    if kind == "alt":
        return min(_lark_value(sub, values) for sub in expr[1])
    if kind == "seq":
        return sum(_lark_value(sub, values) for sub in expr[1])
    n = expr[2]
    return n * _lark_value(expr[1], values) if n else 0


_MAX_TOKEN_BYTES: dict[int, int] = {}


def max_token_bytes(llt: Any) -> int:
    """The most bytes one token of ``llt`` stands for: a text of N bytes takes at least N / this many tokens."""
    if id(llt) not in _MAX_TOKEN_BYTES:
        _MAX_TOKEN_BYTES[id(llt)] = (
            max((len(llt.decode_bytes([t])) for t in range(llt.vocab_size)), default=1) or 1
        )
    return _MAX_TOKEN_BYTES[id(llt)]


def format_count(n: float) -> str:
    return f"{n:.3g}" if n >= 10**12 else str(int(n))
