"""Structured output on diffusion canvases: grammars (JSON schema, regex, Lark) and infill templates.

A canvas is denoised as a whole, so a grammar cannot be applied token by token as an autoregressive sampler
does. Instead every denoising step's argmax canvas is *projected* onto the constraint, left to right: at
position ``i`` the allowed tokens are those the grammar accepts after the committed answer plus the projected
positions ``< i``; an allowed argmax is kept, any other is replaced by the best allowed token under the
step's logits. The projected canvas is what the step shows and what a canvas commits, and every token the
projection changed is written into the next decoder input, so the model denoises the rest around it. The
grammar state advances only on committed canvases. When the grammar is complete, the projection writes the
end-of-turn token (and pad after it), so generation stops there.

The grammar engine is ``llguidance`` (Microsoft's, maintained; the engine behind OpenAI-style structured
outputs in vLLM and SGLang): it compiles JSON schema, regexes and Lark grammars against the model's
tokenizer and checks a run of tokens, or computes an allowed-token bitmask, in microseconds.

Cost: the projection reads the step's argmax (C ints) back to the host every step, and a logits row for
each position whose argmax the grammar rejects. That is a host round-trip per denoising step, paid only in
constrained mode (the unconstrained loop syncs once per step for its stopping test anyway);
``python -m benchmarks.constrain`` measures it against a decoder pass.

Infill (:class:`InfillConstraint`): a template whose fixed tokens are written into the canvas before every
decoder pass and into every argmax, so they are never re-noised and always committed; the model fills the
holes around them. Fill-in-the-middle (:class:`FillInMiddle`, :class:`MiddleConstraint`): the answer is an open
hole of at most ``max_tokens`` tokens, with the suffix held right after it in the same canvas.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from mlx_dgemma.decoding.grammar_bounds import format_count, max_token_bytes, shortest_json, shortest_lark
from mlx_dgemma.decoding.sampler import StepOutput, initial_canvas
from mlx_dgemma.errors import ConstraintError, GrammarBusy

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # stub-only: llguidance does not export it at runtime

# json.dumps's default spacing: what models (the demo model included) were trained to write.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
HOLE = re.compile(r"\{\{(\d*)\}\}")


# Bounds on compiling a user's grammar, so that a hostile one costs a bounded amount of CPU and memory: its size,
# llguidance's own limits (``LLParserLimits``), the compiling time (a checked compile waits at most
# ``COMPILE_TIMEOUT_S``; the engine cannot be interrupted, so it finishes in the background, holding its slot)
# and how many compile at once (``COMPILE_SLOTS``; more is a ``GrammarBusy``).
MAX_GRAMMAR_BYTES = 256 * 1024
COMPILE_TIMEOUT_S = 20.0
COMPILE_SLOTS = 2
NEED_LIMIT = (
    4096  # the most tokens the shortest-answer search walks (each step is bounded by the engine's fuel)
)
# A canvas whose projection has replaced some of the model's answer tokens in this many steps in a row closes the
# answer (``decoding.hooks.Constrained``): the model does not want what the grammar demands (a forced tool call on
# a model that never learnt tool calls), and denoising on would fight it to the canvas's last step, canvas after
# canvas, up to max_tokens. 48 is the released model's whole step budget a canvas. Measured (this 2-core CPU):
# the demo model's records under their schema (24 held-out items, no drafter) fought at most 7 steps in a row; the
# 24-token demo model held to ``age <= 30`` against its prompt's 34 (``tests/canvas_combinations.py``) fights 32-40
# steps and then settles. 16 would close that answer too, with the same tokens in 17 passes instead of 41.
FOUGHT_STEPS = 48


# ----------------------------------------------------------------------------------------------------------
# Compiling


def grammar_of(response_format: dict[str, Any] | None = None, json_schema: Any = None) -> str | None:
    """The llguidance grammar of an OpenAI ``response_format`` (or of a bare ``json_schema``), or ``None``.

    ``response_format`` types: ``text`` (no constraint), ``json_object`` (any JSON object), ``json_schema``
    (``{"json_schema": {"schema": {...}, "strict": true, "name": ...}}``), and two extensions: ``regex``
    (``{"regex": "..."}``) and ``lark`` (``{"lark": "..."}``, llguidance's Lark dialect).
    """
    if json_schema is None and response_format is None:
        return None
    import llguidance as llg

    if json_schema is not None and response_format is not None:
        raise ConstraintError("give either json_schema or response_format, not both")
    if json_schema is not None:
        return llg.LLMatcher.grammar_from_json_schema(_checked_schema(json_schema), defaults=JSON_OPTIONS)
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ConstraintError(
            'response_format must be an object with a "type" (text, json_object, json_schema, '
            f"regex or lark), got {response_format!r}"
        )
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ConstraintError(
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}'
            )
        return llg.LLMatcher.grammar_from_json_schema(_checked_schema(spec["schema"]), defaults=JSON_OPTIONS)
    if kind in ("regex", "lark"):
        text = response_format.get(kind)
        if not isinstance(text, str) or not text:
            raise ConstraintError(f'response_format {kind} needs a non-empty string field "{kind}"')
        _check_size(len(text.encode("utf-8")), f"the {kind} grammar" if kind == "lark" else "the regex")
        return (
            llg.LLMatcher.grammar_from_regex(text)
            if kind == "regex"
            else llg.LLMatcher.grammar_from_lark(text)
        )
    raise ConstraintError(
        f"response_format type {kind!r} is not supported: use text, json_object, json_schema, regex or lark"
    )


def _schema_dict(schema: Any) -> dict[str, Any]:
    if isinstance(schema, str):
        from mlx_dgemma.runtime.bounded import parse_json

        schema = parse_json(schema, "the JSON schema", ConstraintError, "fix the schema text")
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be a JSON object (got {type(schema).__name__})")
    return schema


def _check_size(size: int, what: str) -> None:
    if size > MAX_GRAMMAR_BYTES:
        raise ConstraintError(
            f"{what} is {size} bytes, more than the {MAX_GRAMMAR_BYTES} bytes a grammar may take: shorten it"
        )


def _checked_schema(schema: Any) -> dict[str, Any]:
    """The schema as a dict, size-capped and checked against its metaschema (:func:`check_json_schema`)."""
    schema = _schema_dict(schema)
    _check_size(len(json.dumps(schema)), "the JSON schema")
    check_json_schema(schema)
    return schema


def check_json_schema(schema: Any, what: str = "the JSON schema") -> None:
    """Check ``schema`` against its metaschema (the ``$schema`` it names, else Draft 2020-12): a keyword of the
    wrong JSON type (``"pattern": 5``, ``"minItems": "2"``, ``"enum": 5``, ``"properties": []``,
    ``"required": 3``) raises :class:`ConstraintError` whose ``where`` is the keyword's path in the schema."""
    import jsonschema

    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ConstraintError(f"{what} must be a JSON object (got {type(schema).__name__})")
    drafts = [jsonschema.Draft202012Validator, jsonschema.Draft7Validator, jsonschema.Draft4Validator]
    if "$schema" in schema:
        with warnings.catch_warnings():  # an unknown $schema: the default draft, without a warning
            warnings.simplefilter("ignore")
            drafts = [jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)]
    error = None
    for cls in drafts:  # without $schema: valid under any of them will do (tools written for older drafts)
        try:
            found = jsonschema.exceptions.best_match(cls(cls.META_SCHEMA).iter_errors(schema))
        except RecursionError:
            raise ConstraintError(f"{what} is nested too deeply: flatten it") from None
        if found is None:
            return
        error = error or found
    assert error is not None  # drafts is never empty: every one found an error
    where = ".".join(str(p) for p in error.absolute_path)
    reason = " ".join(error.message.split())
    if len(reason) > 160:
        reason = reason[:157] + "..."
    at = f" at {where}" if where else ""
    raise ConstraintError(f"invalid or unsupported JSON schema{at}: {reason}; fix that keyword", where)


