"""What every command-line entry point does with bad input and Ctrl-C."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .errors import DGemmaError


def run_cli(body: Callable[[], int], interrupted: str = "[interrupted]") -> int:
    """Run a command: a ``DGemmaError`` becomes one ``error:`` line and exit code 2, Ctrl-C exit code 130."""
    try:
        return body()
    except DGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
