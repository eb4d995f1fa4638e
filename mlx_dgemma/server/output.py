"""The answer's text split, as it arrives, into content, reasoning (the thinking channel) and tool calls.

Tool calls are parsed with the parser mlx-lm's tokenizer wrapper infers from the chat template
(``tokenizer.tool_parser``, e.g. ``mlx_lm/tool_parsers/gemma4.py`` for ``<|tool_call>call:name{...}<tool_call|>``),
not a parser of our own. Thinking markers are mlx-lm's too (``tokenizer.think_start`` / ``think_end``: Gemma 4's
``<|channel>thought`` ... ``<channel|>``), else the ``<start_of_thought>`` / ``<end_of_thought>`` pair of the
embedded demo model's template.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

log = logging.getLogger("mlx_dgemma.server")

DEMO_THOUGHT = ("<start_of_thought>", "<end_of_thought>")

Piece = tuple[str, str]  # ("content" | "reasoning", text)


def thought_markers(tokenizer: Any) -> tuple[str, str] | None:
    """The (start, end) of the thinking channel for this tokenizer, or None if it has none."""
    if getattr(tokenizer, "has_thinking", False) and getattr(tokenizer, "think_end", None):
        return tokenizer.think_start, tokenizer.think_end
    if DEMO_THOUGHT[1] in (getattr(tokenizer, "chat_template", None) or ""):
        return DEMO_THOUGHT
    return None


def tool_markers(tokenizer: Any) -> tuple[str, str, Any] | None:
    """(start, end, parser) of tool calls for this tokenizer (mlx-lm's inference), or None."""
    parser = getattr(tokenizer, "tool_parser", None)
    start, end = getattr(tokenizer, "tool_call_start", None), getattr(tokenizer, "tool_call_end", None)
    return (start, end, parser) if parser is not None and start and end else None


class OutputParser:
    """Feed the answer's text piece by piece; get back content and reasoning pieces, and at the end the
    tool calls (OpenAI's ``tool_calls`` entries). Text that could still begin a marker is held back."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        thinking: bool,
        tools: bool,
        prompt_tail: str = "",
        tool_specs: list[dict[str, Any]] | None = None,
    ):
        self.thought = thought_markers(tokenizer) if thinking else None
        self.tool = tool_markers(tokenizer) if tools else None
        self.tool_specs = tool_specs
        self.buf, self.pos = "", 0
        # The generation prompt may already open the thought (the demo template does): start inside it.
        in_thought = self.thought is not None and prompt_tail.rstrip().endswith(self.thought[0])
        self.state = "reasoning" if in_thought else ("opening" if self.thought else "content")
        self.fresh_reasoning = True
        self.calls: list[str] = []  # raw tool-call texts, between the markers

    def feed(self, text: str) -> list[Piece]:
        self.buf += text
        return self._scan(final=False)

    def finish(self) -> tuple[list[Piece], list[dict[str, Any]]]:
        """The rest of the text, and the tool calls parsed (a call that does not parse is returned as text)."""
        pieces = self._scan(final=True)
        calls = []
        for raw in self.calls:
            try:
                parsed = self.tool[2](raw, self.tool_specs)  # type: ignore[index]
            except Exception as e:  # mlx-lm's parsers raise ValueError / JSONDecodeError / others
                log.warning("a tool call did not parse (%s): returned as text", e)
                pieces.append(("content", f"{self.tool[0]}{raw}{self.tool[1]}"))  # type: ignore[index]
                continue
            for call in parsed if isinstance(parsed, list) else [parsed]:
                calls.append(
                    {
                        "id": f"call_{uuid.uuid4().hex[:24]}",
                        "type": "function",
                        "function": {
                            "name": call["name"],
                            "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False),
                        },
                    }
                )
        return [p for p in pieces if p[1]], calls

    def _scan(self, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while True:
            rest = self.buf[self.pos :]
            if self.state == "opening":  # thinking on, the prompt left it to the model to open the thought
                start = self.thought[0]  # type: ignore[index]
                if rest.startswith(start):
                    self.pos, self.state = self.pos + len(start), "reasoning"
                elif start.startswith(rest) and not final:
                    return out
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                if not self._until(self.thought[1], "reasoning", "content", final, out):  # type: ignore[index]
                    return out
            elif self.state == "content":
                if self.tool is None:
                    out.append(("content", rest))
                    self.pos = len(self.buf)
                    return out
                if not self._until(self.tool[0], "content", "tool", final, out):
                    return out
            else:  # inside a tool call: wait for its end marker
                end = self.buf.find(self.tool[1], self.pos)  # type: ignore[index]
                if end < 0:
                    if final:
                        self.calls.append(rest)
                        self.pos = len(self.buf)
                    return out
                self.calls.append(self.buf[self.pos : end])
                self.pos, self.state = end + len(self.tool[1]), "content"  # type: ignore[index]

    def _until(self, marker: str, kind: str, next_state: str, final: bool, out: list[Piece]) -> bool:
        """Emit ``kind`` text up to ``marker`` and switch state (True), or emit what cannot start the marker
        and wait (False)."""
        found = self.buf.find(marker, self.pos)
        if found >= 0:
            self._emit(kind, self.buf[self.pos : found], out)
            self.pos, self.state = found + len(marker), next_state
            return True
        end = len(self.buf) if final else self._safe_end(marker)
        self._emit(kind, self.buf[self.pos : end], out)
        self.pos = end
        return False

    def _safe_end(self, marker: str) -> int:
        """Hold back a tail only if it is a prefix of ``marker`` (so plain text is not delayed)."""
        for k in range(min(len(marker) - 1, len(self.buf) - self.pos), 0, -1):
            if marker.startswith(self.buf[len(self.buf) - k :]):
                return len(self.buf) - k
        return len(self.buf)

    def _emit(self, kind: str, text: str, out: list[Piece]) -> None:
        if kind == "reasoning" and self.fresh_reasoning:
            text = text.lstrip("\n")  # Gemma 4 writes "<|channel>thought\n"
            self.fresh_reasoning = not text
        if text:
            out.append((kind, text))