def _schema_of(response_format: dict[str, Any] | None, json_schema: Any) -> dict[str, Any] | None:
    if json_schema is not None:
        return _schema_dict(json_schema)
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        return _schema_dict(response_format["json_schema"]["schema"])
    return None


def check_shortest(
    llt: Any, response_format: dict[str, Any] | None, json_schema: Any, max_tokens: int
) -> None:
    """Refuse a schema that accepts nothing, or whose shortest answer cannot fit in ``max_tokens``, before
    compiling it (the bound is exact for lengths the schema forces: ``minLength``, ``minItems``, ...)."""
    schema = _schema_of(response_format, json_schema)
    found, what = (shortest_json(schema) if schema is not None else None), "schema"
    if schema is None and isinstance(response_format, dict) and response_format.get("type") == "lark":
        found, what = shortest_lark(response_format["lark"], max_token_bytes(llt)), "grammar"
        if found is not None and found[0] == math.inf:
            rule = next((n for n in found[1] if n != "start"), "start")
            raise ConstraintError(
                f"the grammar matches nothing: rule {rule!r} can never end (every "
                "alternative refers back to it); give it an alternative without itself"
            )
    if found is None:
        return
    size, endless = found
    if size == math.inf:
        if endless:
            raise ConstraintError(
                f"the schema's $ref cycle can never end: every answer would nest {endless[0]!r} "
                "in itself forever; make the recursion optional (not required, or minItems 0)"
            )
        raise ConstraintError(
            "the schema accepts no value at all (false, an empty enum, or a required property "
            "that is false): fix the schema"
        )
    tokens = math.ceil(size / max_token_bytes(llt))
    if tokens > max_tokens:
        fix = (
            "lower minLength/minItems/minProperties" if what == "schema" else "shorten the grammar's answers"
        )
        raise ConstraintError(
            f"max_tokens={max_tokens} is too small: the shortest answer this {what} allows is "
            f"{format_count(size)} bytes, at least {format_count(tokens)} tokens; raise max_tokens or {fix}"
        )


def read_schema(path: str) -> dict[str, Any]:
    """A JSON schema file, as a dict; one-line errors for a missing file, one that is not a regular file (a FIFO,
    ``/dev/zero``), one over ``bounded.MAX_INPUT_BYTES``, text that is not UTF-8, and bad or too deeply nested JSON."""
    from mlx_dgemma.runtime.bounded import read_text

    text = read_text(path, what="JSON schema file", error=ConstraintError)
    try:
        return _schema_dict(text)
    except ConstraintError as e:
        raise ConstraintError(f"{path}: {e}") from None


