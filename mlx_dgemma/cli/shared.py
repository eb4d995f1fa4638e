"""What every command-line entry point shares: bad input, Ctrl-C, and mlx-lm / mlx-vlm flag names.

``parser`` builds an ``argparse`` parser without prefix abbreviations (so ``--temp`` is never taken for
``--temp-max``, nor ``--train`` for ``--train-router``); ``add_ar_only_flags`` turns autoregressive-only flags of
mlx-lm / mlx-vlm into a one-line "use X instead" error; ``bool_flag``, ``log_level`` and ``seed`` are argument
types for the names those tools use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from mlx_dgemma.errors import DGemmaError

# Flags of mlx-lm / mlx-vlm that only make sense for token-by-token (autoregressive) decoding.
_ENTROPY = "the entropy-bound sampler has no {}: use --entropy-bound (lower: more careful steps) instead"
_KV = "the encoder cache is not quantized: quantize the weights with mlx_dgemma.convert --quantize instead"
AR_ONLY_FLAGS: dict[str, str] = {
    "--top-p": _ENTROPY.format("nucleus"),
    "--top-k": _ENTROPY.format("top-k"),
    "--min-p": _ENTROPY.format("min-p"),
    "--min-tokens-to-keep": _ENTROPY.format("min-p"),
    "--xtc-probability": _ENTROPY.format("XTC"),
    "--xtc-threshold": _ENTROPY.format("XTC"),
    "--repetition-penalty": "a canvas is denoised as a whole, there is no token-by-token penalty: "
    "use --entropy-bound or --temp instead",
    "--repetition-context-size": "a canvas is denoised as a whole, there is no token-by-token penalty: "
    "use --entropy-bound or --temp instead",
    "--kv-bits": _KV,
    "--kv-group-size": _KV,
    "--quantized-kv-start": _KV,
    "--max-kv-size": "sliding layers keep their window already: use --max-tokens instead",
    "--draft-model": "DiffusionGemma drafts whole canvases: use --drafter PATH (or lookup) instead",
    "--num-draft-tokens": "a drafter proposes whole canvases: use --drafter instead",
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that never accepts an abbreviated flag (``allow_abbrev=False``) and reports a bad
    command line in one ``error:`` line (argparse's default prints the whole usage first)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser(prog: str, description: str, **kwargs: Any) -> Parser:
    """A :class:`Parser` (no abbreviations, one-line errors)."""
    return Parser(prog=prog, description=description, **kwargs)


def add_ar_only_flags(
    p: argparse.ArgumentParser,
    flags: Mapping[str, str] = AR_ONLY_FLAGS,
    why: str = "is for autoregressive decoding",
) -> None:
    """Accept ``flags`` (hidden from ``--help``) only to fail with ``error: FLAG WHY; HINT`` (one line), where
    each hint says what to use instead."""

    class Refuse(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.exit(2, f"error: {option_string} {why}; {flags[option_string]}\n")

    for flag in flags:
        p.add_argument(flag, nargs="?", action=Refuse, help=argparse.SUPPRESS)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--adapter-path`` and ``--drafter``, as every command that loads a model takes them."""
    p.add_argument("--model", help="model folder or Hugging Face repo id (default: the embedded model)")
    p.add_argument("--adapter-path", help="fine-tuned adapters from mlx_dgemma.train to apply")
    p.add_argument(
        "--drafter",
        default="auto",
        help="canvas proposer: auto (the model's own drafter, if it has "
        "one), none, lookup (prompt lookup) or a drafter folder",
    )


def add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    """mlx-lm's ``--trust-remote-code``: accepted, and ignored with a note (no checkpoint code is ever run)."""
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for mlx-lm compatibility and ignored: no code from a checkpoint is ever run",
    )


def note_ignored(args: argparse.Namespace) -> None:
    """Print a one-line note for each accepted-but-ignored flag that was given."""
    if getattr(args, "trust_remote_code", False):
        print(
            "note: --trust-remote-code is ignored: mlx_dgemma runs no code from the checkpoint",
            file=sys.stderr,
        )


def bool_flag(value: str) -> bool:
    """mlx-lm's ``--verbose True/False`` (also yes/no, 1/0, t/f), strict: anything else is an error."""
    v = value.strip().lower()
    if v in ("true", "t", "yes", "y", "1", "on"):
        return True
    if v in ("false", "f", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_bool_flag(p: argparse.ArgumentParser, *names: str, default: bool = False, help: str = "") -> None:
    """A flag that works bare (``--verbose``) and with a value (``--verbose True`` / ``--verbose=false``)."""
    p.add_argument(*names, type=bool_flag, nargs="?", const=True, default=default, metavar="BOOL", help=help)


def log_level(value: str) -> str:
    """``--log-level`` in any case (``info``, ``INFO``), as a ``logging`` level name."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a log level: use one of {', '.join(LOG_LEVELS)}")
    return level


def add_log_level(p: argparse.ArgumentParser, default: str = "WARNING") -> None:
    p.add_argument(
        "--log-level",
        type=log_level,
        default=default,
        metavar="LEVEL",
        help=f"logging level, any case: {', '.join(LOG_LEVELS)} (default {default})",
    )


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(levelname)s %(name)s: %(message)s")


def seed(value: str) -> int:
    """A random seed: an integer from 0 to 2**64 - 1 (what ``mx.random.key`` takes)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an integer: give a seed from 0 to 2**64 - 1"
        ) from None
    if not 0 <= n < 2**64:
        raise argparse.ArgumentTypeError(f"{value} is out of range: give a seed from 0 to 2**64 - 1")
    return n


def read_stdin() -> str:
    """Standard input as UTF-8 text, at most ``bounded.MAX_INPUT_BYTES`` of it; other bytes or more of them are a
    ``DGemmaError`` (one line), not a traceback or a process that grows with its input."""
    from mlx_dgemma.runtime.bounded import read_stdin as read_bounded

    return read_bounded()


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


def add_chat_template_flags(p: argparse.ArgumentParser) -> None:
    """``--chat-template-config JSON`` (mlx-lm's) and ``--thinking`` / ``--enable-thinking`` (mlx-vlm's)."""
    p.add_argument(
        "--chat-template-config",
        type=json_object,
        default={},
        metavar="JSON",
        help="extra chat template arguments as a JSON object, e.g. '{\"enable_thinking\": true}'",
    )
    p.add_argument(
        "--thinking",
        "--enable-thinking",
        dest="thinking",
        action="store_true",
        help="turn on the chat template's thinking mode (enable_thinking=true)",
    )


def json_object(value: str) -> dict:
    """``--chat-template-config``: a JSON object, as mlx-lm's flag takes it, without the names the template
    renderer sets itself (``messages``, ``tools``, ``add_generation_prompt``, ...)."""
    from mlx_dgemma.prompt.chat_template import check_kwargs
    from mlx_dgemma.runtime.bounded import parse_json

    shown = value if len(value) <= 80 else value[:77] + "..."
    try:
        obj = parse_json(
            value,
            f"--chat-template-config {shown!r}",
            DGemmaError,
            'give a JSON object such as {"enable_thinking": true}',
        )
        if not isinstance(obj, dict):
            raise DGemmaError(f'expected a JSON object like {{"enable_thinking": true}}, got {shown!r}')
        check_kwargs(obj, "--chat-template-config", DGemmaError)  # the server's --chat-template-args' check
    except DGemmaError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return obj
