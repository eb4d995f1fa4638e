"""Bounded reads of what a user names: a file or standard input, read with a byte cap, decoded strictly, parsed
as JSON without a traceback.

A named file must be a regular file: a FIFO with no writer would block forever, ``/dev/zero`` never ends, so
anything else is refused after ``os.stat`` and before it is opened for reading (and opened non-blocking, then
checked again, so that a file swapped for a FIFO in between cannot block either). At most ``cap`` bytes are
ever read: a larger file is refused by its size, standard input by reading ``cap + 1`` bytes. Every problem is a
one-line error (a ``DGemmaError``, or the subclass the caller names) that names the file and the fix.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from mlx_dgemma.errors import DGemmaError

MiB = 1 << 20
# A prompt read from standard input, or a JSON schema file: the server's default request body limit.
MAX_INPUT_BYTES = 8 * MiB
# A checkpoint's JSON / text files (config, tokenizer, chat template); a 262k-token tokenizer.json is ~35 MB.
MAX_CHECKPOINT_FILE_BYTES = 512 * MiB


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n} bytes"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(
    path: str | os.PathLike,
    what: str = "file",
    cap: int | None = None,
    error: type[DGemmaError] = DGemmaError,
) -> os.stat_result:
    """``os.stat`` of ``path``, refusing (one line) anything but a regular file of at most ``cap`` bytes.
    Nothing is opened: a FIFO or a device named here can never block or stream without end."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"cannot read the {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"the {what} {path} is {_kind(st.st_mode)}, not a regular file: give a regular file")
    if cap is not None and st.st_size > cap:
        raise error(
            f"the {what} {path} is {st.st_size} bytes, over the limit of {_size(cap)}: give a smaller file"
        )
    return st


def read_bytes(
    path: str | os.PathLike,
    cap: int = MAX_INPUT_BYTES,
    what: str = "file",
    error: type[DGemmaError] = DGemmaError,
) -> bytes:
    """The bytes of the regular file ``path``, at most ``cap`` of them (else a one-line error)."""
    check_regular(path, what, cap, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise error(f"cannot read the {what} {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # the file opened, which may not be the one stat()ed
        if not stat.S_ISREG(st.st_mode):
            raise error(f"the {what} {path} is {_kind(st.st_mode)}, not a regular file: give a regular file")
        try:
            data = f.read(cap + 1)
        except OSError as e:
            raise error(f"cannot read the {what} {path}: {e.strerror or e}") from None
    if len(data) > cap:  # it grew since stat()
        raise error(f"the {what} {path} is over the limit of {_size(cap)}: give a smaller file")
    return data


_TO_UTF8 = "convert it first, e.g. with iconv -t UTF-8"


def decode(data: bytes, source: str, error: type[DGemmaError] = DGemmaError, fix: str = _TO_UTF8) -> str:
    """``data`` as UTF-8, strictly: other bytes are one line naming ``source`` and the offending byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(
            f"{source} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r}): {fix}"
        ) from None


def read_text(
    path: str | os.PathLike,
    cap: int = MAX_INPUT_BYTES,
    what: str = "file",
    error: type[DGemmaError] = DGemmaError,
    fix: str = _TO_UTF8,
) -> str:
    """The regular file ``path`` as UTF-8 text, at most ``cap`` bytes (one-line errors otherwise)."""
    return decode(read_bytes(path, cap, what, error), f"the {what} {path}", error, fix)


def read_stdin(cap: int = MAX_INPUT_BYTES, error: type[DGemmaError] = DGemmaError) -> str:
    """Standard input as UTF-8 text, reading at most ``cap + 1`` bytes: more is a one-line error."""
    if sys.stdin is None:
        raise error(
            "there is no standard input to read the prompt from: pipe the text in, or pass --prompt TEXT"
        )
    stream = getattr(sys.stdin, "buffer", None)
    data = stream.read(cap + 1) if stream is not None else sys.stdin.read(cap + 1).encode()
    if len(data) > cap:
        raise error(f"standard input is over the limit of {_size(cap)}: give a shorter prompt")
    return decode(data, "standard input", error)


def parse_json(
    text: str | bytes, source: str, error: type[DGemmaError] = DGemmaError, fix: str = "fix it"
) -> Any:
    """``json.loads``, with bad JSON, nesting too deep for the parser and numbers too long for Python as one line
    naming ``source`` and ending with ``fix``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(
            f"{source} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): {fix}"
        ) from None
    except RecursionError:
        raise error(f"{source} nests JSON arrays/objects too deeply to parse: {fix}") from None
    except UnicodeDecodeError:
        raise error(f"{source} is not UTF-8 text: {fix}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise error(f"{source} is not usable JSON ({_first_line(e)}): {fix}") from None


def read_json(
    path: str | os.PathLike,
    cap: int = MAX_INPUT_BYTES,
    what: str = "file",
    error: type[DGemmaError] = DGemmaError,
    fix: str = "fix it",
) -> Any:
    """A regular JSON file of at most ``cap`` bytes, parsed (one-line errors naming it)."""
    return parse_json(read_text(path, cap, what, error), f"the {what} {Path(path)}", error, fix)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
