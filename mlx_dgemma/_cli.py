"""What every command-line entry point does with bad input and Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import DGemmaError


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--adapter-path`` and ``--drafter``, as every command that loads a model takes them."""
    p.add_argument("--model", help="model folder or Hugging Face repo id (default: the embedded model)")
    p.add_argument("--adapter-path", help="fine-tuned adapters from mlx_dgemma.train to apply")
    p.add_argument("--drafter", default="auto", help="canvas proposer: auto (the model's own drafter, if it has "
                   "one), none, lookup (prompt lookup) or a drafter folder")


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
