"""``--show-canvas`` in a real terminal (tmux): committed text stays on screen, only the draft is redrawn."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from mlx_dgemma import load, stream_generate
from mlx_dgemma.cli.generate import DEMO_PROMPT
from tests.conftest import DEMO24

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


def screen_after(command: list[str], width: int, height: int, tmp_path) -> str:
    """Run ``command`` in a detached tmux pane of ``width`` x ``height``; the pane's text once it exits."""
    socket, done = f"dgemma-{uuid.uuid4().hex[:8]}", tmp_path / "rc"
    tmux = ["tmux", "-L", socket, "-f", os.devnull]
    script = f"{shlex.join(command)}; echo $? > {shlex.quote(str(done))}; sleep 600"
    subprocess.run([*tmux, "new-session", "-d", "-x", str(width), "-y", str(height), script], check=True)
    try:
        deadline = time.monotonic() + 300  # a bound against hangs, not a speed assumption
        while not done.exists() or not done.read_text().strip():
            assert time.monotonic() < deadline, "the command did not finish"
            time.sleep(0.2)
        assert done.read_text().strip() == "0"
        # -J joins lines the terminal wrapped, so the answer reads as one string; -S - adds the scrollback.
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-J", "-S", "-"], check=True, capture_output=True, text=True
        ).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


@pytest.mark.parametrize(("width", "height"), [(100, 30), (37, 5)])
def test_committed_text_stays_on_screen_across_canvases(tmp_path, width, height):
    model, tokenizer = load(DEMO24)
    done = list(stream_generate(model, tokenizer, DEMO_PROMPT, seed=0, drafter="none"))[-1]
    assert done.stats.canvases >= 2  # the answer spans canvases: the first must survive the second's drafts
    command = [
        sys.executable,
        "-m",
        "mlx_dgemma",
        "generate",
        "--model",
        str(DEMO24),
        "--seed",
        "0",
        "--drafter",
        "none",
        "--show-canvas",
    ]
    screen = screen_after(command, width, height, tmp_path)
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    assert lines == [done.answer]  # the whole answer, once, and no draft left behind
