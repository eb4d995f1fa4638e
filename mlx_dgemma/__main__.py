"""``python -m mlx_dgemma <command> [options]``: every console script under one module, as ``python -m mlx_lm``.

The console scripts (``mlx_dgemma.generate``, ``mlx_dgemma.server``, ...) stay the short way to run them."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {  # command -> module with main(); the console script is ``mlx_dgemma.<command>``
    "generate": "mlx_dgemma.cli.generate",
    "chat": "mlx_dgemma.cli.chat",
    "convert": "mlx_dgemma.convert.cli",
    "server": "mlx_dgemma.server.cli",
    "train": "mlx_dgemma.train.cli",
    "drafter.train": "mlx_dgemma.drafter.train",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m mlx_dgemma <command> [options]\n\ncommands: "
            + ", ".join(COMMANDS)
            + "\n\n`python -m mlx_dgemma <command> --help` describes one."
        )
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[command]).main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