def ll_tokenizer(tokenizer: Any, eos_ids: Sequence[int], vocab_size: int) -> Any:
    """An ``llguidance.LLTokenizer`` for a Hugging Face fast tokenizer (or mlx-lm's wrapper of one)."""
    import llguidance as llg

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf, "backend_tokenizer", None) or (hf if hasattr(hf, "to_str") else None)
    if backend is None:
        raise ConstraintError(
            "structured output needs a Hugging Face fast tokenizer (tokenizer.json); "
            f"this one is {type(hf).__name__}"
        )
    cached = getattr(hf, "_mlx_dgemma_llg", None)
    if cached is not None and cached[0] == (tuple(eos_ids), vocab_size):
        return cached[1]
    llt = llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))
    with contextlib.suppress(AttributeError):  # building it costs up to a second on a large vocabulary
        hf._mlx_dgemma_llg = ((tuple(eos_ids), vocab_size), llt)
    return llt


def matcher(llt: Any, grammar: str) -> Any:
    """A fresh ``LLMatcher`` under ``LLParserLimits`` (without llguidance's verbose state dumps); raise
    :class:`ConstraintError` with the engine's reason, as one line, for a bad grammar, or one that fails at its
    first step (a ``$ref`` that only refers to itself gets that far)."""
    import llguidance as llg

    m = llg.LLMatcher(llt, grammar, log_level=0, limits=llg.LLParserLimits(verbose_errors=False))
    if not m.is_error():
        first = m.deep_copy()
        first.compute_bitmask()
        if first.is_error():
            m = first
    if m.is_error():
        raise ConstraintError(f"invalid or unsupported grammar/schema: {engine_reason(m.get_error())}")
    return m


def engine_reason(text: str) -> str:
    """llguidance's error text as one short line: no source excerpt, state dump, panic text or backtrace."""
    text = str(text).split("<state>")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or any("panicked" in line or "backtrace" in line.lower() for line in lines):
        return "the grammar engine cannot compile it (too large or too complex): simplify it"
    first = lines[0]
    if first.split()[0] in ("NoExtensionBias", "NoExtension", "LexerTooComplex", "ParserTooComplex"):
        return f"the grammar admits no answer here ({first.split()[0]}): check for a rule or $ref that never ends"
    detail = next((line for line in lines[1:] if line.startswith("error:")), "")
    reason = f"{first.rstrip(':')}: {detail.removeprefix('error:').strip()}" if detail else first
    reason = re.sub(r'"([^"]{40})[^"]+"', r'"\1..."', reason)  # the user's own long text, quoted back
    return reason if len(reason) <= 240 else reason[:237] + "..."


# ----------------------------------------------------------------------------------------------------------
# Constraints


class Constraint:
    """What the block loop asks of a constraint (batch of one row): see :func:`constrained_step`."""

    def fixed(self, offset: int, length: int) -> dict[int, int]:
        """Canvas positions (from 0) held at fixed tokens in the canvas starting at answer position ``offset``."""
        return {}

    def project(self, offset: int, argmax: np.ndarray, row: Callable[[int], np.ndarray]) -> np.ndarray:
        """The canvas ``argmax`` (int, ``[C]``) projected onto the constraint; ``row(i)`` gives logits ``[V]``."""
        raise NotImplementedError

    def commit(self, tokens: Sequence[int]) -> None:
        """Advance past a committed (finalized) canvas."""

    # Bounded answers (``decoding.hooks.Constrained`` counts the steps): whether the last projection replaced a
    # token of the model's answer, whether the answer is closing, and the request to close it.
    overrode = False
    closing = False

    def close(self) -> bool:
        """Close the answer from now on, as soon as the constraint allows (``False``: it cannot be closed)."""
        return False


