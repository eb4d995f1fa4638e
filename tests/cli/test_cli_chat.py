"""``mlx_dgemma.chat``: the REPL answers turn after turn, each turn encoding only what it adds, with the answers
the model gives the whole conversation; commands, Ctrl-C and bad flags behave as the other CLIs do.

The REPL runs in a subprocess (``python -m mlx_dgemma chat`` and the console script) on the 24-token-canvas demo
checkpoint; the cache and Ctrl-C are also checked in-process, on :class:`Conversation` and :func:`answer`.
"""

from __future__ import annotations

import io
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlx_dgemma.generation as generation
from mlx_dgemma import generate, load
from mlx_dgemma.cli import chat
from mlx_dgemma.cli.chat import Conversation, answer
from mlx_dgemma.drafter import make_proposer
from tests.conftest import DEMO24, DEMO_PROMPTS, HANG_S

FLAGS = ["--model", str(DEMO24), "--max-tokens", "24", "--seed", "0"]
REAL_STREAM = generation.stream_generate
STATS = re.compile(r"\[prompt: (\d+) tokens, (\d+) from the cache \| answer: (\d+) tokens")


def chat_process(command: list[str], lines: list[str | bytes]) -> subprocess.CompletedProcess:
    """Run the REPL with ``lines`` as its input, to the end (its output decoded as UTF-8)."""
    data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    r = subprocess.run([*command, *FLAGS, "--verbose"], input=data, capture_output=True, timeout=HANG_S)
    r.stdout, r.stderr = r.stdout.decode(), r.stderr.decode()
    return r


def answers(stdout: str) -> list[str]:
    """The answers in a piped transcript: the line after each echoed ``>> `` message (commands excluded)."""
    lines = stdout.splitlines()
    return [
        lines[i + 1]
        for i, line in enumerate(lines[:-1])
        if line.startswith(">> ") and line[3:] not in ("", "h", "r", "q")
    ]


def stats(stderr: str) -> list[tuple[int, int, int]]:
    """(prompt tokens, of which from the cache, answer tokens) of each answer."""
    return [tuple(map(int, m.groups())) for m in STATS.finditer(stderr)]


def test_two_turns_then_end_of_input():
    """Both answers are printed, the second turn takes the first's history from the cache and encodes only
    the rest, and the end of input ends the chat with exit code 0; piped output has no escape codes. A line
    that is not UTF-8 between them is one error line, not the end of the chat."""
    r = chat_process(
        [sys.executable, "-m", "mlx_dgemma", "chat"], [DEMO_PROMPTS[0], b"caf\xe9", DEMO_PROMPTS[1]]
    )
    assert r.returncode == 0, r.stderr
    assert "error: that line is not UTF-8 text: type it again\n" in r.stderr
    first, second = answers(r.stdout)
    assert first.startswith('{"name": "Maya"'), r.stdout
    assert second.strip(), r.stdout
    (total1, cached1, _), (total2, cached2, _) = stats(r.stderr)
    assert cached1 == 0
    assert total2 > total1  # the second prompt is the whole conversation ...
    assert 0 < cached2 < total2  # ... of which the cache held the first exchange's start
    assert "\x1b" not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_console_script_reset_help_and_quit():
    """``mlx_dgemma.chat`` (the console script): ``h`` prints the help, ``r`` forgets the conversation (the
    same message then gets the same answer from an empty cache), ``q`` quits before the lines after it."""
    script = Path(sys.executable).with_name("mlx_dgemma.chat")
    assert script.exists(), "the console script is missing: pip install -e ."
    r = chat_process([str(script)], [DEMO_PROMPTS[0], "h", "r", DEMO_PROMPTS[0], "q", DEMO_PROMPTS[1]])
    assert r.returncode == 0, r.stderr
    assert "r, /reset" in r.stdout and "[new conversation]" in r.stdout
    before, after = answers(r.stdout)[:2]
    assert before == after and before.startswith('{"name": "Maya"')
    turns = stats(r.stderr)
    assert len(turns) == 2  # nothing answered after q
    assert turns[0] == turns[1] and turns[1][1] == 0


