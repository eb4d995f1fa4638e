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
``scripts/bench_constrain.py`` measures it against a decoder pass.

Infill (:class:`InfillConstraint`): a template whose fixed tokens are written into the canvas before every
decoder pass and into every argmax, so they are never re-noised and always committed; the model fills the
holes around them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import DGemmaError
from .sampler import StepOutput, initial_canvas

# json.dumps's default spacing: what models (the demo model included) were trained to write.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
HOLE = re.compile(r"\{\{(\d*)\}\}")


class ConstraintError(DGemmaError, ValueError):
    """A bad schema, grammar or infill template; the message is one line naming the problem and the fix."""


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
        return llg.LLMatcher.grammar_from_json_schema(_schema_dict(json_schema), defaults=JSON_OPTIONS)
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ConstraintError('response_format must be an object with a "type" (text, json_object, json_schema, '
                              f"regex or lark), got {response_format!r}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ConstraintError('response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}')
        return llg.LLMatcher.grammar_from_json_schema(_schema_dict(spec["schema"]), defaults=JSON_OPTIONS)
    if kind in ("regex", "lark"):
        text = response_format.get(kind)
        if not isinstance(text, str) or not text:
            raise ConstraintError(f'response_format {kind} needs a non-empty string field "{kind}"')
        return llg.LLMatcher.grammar_from_regex(text) if kind == "regex" else llg.LLMatcher.grammar_from_lark(text)
    raise ConstraintError(f"response_format type {kind!r} is not supported: use text, json_object, json_schema, "
                          "regex or lark")


def _schema_dict(schema: Any) -> dict[str, Any]:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ConstraintError(f"the JSON schema is not valid JSON ({e}): fix the schema text") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be a JSON object (got {type(schema).__name__})")
    return schema


def read_schema(path: str) -> dict[str, Any]:
    """A JSON schema file, as a dict; one-line errors for a missing file or bad JSON."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConstraintError(f"cannot read the JSON schema file {path}: {e.strerror}") from None
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
        raise ConstraintError("structured output needs a Hugging Face fast tokenizer (tokenizer.json); "
                              f"this one is {type(hf).__name__}")
    cached = getattr(hf, "_mlx_dgemma_llg", None)
    if cached is not None and cached[0] == (tuple(eos_ids), vocab_size):
        return cached[1]
    llt = llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))
    with contextlib.suppress(AttributeError):  # building it costs up to a second on a large vocabulary
        hf._mlx_dgemma_llg = ((tuple(eos_ids), vocab_size), llt)
    return llt


def matcher(llt: Any, grammar: str) -> Any:
    """A fresh ``LLMatcher``; raise :class:`ConstraintError` with llguidance's message for a bad grammar."""
    import llguidance as llg

    m = llg.LLMatcher(llt, grammar, log_level=0)
    if m.is_error():
        reason = " ".join(m.get_error().split())
        raise ConstraintError(f"invalid or unsupported grammar/schema: {reason}")
    return m


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


def _allowed(bitmask: bytes, vocab: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")[:vocab].astype(bool)


def _best(row: np.ndarray, allowed: np.ndarray) -> int:
    if not allowed.any():
        raise ConstraintError("the grammar allows no token here: it cannot be completed with this tokenizer")
    return int(np.argmax(np.where(allowed[: row.shape[0]], row, -np.inf)))


class GrammarConstraint(Constraint):
    """Committed text always matches the grammar, and is complete by ``max_tokens`` when the grammar allows:
    near the budget's end a token is kept only if a short completion still fits after it; otherwise the
    closing token (:func:`closing_cost`) is taken."""

    def __init__(self, llt: Any, grammar: str, eos_ids: Sequence[int], pad_id: int, vocab: int,
                 max_tokens: int, canvas_length: int):
        self.matcher = matcher(llt, grammar)
        self.eos, self.eos_set, self.pad, self.vocab = int(eos_ids[0]), set(eos_ids), pad_id, vocab
        self.ended, self.max_tokens, self.cost = False, max_tokens, closing_cost(llt, vocab)
        self.committed = 0
        self.order = np.argsort(self.cost, kind="stable")  # cheapest closing tokens first
        self.finite = int(np.isfinite(self.cost).sum())
        self.klass = (np.nan_to_num(self.cost, posinf=-2000) // 1000).astype(np.int32)  # first-byte rank
        self.min_length = self.need(self.matcher, max(4 * max_tokens, 256))
        # Positions this close to max_tokens check that the answer can still be closed in time.
        self.tail = canvas_length + (self.min_length or 0)

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
            hit = np.flatnonzero(((words[cand >> 5] >> (cand & 31).astype(np.uint32)) & 1) & (self.klass[cand] != skip_class))
            if len(hit):
                return int(cand[hit[0]])
        return None

    def project(self, offset: int, argmax: np.ndarray, row: Callable[[int], np.ndarray]) -> np.ndarray:
        m = self.matcher.deep_copy()  # under a microsecond; rollback cannot undo an EOS
        self._closing = (-1, 0)  # (class, run) of the closing tokens forced in this projection
        out = argmax.astype(np.int32).copy()  # an EOS keeps the model's own id; the grammar sees self.eos
        is_eos = np.isin(out, list(self.eos_set))
        seq = np.where(is_eos, self.eos, out)
        i, n = 0, len(out)
        free = max(0, min(n, self.max_tokens - self.tail - offset))  # positions before the budget's tail
        while i < n:
            if self.ended:
                out[i:] = self.pad
                break
            if i >= free:
                if not self._tail_token(m, out, seq, is_eos, i, offset, row):
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
        return out

    def _tail_token(self, m: Any, out: np.ndarray, seq: np.ndarray, is_eos: np.ndarray, i: int, offset: int,
                    row: Callable[[int], np.ndarray]) -> bool:
        """Project position ``i`` near the budget's end; ``False`` once the answer has ended there."""
        left = self.max_tokens - offset - i  # positions left, this one included
        bitmask = m.compute_bitmask()
        allowed = _allowed(bitmask, self.vocab)
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
                cheapest = self._cheapest(np.frombuffer(bitmask, dtype=np.uint32), self._skip())
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
                raise ConstraintError(f"internal error: a committed token broke the grammar "
                                      f"({' '.join(self.matcher.get_error().split()[:20])})")
            self.ended = eos


_COSTS: dict[int, np.ndarray] = {}


def closing_cost(llt: Any, vocab: int) -> np.ndarray:
    """Per token: quotes (``<`` opens Gemma 4's ``<|\"|>``) and closing brackets first, then 0/1, then shorter
    tokens (``GrammarConstraint.need``)."""
    if id(llt) not in _COSTS:
        rank = {ord('"'): 0, ord("<"): 1, ord("}"): 2, ord("]"): 3, ord("0"): 4, ord("1"): 5}
        cost = np.full(vocab, np.inf)
        for t in range(min(vocab, llt.vocab_size)):
            b = llt.decode_bytes([t])
            if b:
                cost[t] = rank.get(b[0], 9) * 1000 + min(len(b), 999)
        _COSTS[id(llt)] = cost
    return _COSTS[id(llt)]


class InfillConstraint(Constraint):
    """A template with holes: fixed tokens are held at every step, holes take no special token, the answer
    ends (EOS) right after the template."""

    def __init__(self, segments: list[tuple[list[int] | None, int]], eos_ids: Sequence[int], pad_id: int,
                 special: np.ndarray):
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
        held = {}
        for i in range(length):
            p = offset + i
            if p < self.length and self.tokens[p] is not None:
                held[i] = self.tokens[p]
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


def parse_infill(template: str, tokenizer: Any) -> list[tuple[list[int] | None, int]]:
    """Split ``"text {{N}} text ..."`` into fixed token runs and holes of ``N`` tokens."""
    if not isinstance(template, str) or not template:
        raise ConstraintError("infill must be a non-empty template string with holes like {{8}}")
    segments: list[tuple[list[int] | None, int]] = []
    pos = 0
    for m in HOLE.finditer(template):
        if not m.group(1) or int(m.group(1)) < 1:
            raise ConstraintError(f"infill hole {m.group(0)!r} needs a size in tokens, e.g. {{{{8}}}}")
        if m.start() > pos:
            segments.append((list(tokenizer.encode(template[pos : m.start()], add_special_tokens=False)), 0))
        segments.append((None, int(m.group(1))))
        pos = m.end()
    if not any(fixed is None for fixed, _ in segments):
        raise ConstraintError("the infill template has no holes: mark each one with its size, e.g. {{8}}")
    if pos < len(template):
        segments.append((list(tokenizer.encode(template[pos:], add_special_tokens=False)), 0))
    return segments


def make_constraint(
    tokenizer: Any,
    eos_ids: Sequence[int],
    pad_id: int,
    vocab_size: int,
    max_tokens: int,
    canvas_length: int,
    response_format: dict[str, Any] | None = None,
    json_schema: Any = None,
    infill: str | None = None,
) -> Constraint | None:
    """The constraint for these options, checked against ``max_tokens``; ``None`` when unconstrained."""
    grammar = grammar_of(response_format, json_schema)
    if infill is not None and grammar is not None:
        raise ConstraintError("infill and a response format cannot be combined: write the structure into the "
                              "infill template")
    eos_ids = list(eos_ids)
    if infill is not None:
        llt = ll_tokenizer(tokenizer, eos_ids, vocab_size)
        special = np.array([llt.is_special_token(t) for t in range(vocab_size)], dtype=bool)
        c = InfillConstraint(parse_infill(infill, tokenizer), eos_ids, pad_id, special)
        if c.length > max_tokens:
            raise ConstraintError(f"the infill template takes {c.length} tokens with its holes, but max_tokens is "
                                  f"{max_tokens}: raise max_tokens or shrink the holes")
        return c
    if grammar is None:
        return None
    llt = ll_tokenizer(tokenizer, eos_ids, vocab_size)
    c = _compiled(llt, grammar, eos_ids, pad_id, vocab_size, max_tokens, canvas_length)
    short = c.min_length
    if short is not None and short > max_tokens:  # unknown (None) is not an error: the search is greedy
        raise ConstraintError(f"max_tokens={max_tokens} is too small: the shortest answer this schema/grammar allows "
                              f"takes about {short} tokens; raise max_tokens")
    return c


_COMPILED: OrderedDict[tuple, GrammarConstraint] = OrderedDict()
_COMPILED_MAX = 32
_COMPILED_LOCK = threading.Lock()  # the server's request thread checks a format while its worker generates


def _compiled(llt: Any, grammar: str, eos_ids: list[int], pad_id: int, vocab: int, max_tokens: int,
              canvas_length: int) -> GrammarConstraint:
    """A fresh constraint for ``grammar``: compiled (and its shortest answer searched) once, then copied. The
    server compiles a request's format to refuse a bad one before queueing it, and generation builds it again;
    agents send the same schema with every request. The last ``_COMPILED_MAX`` grammars are kept."""
    key = (llt, grammar, tuple(eos_ids), pad_id, vocab, max_tokens, canvas_length)
    with _COMPILED_LOCK:
        compiled = _COMPILED.get(key)
        if compiled is not None:
            _COMPILED.move_to_end(key)
    if compiled is None:  # compiled outside the lock: a slow grammar does not hold up another request's
        compiled = GrammarConstraint(llt, grammar, eos_ids, pad_id, vocab, max_tokens, canvas_length)
        with _COMPILED_LOCK:
            _COMPILED[key] = compiled
            if len(_COMPILED) > _COMPILED_MAX:
                _COMPILED.popitem(last=False)
    return compiled.fresh()


# ----------------------------------------------------------------------------------------------------------
# The hook into the block loop


def start_canvas(constraint: Constraint, offset: int, given: mx.array | None, key: mx.array,
                 batch: int, length: int, vocab: int) -> mx.array | None:
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


def constrained_step(step_fn: Callable[..., StepOutput], constraint: Constraint, offset: int
                     ) -> Callable[..., StepOutput]:
    """Wrap a sampler step so that its argmax is projected onto ``constraint`` (module docstring).

    The projected argmax replaces the step's argmax; every position the projection changed, and every held
    position, is written into the next decoder input. One host round-trip per step (batch of one row).
    """

    def step(logits, canvas, argmax, prev_logits, done, history, n, key) -> StepOutput:
        out = step_fn(logits, canvas, argmax, prev_logits, done, history, n, key)
        mx.eval(out.argmax, out.logits)
        raw = np.asarray(out.argmax[0]).astype(np.int32)
        projected = constraint.project(offset, raw, lambda i: np.asarray(out.logits[0, i], dtype=np.float32))
        write = projected != raw
        for i in constraint.fixed(offset, len(raw)):
            write[i] = True
        new_argmax = mx.array(projected)[None]
        new_canvas = mx.where(mx.array(write)[None], new_argmax, out.canvas)
        return out._replace(argmax=new_argmax, canvas=new_canvas)

    return step
