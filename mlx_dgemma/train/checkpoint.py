"""Checkpoints as one atomic unit: a complete step folder, and a pointer to it replaced in one rename.

Layout of a training output folder ``out``::

    out/checkpoint.json              {"folder": "checkpoint-0000014", "step": 14}: the current checkpoint
    out/checkpoint-0000014/          adapters, adapter config, optimizer state, trainer state: written together
    out/adapters.safetensors         copies (hard links) of the current checkpoint's adapters and config, so
    out/adapter_config.json          that ``--adapter-path out`` works as with mlx-lm

A step folder is written under a temporary name, every file and the folder fsync-ed, then renamed into place;
only then is ``checkpoint.json`` replaced (``os.replace``, atomic). A process killed at any moment therefore
leaves ``checkpoint.json`` naming a complete folder (the new one or the previous one). Every temporary entry is
named ``.<final name>.tmp-<pid>``; the next save (or resume) removes those of every final name it writes, whatever
their pid, so a kill mid-save or mid-publish leaves nothing behind for long. Folders written before this layout
(the files directly in ``out``) are still resumed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mlx_dgemma.errors import TrainError

POINTER = "checkpoint.json"
PREFIX = "checkpoint-"
Writer = Callable[[Path], object]  # what it returns (e.g. ``write_text``'s count) is ignored


def step_folder_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def write_checkpoint(out: Path, step: int, files: dict[str, Writer]) -> Path:
    """Write ``files`` (name -> writer of that path) as the checkpoint of ``step``; returns its folder."""
    out.mkdir(parents=True, exist_ok=True)
    name = step_folder_name(step)
    final = out / name
    if current(out) == final:
        return final  # saved already at this step (a periodic save, then Ctrl-C)
    write_folder(final, files)  # replaces a leftover renamed into place but never pointed to
    _replace_text(out / POINTER, json.dumps({"folder": name, "step": step}) + "\n")
    _remove_others(out, keep=name)
    return final


def write_folder(final: Path, files: dict[str, Writer]) -> Path:
    """Write ``files`` (name -> writer of that path) as the folder ``final``, all or nothing: a temporary sibling,
    every file and the folder fsync-ed, then renamed into place (replacing a folder already there).

    Temporaries of ``final`` that killed processes left are removed afterwards. Also the drafter's folder writer.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for file, write in files.items():
        write(tmp / file)
        _fsync(tmp / file)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(final.parent)
    _remove_temporaries(final.parent, (final.name,))
    return final


def current(out: Path) -> Path | None:
    """The folder of the current checkpoint in ``out``, or None when there is none (see the module doc)."""
    pointer = out / POINTER
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text())["folder"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise TrainError(f"{pointer} is not a checkpoint pointer: remove {out} and start again") from None
    folder = out / str(name)
    if not folder.is_dir() or "/" in str(name):
        raise TrainError(f"{pointer} names {name}, which is not in {out}: remove {out} and start again")
    return folder


def publish(folder: Path, out: Path, names: tuple[str, ...]) -> None:
    """Make ``out/<name>`` the checkpoint's file for each name: a hard link (no copy) where the disk allows."""
    for name in names:
        tmp = _tmp_name(out / name)
        tmp.unlink(missing_ok=True)
        try:
            os.link(folder / name, tmp)
        except OSError:
            shutil.copyfile(folder / name, tmp)
        os.replace(tmp, out / name)
    _fsync(out)
    _remove_temporaries(out, names)  # of earlier processes killed between the copy and its rename


def _tmp_name(path: Path) -> Path:
    """``.<name>.tmp-<pid>``: the temporary of ``path``, which any later save of ``path`` removes."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _is_temporary_of(entry: str, names: tuple[str, ...]) -> bool:
    if not entry.startswith(".") or ".tmp-" not in entry:
        return False
    final = entry[1:].rsplit(".tmp-", 1)[0]
    return final in names or final.startswith(PREFIX)


def _remove_temporaries(out: Path, names: tuple[str, ...]) -> None:
    for path in out.iterdir():
        if _is_temporary_of(path.name, names):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _replace_text(path: Path, text: str) -> None:
    tmp = _tmp_name(path)
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _remove_others(out: Path, keep: str) -> None:
    """Older step folders, and temporaries (step folders, pointer) of processes that were killed mid-save."""
    for path in out.iterdir():
        if path.name.startswith(PREFIX) and path.name != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    _remove_temporaries(out, (POINTER,))


def _fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to the disk, so that a rename after it is never torn."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
