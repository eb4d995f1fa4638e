"""Running the commands of ``benchmarks`` and ``demo`` as their docs do: ``python -m <module> ...`` from the root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import HANG_S

ROOT = Path(__file__).resolve().parents[2]


def run_module(module: str, *args: object) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` in the repository root, its output captured; ``HANG_S`` only guards a hang."""
    command = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)


def succeeded(result: subprocess.CompletedProcess[str]) -> str:
    """The command's stdout, once its exit status is 0 (else the assertion shows the end of its stderr)."""
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