def test_ctrl_c_at_the_prompt_quits_without_a_traceback():
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_dgemma", "chat", *FLAGS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        seen, deadline = b"", time.monotonic() + HANG_S
        while not seen.endswith(b">> "):  # the prompt: the REPL waits for a line
            assert time.monotonic() < deadline, seen
            if select.select([proc.stdout], [], [], 1)[0]:
                byte = os.read(proc.stdout.fileno(), 1)
                assert byte, (seen, proc.stderr.read())
                seen += byte
        proc.send_signal(signal.SIGINT)
        # Not communicate(): it closes stdin, and an end of input that wins the race is a plain exit (0).
        proc.wait(timeout=HANG_S)
        err = proc.stderr.read()
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.decode().strip() == "[bye]"


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--top-p", "0.9"], "--top-p is for autoregressive decoding"),
        (["--max-tokens", "x"], "--max-tokens"),
        (["--max-tokens", "0"], "max_tokens must be a positive integer"),
        (["--temp", "-1"], "temperature must be a finite number >= 0"),
        (["--model", "/no/such/model"], "model folder not found"),
    ],
)
def test_bad_flags_are_one_line(capsys, argv, says):
    try:
        rc = chat.main([*FLAGS, *argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = load(DEMO24)
    proposer = make_proposer("auto", model)
    options = {"seed": 0, "drafter": proposer if proposer is not None else "none"}
    return model, tokenizer, options, getattr(proposer, "capture", ())


def test_each_turn_encodes_only_what_it_adds_and_answers_as_without_a_cache(demo):
    """Three turns: each takes the conversation before its message from the cache, and its answer is the
    one the model gives the whole conversation with no cache (same seed)."""
    model, tokenizer, options, capture = demo
    conversation = Conversation(model, tokenizer, capture=capture)
    for i, text in enumerate(DEMO_PROMPTS):
        history = len(conversation.messages)
        turn = conversation.begin(text)
        assert (turn.reused > 0) == (i > 0)  # the cache holds the previous turns
        if i:
            held = conversation.held
            assert held is not None and turn.ids[: len(held.ids)] == held.ids and turn.reused == len(held.ids)
        done = answer(conversation, text, 48, options, io.StringIO())
        assert done is not None and done.answer
        messages = conversation.messages[:-1]
        assert len(messages) == history + 1
        assert done.answer == generate(model, tokenizer, messages, max_tokens=48, thinking=False, **options)


def interrupting(after_commits: int, monkeypatch) -> None:
    """Make ``stream_generate`` raise ``KeyboardInterrupt`` (as Ctrl-C does) after ``after_commits`` commits."""

    def stream(*args, **kwargs):
        commits = 0
        for event in REAL_STREAM(*args, **kwargs):
            if commits == after_commits:
                raise KeyboardInterrupt
            yield event
            commits += isinstance(event, generation.Commit)

    monkeypatch.setattr(generation, "stream_generate", stream)


def test_ctrl_c_stops_an_answer_and_keeps_what_was_shown(demo, monkeypatch):
    model, tokenizer, options, capture = demo
    conversation = Conversation(model, tokenizer, capture=capture)
    answer(conversation, DEMO_PROMPTS[0], 48, options, io.StringIO())
    before = (list(conversation.messages), conversation.held)

    interrupting(0, monkeypatch)  # before any text: the turn leaves no trace
    out = io.StringIO()
    assert answer(conversation, DEMO_PROMPTS[1], 48, options, out) is None
    assert out.getvalue() == "[answer stopped]\n"
    assert (conversation.messages, conversation.held) == before

    interrupting(1, monkeypatch)  # after the first canvas: what was shown is the answer
    out = io.StringIO()
    assert answer(conversation, DEMO_PROMPTS[1], 48, options, out) is None
    shown = out.getvalue().removesuffix("\n[answer stopped]\n")
    assert shown and shown != out.getvalue()
    assert conversation.messages[-2:] == [
        {"role": "user", "content": DEMO_PROMPTS[1]},
        {"role": "assistant", "content": shown},
    ]
    monkeypatch.undo()
    turn = conversation.begin(DEMO_PROMPTS[2])  # the chat goes on, from the cache
    assert turn.reused == len(conversation.held.ids) > 0
