"""Training data: JSONL records → the prompt and answer token ids the model is trained on.

One JSON object per line (blank lines are skipped), in any of the common shapes:

* ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}`` (OpenAI chat)
* ``{"prompt": "...", "completion": "...", "system": "..." (optional)}``
* ``{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}`` (ShareGPT)
* ``{"instruction": "...", "input": "..." (optional), "output": "..."}`` (Alpaca; Dolly's ``context`` /
  ``response`` too)
* ``{"question": "...", "answer": "..."}``

The prompt is exactly what generation feeds the encoder: the chat template over every message but the last, with
the generation prompt (``request.encode_prompt``). The answer is the last (assistant) message's text followed
by the template's end-of-turn token, i.e. the tokens generation must produce, up to the EOS that stops it. Only
the final assistant turn is supervised; earlier turns are part of the prompt (NeMo's recipe is single-turn SFT).
A tokenizer without a chat template takes ``prompt``/``completion`` records as raw text, the answer ending in EOS.

A bad line stops loading with a one-line error naming the file and line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from mlx_dgemma.errors import DGemmaError, TrainError
from mlx_dgemma.request import encode_prompt

ROLES = ("system", "user", "assistant", "model", "developer", "tool")


@dataclass(frozen=True)
class Example:
    """One training example: prompt ids (encoder) and answer ids (canvases), the answer ending in an EOS id."""

    prompt: list[int]
    answer: list[int]


def num_canvases(answer_length: int, canvas_length: int) -> int:
    """Canvases that inference needs to produce an answer of ``answer_length`` tokens (at least one)."""
    return max(1, -(-answer_length // canvas_length))


def data_files(path: str | Path) -> tuple[Path, Path | None]:
    """``(train, valid)`` files: a folder's ``train.jsonl`` and ``valid.jsonl`` (optional), or a single file."""
    path = Path(path).expanduser()
    if path.is_file():
        return path, None
    if path.is_dir():
        train, valid = path / "train.jsonl", path / "valid.jsonl"
        if not train.is_file():
            raise TrainError(
                f"no train.jsonl in {path}: put the training records there (one JSON object a line)"
            )
        return train, valid if valid.is_file() else None
    raise TrainError(
        f"data not found: {path} (give a folder with train.jsonl [and valid.jsonl], or a .jsonl file)"
    )


def test_file(path: str | Path) -> Path:
    """``test.jsonl`` of a data folder (``--test``), as mlx-lm's ``--test`` reads it."""
    file = Path(path).expanduser() / "test.jsonl"
    if not file.is_file():
        raise TrainError(f"--test needs {file}: put the test records there (one JSON object a line)")
    return file


def load_jsonl(
    path: str | Path,
    tokenizer: Any,
    eos_ids: Iterable[int],
    max_positions: int | None = None,
    canvas_length: int | None = None,
) -> list[Example]:
    """Every record of a JSONL file as an :class:`Example`; raises :class:`TrainError` at the first bad line.

    With ``max_positions`` and ``canvas_length``, an example whose prompt plus answer canvases would not fit
    the model's context is an error too.
    """
    path = Path(path)
    eos = set(eos_ids)
    examples = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                example = encode_record(json.loads(line), tokenizer, eos)
                _check_fits(example, max_positions, canvas_length)
            except UnicodeDecodeError as e:
                raise TrainError(
                    f"{path.name} line {number}: not UTF-8 text (byte {raw[e.start]:#04x} at "
                    f"position {e.start}): save the file as UTF-8"
                ) from None
            except json.JSONDecodeError as e:
                raise TrainError(
                    f"{path.name} line {number}: not valid JSON ({e.msg} at column {e.colno})"
                ) from None
            except (ValueError, DGemmaError, TemplateError) as e:
                raise TrainError(f"{path.name} line {number}: {one_line(e)}") from None
            examples.append(example)
    if not examples:
        raise TrainError(f"{path} has no records: write one JSON object a line")
    return examples


def encode_record(record: Any, tokenizer: Any, eos_ids: set[int]) -> Example:
    """Token ids of one record (``messages`` or ``prompt``/``completion``); ``ValueError`` says what is wrong."""
    messages = record_messages(record)
    _check_text(record)
    answer_text = message_text(messages[-1]).strip()
    if not answer_text:
        raise ValueError("the answer (last message / completion) is empty")
    if getattr(tokenizer, "chat_template", None):
        prompt = encode_prompt(tokenizer, messages[:-1])
        end = turn_end(tokenizer, messages, answer_text, eos_ids)
    elif "prompt" in record and "system" not in record:
        prompt = encode_prompt(tokenizer, record["prompt"], use_chat_template=False)
        end = [_first_eos(tokenizer, eos_ids)]
    else:
        raise ValueError(
            "chat messages need a chat template, and this tokenizer has none: use prompt/completion"
        )
    answer = list(tokenizer.encode(answer_text, add_special_tokens=False)) + end
    return Example(list(prompt), answer)


def record_messages(record: Any) -> list[dict[str, Any]]:
    """The chat messages of a record, checked: at least one prompt message, and an assistant message last."""
    messages = _shape_messages(record, answer=True)
    if len(messages) < 2 or messages[-1]["role"] not in ("assistant", "model"):
        raise ValueError("'messages' needs a prompt message and must end with the assistant's answer")
    return messages