def _allowed(bitmask: bytes, vocab: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")[:vocab].astype(bool)


def _best(row: np.ndarray, allowed: np.ndarray) -> int:
    if not allowed.any():
        raise ConstraintError("the grammar allows no token here: it cannot be completed with this tokenizer")
    return int(np.argmax(np.where(allowed[: row.shape[0]], row, -np.inf)))


def _overrode(argmax: np.ndarray, projected: np.ndarray, eos: set[int]) -> bool:
    """Whether the projection replaced a token of the model's answer (up to its end token; the pad after the end
    does not count: the model need not write it)."""
    ends = np.flatnonzero(np.isin(projected, list(eos)))
    stop = int(ends[0]) + 1 if len(ends) else len(projected)
    return bool((projected[:stop] != argmax[:stop]).any())


class GrammarConstraint(Constraint):
    """Committed text always matches the grammar, and is complete by ``max_tokens`` when the grammar allows:
    near the budget's end a token is kept only if a short completion still fits after it; otherwise the
    closing token (:func:`closing_cost`) is taken."""

    def __init__(
        self,
        llt: Any,
        grammar: str,
        eos_ids: Sequence[int],
        pad_id: int,
        vocab: int,
        max_tokens: int,
        canvas_length: int,
    ):
        self.matcher = matcher(llt, grammar)
        self.eos, self.eos_set, self.pad, self.vocab = int(eos_ids[0]), set(eos_ids), pad_id, vocab
        self.ended, self.max_tokens, self.cost = False, max_tokens, closing_cost(llt, vocab)
        self.committed = 0
        self.order = np.argsort(self.cost, kind="stable")  # cheapest closing tokens first
        self.finite = int(np.isfinite(self.cost).sum())
        self.klass = (np.nan_to_num(self.cost, posinf=-2000) // 1000).astype(np.int32)  # first-byte rank
        self.min_length = self.need(self.matcher, min(max(4 * max_tokens, 256), NEED_LIMIT))
        # Positions this close to max_tokens check that the answer can still be closed in time.
        self.tail = canvas_length + (self.min_length or 0)
        self.overrode = self.closing = False

    def close(self) -> bool:
        """From now on each projection ends the answer at the greedy closing completion from the committed text
        (:meth:`need`): a model token is kept only where that completion still fits after it, and the end token
        is written as soon as the grammar allows one. The hook that bounds a fought-over canvas calls this."""
        self.closing = True
        return True

    def _end(self, offset: int) -> int:
        """The answer position the projection of the canvas at ``offset`` must close the answer by: ``max_tokens``,
        or while closing the end of the shortest completion found (its end token included)."""
        if not self.closing:
            return self.max_tokens
        m, room = self.matcher.deep_copy(), min(max(self.max_tokens - offset, 0), NEED_LIMIT)
        for length in range(room + 1):
            words = np.frombuffer(m.compute_bitmask(), dtype=np.uint32)
            if m.is_stopped() or (words[self.eos >> 5] >> (self.eos & 31)) & 1:
                return min(self.max_tokens, offset + length + 1)
            m.consume_token(self._closer(m, words))
        return self.max_tokens

    def _closer(self, m: Any, words: np.ndarray) -> int:
        """While closing, the next token of the shortest completion: of the cheapest allowed token of each closing
        class, the one after which :meth:`need` is shortest (ties: the cheaper). A look ahead of one token, where
        :meth:`need` alone takes a few tokens of string content for closers first (a ``"`` inside Gemma 4's
        ``<|"|>`` strings, which only ``<`` closes). The cheapest allowed token when no completion is found."""
        order = self.order[: self.finite]
        cand = order[((words[order >> 5] >> (order & 31).astype(np.uint32)) & 1).astype(bool)]
        if not len(cand):
            raise ConstraintError(
                "the grammar allows no token here: it cannot be completed with this tokenizer"
            )
        _, first = np.unique(self.klass[cand], return_index=True)
        best, best_len = int(cand[0]), None
        for t in sorted(int(c) for c in cand[first]):
            after = m.deep_copy()
            n = self.need(after, NEED_LIMIT) if after.consume_token(t) else None
            if n is not None and (best_len is None or (n, self.cost[t]) < (best_len, self.cost[best])):
                best, best_len = t, n
        return best

    def need(self, m: Any, limit: int) -> int | None:
        """Tokens a greedy closing completion takes from matcher state ``m`` (closing tokens first, so near
        the shortest for JSON); ``None`` if more than ``limit``."""
        m = m.deep_copy()
        last, run = -1, 0
        for length in range(limit + 1):
            words = np.frombuffer(m.compute_bitmask(), dtype=np.uint32)
            if m.is_stopped() or any((words[e >> 5] >> (e & 31)) & 1 for e in self.eos_set if e < self.vocab):
                return length
            # A closer that repeats 4 times is string content here (a '"' in a Gemma 4 <|"|> string): skip
            # every token that starts with it.
            t = self._cheapest(words, last if run >= 4 and last < 9 else -1)  # as _skip
            if t is None:
                return None
            k = int(self.klass[t])
            last, run = k, run + 1 if k == last else 1
            m.consume_token(t)
        return None

    def _cheapest(self, words: np.ndarray, skip_class: int = -1) -> int | None:
        """The allowed token of least closing cost; candidates in cost order, in growing chunks, because the
        closing tokens are few and a whole large vocabulary need not be unpacked for them."""
        for lo, hi in ((0, 64), (64, 4096), (4096, self.finite)):
            cand = self.order[lo:hi]
            hit = np.flatnonzero(
                ((words[cand >> 5] >> (cand & 31).astype(np.uint32)) & 1) & (self.klass[cand] != skip_class)
            )
            if len(hit):
                return int(cand[hit[0]])
        return None

    def project(self, offset: int, argmax: np.ndarray, row: Callable[[int], np.ndarray]) -> np.ndarray:
        m = self.matcher.deep_copy()  # under a microsecond; rollback cannot undo an EOS
        self._closing = (-1, 0)  # (class, run) of the closing tokens forced in this projection
        out = argmax.astype(np.int32).copy()  # an EOS keeps the model's own id; the grammar sees self.eos
        is_eos = np.isin(out, list(self.eos_set))
        seq = np.where(is_eos, self.eos, out)
        i, n, end = 0, len(out), self._end(offset)
        free = max(0, min(n, end - self.tail - offset))  # positions before the budget's tail
        while i < n:
            if self.ended:
                out[i:] = self.pad
                break
            if i >= free:
                if not self._tail_token(m, out, seq, is_eos, i, end - offset, row):
                    break
                i += 1
                continue
            run = min(m.validate_tokens(seq[i:].tolist()), free - i)  # the argmax's allowed run, in one call
            ends = np.nonzero(is_eos[i : i + run])[0]
            if len(ends):  # the model ended the answer where the grammar allows it
                out[i + ends[0] + 1 :] = self.pad
                break
            if run:
                m.consume_tokens(seq[i : i + run].tolist())
                i += run
                continue
            # Rejected: the best allowed token (EOS included, whichever id the model prefers, once complete).
            out[i] = _best(row(i), _allowed(m.compute_bitmask(), self.vocab))
            if out[i] in self.eos_set:
                out[i + 1 :] = self.pad
                break
            m.consume_token(int(out[i]))
            i += 1
        self.overrode = _overrode(argmax, out, self.eos_set)
        return out

    def _tail_token(
        self,
        m: Any,
        out: np.ndarray,
        seq: np.ndarray,
        is_eos: np.ndarray,
        i: int,
        room: int,
        row: Callable[[int], np.ndarray],
    ) -> bool:
        """Project position ``i`` near the budget's end, ``room`` positions after the canvas's start; ``False`` once
        the answer has ended there. While closing, the end token goes in as soon as the grammar allows it, and past
        ``room`` (the greedy completion is an estimate) the closing tokens go on until it does."""
        left = room - i  # positions left, this one included
        if self.closing:
            left = max(left, 1)
        bitmask = m.compute_bitmask()
        allowed = _allowed(bitmask, self.vocab)
        if self.closing and allowed[self.eos] and not is_eos[i]:
            out[i], out[i + 1 :] = self.eos, self.pad
            return False
        if left <= 0 or m.is_stopped() or (is_eos[i] and allowed[self.eos]):
            if left > 0:
                out[i] = out[i] if is_eos[i] else _best(row(i), allowed)
            out[i + 1 :] = self.pad if left > 0 else out[i + 1 :]
            return False
        t = int(seq[i])
        if not allowed[t] or not self._fits(m, t, left - 1):
            ranked = np.where(allowed, row(i), -np.inf)
            t = int(np.argmax(ranked))
            if not self._fits(m, t, left - 1):  # the model's best allowed does not fit either: close
                words = np.frombuffer(bitmask, dtype=np.uint32)
                cheapest = self._closer(m, words) if self.closing else self._cheapest(words, self._skip())
                t = self.eos if allowed[self.eos] or cheapest is None else cheapest
                k = int(self.klass[t])
                self._closing = (k, self._closing[1] + 1 if k == self._closing[0] else 1)
            out[i] = t
        if t in self.eos_set:
            out[i + 1 :] = self.pad
            return False
        m.consume_token(t)
        return True

    def _skip(self) -> int:
        """The closing class to skip: one picked 4 times in a row is string content (as in :meth:`need`)."""
        k, run = self._closing
        return k if run >= 4 and k < 9 else -1

    def _fits(self, m: Any, token: int, room: int) -> bool:
        if token in self.eos_set:
            return True
        after = m.deep_copy()
        return after.consume_token(token) and self.need(after, room) is not None

    def fresh(self) -> GrammarConstraint:
        """An independent copy in this one's state: the compiled grammar and its tables are shared (read-only),
        the matcher is copied (llguidance's ``deep_copy``, microseconds)."""
        twin = copy.copy(self)
        twin.matcher = self.matcher.deep_copy()
        return twin

    def commit(self, tokens: Sequence[int]) -> None:
        room = self.max_tokens - self.committed  # tokens past max_tokens are not part of the answer
        self.committed += len(tokens)
        for t in list(tokens)[: max(room, 0)]:
            if self.ended:
                return
            eos = t in self.eos_set
            if not self.matcher.consume_token(self.eos if eos else int(t)):
                raise ConstraintError(
                    f"internal error: a committed token broke the grammar "
                    f"({' '.join(self.matcher.get_error().split()[:20])})"
                )
            self.ended = eos


_COSTS: dict[int, np.ndarray] = {}
CLOSERS = frozenset(b'"]}')


def closing_cost(llt: Any, vocab: int) -> np.ndarray:
    """Per token, by its first byte: what ends the current value first (quotes, ``<`` opening Gemma 4's
    ``<|\"|>``, closing brackets, then ``,``), then 0/1, then shorter tokens (``GrammarConstraint.need``).

    ``,`` ranks before the digits because a number has no closing byte of its own: it ends only where the next
    token is not part of it. Ranked after them, the greedy search extends an unbounded number digit by digit and
    never sees it close, so near ``max_tokens`` only a leading ``0`` (after which JSON allows no digit) "fits".
    Within a rank, a token of closing bytes only (``"]}``) comes first, the longest first: it ends several levels
    in one token, as the model writes them; otherwise the search counts one token per level and closes early."""
    if id(llt) not in _COSTS:
        rank = {ord('"'): 0, ord("<"): 1, ord("}"): 2, ord("]"): 3, ord(","): 4, ord("0"): 5, ord("1"): 6}
        cost = np.full(vocab, np.inf)
        for t in range(min(vocab, llt.vocab_size)):
            b = llt.decode_bytes([t])
            if b and set(b) <= CLOSERS:  # '"]}': closes several levels in one token, the longest first
                cost[t] = rank[b[0]] * 1000 + 16 - min(len(b), 16)
            elif b:
                cost[t] = rank.get(b[0], 9) * 1000 + 16 + min(len(b), 983)
        _COSTS[id(llt)] = cost
    return _COSTS[id(llt)]


class InfillConstraint(Constraint):
    """A template with holes: fixed tokens are held at every step, holes take no special token, the answer
    ends (EOS) right after the template."""

    def __init__(
        self,
        segments: list[tuple[list[int] | None, int]],
        eos_ids: Sequence[int],
        pad_id: int,
        special: np.ndarray,
    ):
        # segments: (fixed tokens, 0) or (None, hole length)
        self.tokens: list[int | None] = []
        for fixed, hole in segments:
            self.tokens += fixed if fixed is not None else [None] * hole
        self.pad, self.special = pad_id, special
        self.eos_mask = np.zeros(len(special), dtype=bool)
        self.eos_mask[[e for e in eos_ids if e < len(special)]] = True

    @property
    def length(self) -> int:
        return len(self.tokens)

    def fixed(self, offset: int, length: int) -> dict[int, int]:
        held: dict[int, int] = {}
        for i in range(length):
            p = offset + i
            token = self.tokens[p] if p < self.length else None
            if token is not None:
                held[i] = token
            elif p > self.length:
                held[i] = self.pad
        return held

    def project(self, offset: int, argmax: np.ndarray, row: Callable[[int], np.ndarray]) -> np.ndarray:
        out = argmax.astype(np.int32).copy()
        held = self.fixed(offset, len(out))
        for i in range(len(out)):
            if i in held:
                out[i] = held[i]
            elif offset + i == self.length:  # the end of the answer: the end token the model prefers
                out[i] = _best(row(i), self.eos_mask)
            elif out[i] < len(self.special) and self.special[out[i]]:
                out[i] = _best(row(i), ~self.special)
        return out


def parse_infill(
    template: str, tokenizer: Any, limit: int | None = None
) -> list[tuple[list[int] | None, int]]:
    """Split ``"text {{N}} text ..."`` into fixed token runs and holes of ``N`` tokens.

    With ``limit`` (``max_tokens``, itself within the context window), holes that add up to more tokens are
    refused before anything is allocated for them."""
    if not isinstance(template, str) or not template:
        raise ConstraintError("infill must be a non-empty template string with holes like {{8}}")
    segments: list[tuple[list[int] | None, int]] = []
    pos = total = 0
    for m in HOLE.finditer(template):
        digits = m.group(1).lstrip("0")
        if not digits:
            raise ConstraintError(f"infill hole {m.group(0)!r} needs a size in tokens, e.g. {{{{8}}}}")
        # Compared as text first: int() of thousands of digits is itself an error (and slow).
        if limit is not None and (len(digits) > len(str(limit)) or total + int(digits) > limit):
            size = digits if len(digits) <= 24 else f"{digits[:8]}... ({len(digits)} digits)"
            raise ConstraintError(
                f"infill hole {{{{{size}}}}} takes the holes to more tokens than max_tokens "
                f"({limit}) allows: shrink the holes or raise max_tokens (up to the model's "
                "context window)"
            )
        if m.start() > pos:
            segments.append((list(tokenizer.encode(template[pos : m.start()], add_special_tokens=False)), 0))
        total += int(digits)
        segments.append((None, int(digits)))
        pos = m.end()
    if not any(fixed is None for fixed, _ in segments):
        raise ConstraintError("the infill template has no holes: mark each one with its size, e.g. {{8}}")
    if pos < len(template):
        segments.append((list(tokenizer.encode(template[pos:], add_special_tokens=False)), 0))
    return segments


@dataclass(frozen=True)
class FillInMiddle:
    """Fill-in-the-middle, as ``infill=FillInMiddle(suffix)``: the prompt is the text before the gap, and the
    answer is the middle, at most ``max_tokens`` tokens, that leads into ``suffix`` (text, or token ids as given).

    The answer's first canvas holds a hole of ``max_tokens`` positions, then the suffix's tokens, held fixed,
    then the end token: the decoder, bidirectional over the canvas, sees the suffix while it writes every position
    of the middle, in the document's order. The middle ends at the first end token or pad the model writes in
    the hole (:class:`MiddleConstraint`), else it fills the hole. The suffix is never part of the answer. Both
    must fit in one canvas: ``max_tokens`` plus the suffix's tokens at most ``canvas_length``."""

    suffix: str | Sequence[int]


class MiddleConstraint(InfillConstraint):
    """:class:`FillInMiddle`'s constraint: an open hole of ``size`` positions, then ``suffix`` held, then the
    end token (pad after it), in one canvas.

    In the hole the model may end the middle: its first end token or pad there is the end, written as the end
    token the model ranks best (so that the answer stops there, as any answer stops at its end token; a committed
    pad would be text). The positions after it are left to the model (the commit pads them, as after any end
    token): forcing pad over them from an early, uncertain step would empty the middle. Before the end, special
    tokens are refused as in any hole."""

    def __init__(
        self, size: int, suffix: list[int], eos_ids: Sequence[int], pad_id: int, special: np.ndarray
    ):
        super().__init__([(None, size), (suffix, 0)], eos_ids, pad_id, special)
        self.size = size

    def project(self, offset: int, argmax: np.ndarray, row: Callable[[int], np.ndarray]) -> np.ndarray:
        hole = min(max(self.size - offset, 0), len(argmax))  # the hole's positions in this canvas
        after = super().project(offset + hole, argmax[hole:], lambda i: row(hole + i))
        out = argmax[:hole].astype(np.int32).copy()
        for i, token in enumerate(out):
            if token < len(self.special) and self.eos_mask[token]:
                break
            if token == self.pad:  # the end, written as the end token
                out[i] = _best(row(i), self.eos_mask)
                break
            if token < len(self.special) and self.special[token]:
                out[i] = _best(row(i), ~self.special)
        return np.concatenate([out, after.astype(np.int32)])


def middle_constraint(
    fim: FillInMiddle,
    tokenizer: Any,
    eos_ids: Sequence[int],
    pad_id: int,
    special: np.ndarray,
    max_tokens: int,
    canvas_length: int,
) -> MiddleConstraint:
    """The constraint of a :class:`FillInMiddle` request; one-line errors for a suffix that is empty, is not text
    or token ids of this vocabulary, or does not fit beside a middle of ``max_tokens`` in one canvas."""
    suffix = fim.suffix
    if isinstance(suffix, str):
        ids = list(tokenizer.encode(suffix, add_special_tokens=False))
    elif isinstance(suffix, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in suffix):
        ids = list(suffix)
        if any(not 0 <= t < len(special) for t in ids):
            raise ConstraintError(f"the suffix has token ids outside the vocabulary (0..{len(special) - 1})")
    else:
        raise ConstraintError(f"the suffix must be text or token ids (got {type(suffix).__name__})")
    if not ids:
        raise ConstraintError("the suffix is empty: fill-in-the-middle needs text after the gap")
    if len(ids) >= canvas_length:
        raise ConstraintError(
            f"the suffix has {len(ids)} tokens, but it shares one {canvas_length}-token canvas with the "
            f"middle (so that the model sees it while writing the middle): send at most "
            f"{canvas_length - 1} tokens of it (its beginning)"
        )
    if max_tokens + len(ids) > canvas_length:
        raise ConstraintError(
            f"max_tokens={max_tokens} plus the suffix's {len(ids)} tokens do not fit in the "
            f"{canvas_length}-token canvas the middle and the suffix share: lower max_tokens to at most "
            f"{canvas_length - len(ids)} or shorten the suffix"
        )
    return MiddleConstraint(max_tokens, ids, eos_ids, pad_id, special)


_SPECIAL: dict[tuple[int, int], np.ndarray] = {}


def special_tokens(llt: Any, vocab: int) -> np.ndarray:
    """Which of the ``vocab`` ids are special tokens (bool), computed once per tokenizer: a loop over the
    released model's 262,144 ids is not something to repeat for every infill request."""
    key = (id(llt), vocab)
    if key not in _SPECIAL:
        _SPECIAL[key] = np.array([llt.is_special_token(t) for t in range(vocab)], dtype=bool)
    return _SPECIAL[key]


def make_constraint(
    tokenizer: Any,
    eos_ids: Sequence[int],
    pad_id: int,
    vocab_size: int,
    max_tokens: int,
    canvas_length: int,
    response_format: dict[str, Any] | None = None,
    json_schema: Any = None,
    infill: str | FillInMiddle | None = None,
    bounded: bool = False,
) -> Constraint | None:
    """The constraint for these options, checked against ``max_tokens``; ``None`` when unconstrained.

    ``bounded``: a grammar not compiled yet compiles in one of ``COMPILE_SLOTS`` (else :class:`GrammarBusy`) and
    is refused after ``COMPILE_TIMEOUT_S`` (the server checks a request's format so, off its worker)."""
    grammar = grammar_of(response_format, json_schema)
    if infill is not None and grammar is not None:
        raise ConstraintError(
            "infill and a response format cannot be combined: write the structure into the infill template"
        )
    eos_ids = list(eos_ids)
    if isinstance(infill, FillInMiddle):
        special = special_tokens(ll_tokenizer(tokenizer, eos_ids, vocab_size), vocab_size)
        return middle_constraint(infill, tokenizer, eos_ids, pad_id, special, max_tokens, canvas_length)
    if infill is not None:
        special = special_tokens(ll_tokenizer(tokenizer, eos_ids, vocab_size), vocab_size)
        c = InfillConstraint(parse_infill(infill, tokenizer, max_tokens), eos_ids, pad_id, special)
        if c.length > max_tokens:
            raise ConstraintError(
                f"the infill template takes {c.length} tokens with its holes, but max_tokens is "
                f"{max_tokens}: raise max_tokens or shrink the holes"
            )
        return c
    if grammar is None:
        return None
    _check_size(len(grammar.encode("utf-8")), "the compiled grammar")
    llt = ll_tokenizer(tokenizer, eos_ids, vocab_size)
    # Before compiling: the engine compiles a $ref cycle or an endless rule without a word (and may even stop
    # its matcher early, as if an answer were complete), and the greedy search below proves nothing.
    check_shortest(llt, response_format, json_schema, max_tokens)
    compiled = _compiled(llt, grammar, eos_ids, pad_id, vocab_size, max_tokens, canvas_length, bounded)
    short = compiled.min_length
    if short is not None and short > max_tokens:  # unknown (None) is not an error: the search is greedy
        raise ConstraintError(
            f"max_tokens={max_tokens} is too small: the shortest answer this schema/grammar allows "
            f"takes about {short} tokens; raise max_tokens"
        )
    return compiled


_COMPILED: OrderedDict[tuple, GrammarConstraint] = OrderedDict()
_COMPILED_MAX = 32
_COMPILED_LOCK = threading.Lock()  # the server's request thread checks a format while its worker generates


def _compiled(
    llt: Any,
    grammar: str,
    eos_ids: list[int],
    pad_id: int,
    vocab: int,
    max_tokens: int,
    canvas_length: int,
    bounded: bool = False,
) -> GrammarConstraint:
    """A fresh constraint for ``grammar``: compiled (and its shortest answer searched) once, then copied. The
    server compiles a request's format to refuse a bad one before queueing it, and generation builds it again;
    agents send the same schema with every request. The last ``_COMPILED_MAX`` grammars are kept."""
    key = (llt, grammar, tuple(eos_ids), pad_id, vocab, max_tokens, canvas_length)
    with _COMPILED_LOCK:
        compiled = _COMPILED.get(key)
        if compiled is not None:
            _COMPILED.move_to_end(key)
    if compiled is None:  # compiled outside the lock: a slow grammar does not hold up another request's
        build = (GrammarConstraint, llt, grammar, eos_ids, pad_id, vocab, max_tokens, canvas_length)
        compiled = _build(build, bounded)
        with _COMPILED_LOCK:
            _COMPILED[key] = compiled
            if len(_COMPILED) > _COMPILED_MAX:
                _COMPILED.popitem(last=False)
    return compiled.fresh()


_SLOTS = threading.BoundedSemaphore(COMPILE_SLOTS)
# llguidance recurses on a grammar's rule chains: a few thousand chained rules overflow an 8 MiB thread stack and
# kill the process (SIGSEGV). Compiles run on a thread with this much stack (reserved, not committed): enough for
# the longest chain MAX_GRAMMAR_BYTES can spell.
COMPILE_STACK_BYTES = 512 * 1024 * 1024
_STACK_LOCK = threading.Lock()


def _build(build: tuple, bounded: bool) -> GrammarConstraint:
    """``build[0](*build[1:])`` on its own thread, with ``COMPILE_STACK_BYTES`` of stack. ``bounded``: in one of
    ``COMPILE_SLOTS`` (taken without waiting: none free is :class:`GrammarBusy`), waited for at most
    ``COMPILE_TIMEOUT_S``. A compile past its time is refused; it runs on to its end (the engine cannot be
    interrupted) and only then gives its slot back, so hostile grammars hold at most ``COMPILE_SLOTS`` threads,
    never the worker nor the threads that prepare other requests."""
    if bounded and not _SLOTS.acquire(blocking=False):
        raise GrammarBusy(
            f"{COMPILE_SLOTS} grammars are compiling already: retry in a moment, or send a grammar "
            "this server has compiled before"
        )
    done, out = threading.Event(), {}

    def run() -> None:
        try:
            out["value"] = build[0](*build[1:])
        except BaseException as e:  # handed to the waiting caller
            out["error"] = e
        finally:
            if bounded:
                _SLOTS.release()
            done.set()

    try:
        with _STACK_LOCK:
            old = threading.stack_size()
            try:
                threading.stack_size(COMPILE_STACK_BYTES)
                threading.Thread(target=run, name="mlx_dgemma-grammar", daemon=True).start()
            except (ValueError, RuntimeError):  # no stack that large here: the default one
                threading.stack_size(old)
                threading.Thread(target=run, name="mlx_dgemma-grammar", daemon=True).start()
            finally:
                threading.stack_size(old)
    except BaseException:
        if bounded:
            _SLOTS.release()
        raise
    if not done.wait(COMPILE_TIMEOUT_S if bounded else None):
        raise ConstraintError(
            f"the grammar/schema took more than {COMPILE_TIMEOUT_S:g} s to compile: simplify it"
        )
    if "error" in out:
        raise out["error"]
    return out["value"]


# ----------------------------------------------------------------------------------------------------------
# The hook into the block loop


def start_canvas(
    constraint: Constraint,
    offset: int,
    given: mx.array | None,
    key: mx.array,
    batch: int,
    length: int,
    vocab: int,
) -> mx.array | None:
    """The canvas to start denoising from: ``given`` (or noise) with the held positions written in; ``given``
    itself when nothing is held in this canvas."""
    held = constraint.fixed(offset, length)
    if not held:
        return given
    canvas = given if given is not None else initial_canvas(key, batch, length, vocab)
    return _hold(canvas, held)


def _hold(canvas: mx.array, held: dict[int, int]) -> mx.array:
    full = np.array(canvas, dtype=np.int32)
    full[:, list(held)] = list(held.values())
    return mx.array(full)


def project_canvas(
    constraint: Constraint,
    offset: int,
    argmax: np.ndarray,
    canvas: np.ndarray,
    row: Callable[[int], np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """A step's argmax canvas (one row, int ``[C]``) projected onto ``constraint``, and the positions to write into
    the next decoder input (``canvas``): every position the projection changed and every held position whose
    input token differs. ``row(i)`` gives position ``i``'s logits ``[V]`` (the projection's only ranking)."""
    projected = constraint.project(offset, argmax, row).astype(np.int32)
    write = projected != argmax
    for i in constraint.fixed(offset, len(projected)):
        write[i] |= canvas[i] != projected[i]
    return projected, write


def constrained_step(
    step_fn: Callable[..., StepOutput], constraint: Constraint, offset: int
) -> Callable[..., StepOutput]:
    """Wrap a sampler step so that its argmax is projected onto ``constraint`` (module docstring; the canvas
    loop's ``decoding.hooks.Constrained`` does the same for any stepper).

    The projected argmax replaces the step's argmax; every position the projection changed, and every held
    position, is written into the next decoder input. One host round-trip per step (batch of one row).
    """

    def step(logits, canvas, argmax, prev_logits, done, history, n, key) -> StepOutput:
        out = step_fn(logits, canvas, argmax, prev_logits, done, history, n, key)
        mx.eval(out.argmax, out.logits, out.canvas)
        raw = np.asarray(out.argmax[0]).astype(np.int32)
        projected, write = project_canvas(
            constraint,
            offset,
            raw,
            np.asarray(out.canvas[0]),
            lambda i: np.asarray(out.logits[0, i], dtype=np.float32),
        )
        new_argmax = mx.array(projected)[None]
        return out._replace(argmax=new_argmax, canvas=mx.where(mx.array(write)[None], new_argmax, out.canvas))

    return step