def prompt_messages(record: Any) -> list[dict[str, Any]]:
    """The messages a record asks the model to answer: any shape :func:`record_messages` reads, its answer
    optional (``{"prompt": ...}``, a conversation ending with the user) and dropped when there is one."""
    messages = _shape_messages(record, answer=False)
    if messages and messages[-1]["role"] in ("assistant", "model"):
        messages = messages[:-1]
    if not messages:
        raise ValueError("no prompt message: the record holds only an answer")
    return messages


# ShareGPT's speaker names, as the chat roles they stand for.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
SHAPES = (
    "expected 'messages' or 'prompt' and 'completion' (or 'conversations', 'instruction' and 'output', "
    "'question' and 'answer')"
)


def _shape_messages(record: Any, answer: bool) -> list[dict[str, Any]]:
    """A record of any known shape as chat messages; with ``answer`` the shape's answer field is required."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return _checked_messages(record["messages"], "messages")
    if "conversations" in record:
        return _sharegpt(record["conversations"])
    pairs = (
        ("prompt", ("completion",)),
        ("instruction", ("output", "response")),
        ("question", ("answer",)),
    )
    for prompt_key, answer_keys in pairs:
        answer_key = next((k for k in answer_keys if k in record), None)
        if prompt_key in record and (answer_key is not None or not answer):
            return _pair(record, prompt_key, answer_key)
    raise ValueError(f"{SHAPES}, found keys {sorted(record)}")


def _checked_messages(messages: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f'\'{key}\' must be a list of {{"role": ..., "content": ...}} objects')
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise ValueError(f"message {i + 1} has role {m['role']!r}: use one of {', '.join(ROLES)}")
        message_text(m)  # checks the content's type
    return messages


def _sharegpt(turns: Any) -> list[dict[str, Any]]:
    """ShareGPT's ``{"from", "value"}`` turns as messages (role/content turns are taken as they are)."""
    if isinstance(turns, list) and all(isinstance(t, dict) and "role" in t for t in turns):
        return _checked_messages(turns, "conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t for t in turns):
        raise ValueError('\'conversations\' must be a list of {"from": ..., "value": ...} objects')
    messages = []
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ValueError(
                f"turn {i + 1} is from {turn['from']!r}: use one of {', '.join(sorted(SHAREGPT_ROLES))}"
            )
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i + 1}'s 'value' must be a string")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _pair(record: dict[str, Any], prompt_key: str, answer_key: str | None) -> list[dict[str, Any]]:
    """A prompt/answer record (prompt/completion, Alpaca's instruction/input/output, question/answer)."""
    prompt = record[prompt_key]
    extra = record.get("input", record.get("context")) if prompt_key == "instruction" else None
    answer = record[answer_key] if answer_key is not None else ""
    if not (
        isinstance(prompt, str) and isinstance(answer, str) and (extra is None or isinstance(extra, str))
    ):
        names = " and ".join(f"'{k}'" for k in (prompt_key, answer_key) if k is not None)
        raise ValueError(f"{names} must be strings")
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if extra and extra.strip():
        prompt = f"{prompt.strip()}\n\n{extra.strip()}"  # Alpaca's input follows its instruction
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    messages = [*system, {"role": "user", "content": prompt}]
    if answer_key is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def message_text(message: dict[str, Any]) -> str:
    """A message's text: its string content, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ValueError("a message's 'content' must be a string or a list of text parts")


def turn_end(
    tokenizer: Any, messages: list[dict[str, Any]], answer_text: str, eos_ids: set[int]
) -> list[int]:
    """The tokens the chat template writes after the answer, up to and including the first EOS id.

    For Gemma templates this is the end-of-turn token, which the generation loop stops at.
    """
    template = getattr(tokenizer, "_tokenizer", tokenizer)  # the template's own defaults (see encode_prompt)
    full = template.apply_chat_template(messages, tokenize=False)
    at = full.rfind(answer_text)
    if at >= 0:
        tail = list(tokenizer.encode(full[at + len(answer_text) :], add_special_tokens=False))
        for i, token in enumerate(tail):
            if token in eos_ids:
                return tail[: i + 1]
    return [_first_eos(tokenizer, eos_ids)]


def _check_text(value: Any) -> None:
    """Refuse strings that no tokenizer can encode: lone surrogates such as ``"\\ud800"`` (valid JSON escapes)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"the text holds an unpaired surrogate {value[e.start]!r} (at character {e.start}): "
                "write the character itself, or a valid \\u pair"
            ) from None
    elif isinstance(value, dict):
        for v in value.values():
            _check_text(v)
    elif isinstance(value, list):
        for v in value:
            _check_text(v)


def one_line(e: Exception) -> str:
    """An error's message on one line (its type's name when it has none)."""
    return " ".join(str(e).split()) or type(e).__name__


def _first_eos(tokenizer: Any, eos_ids: set[int]) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if eos is not None else min(eos_ids)


def _check_fits(example: Example, max_positions: int | None, canvas_length: int | None) -> None:
    if max_positions is None or canvas_length is None:
        return
    needed = len(example.prompt) + num_canvases(len(example.answer), canvas_length) * canvas_length
    if needed > max_positions:
        raise ValueError(
            f"prompt of {len(example.prompt)} and answer of {len(example.answer)} tokens need {needed} positions "
            f"(answers are denoised in {canvas_length}-token canvases), but the model has {max_positions}: shorten it"
        )
