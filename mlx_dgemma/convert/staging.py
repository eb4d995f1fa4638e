"""Atomic output: build the model under a hidden sibling folder, then swap it into place in one step.

Every folder the converter makes beside the target is named ``.<name>.<kind>-<pid>-<random>`` and holds a
marker file (:data:`MARKER`), which proves it ours; the model itself is written into its ``model/`` subfolder.

Publishing a new model where none is: one rename. Replacing one (``--force``): one atomic exchange of the two
folders (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS), so that the target
holds the previous model until the instant it holds the new one. Where the system or file system cannot
exchange, two renames through an ``.<name>.old-*`` folder; a process killed between them leaves the previous
model in that folder and nothing at the target, and the next conversion to that target (:func:`recover`) moves
it back before doing anything else.

An interrupted conversion leaves either nothing (Python-level interruption, SIGTERM: the staging folder is
removed) or, if the process was killed outright, a marked hidden folder, which no loader accepts (its top has
no ``config.json``) and the next conversion to the same target removes, saying so in one line. Hidden folders
with our names but no marker (written by something else, or by older versions) are never deleted: they are
named in one line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from types import TracebackType

from mlx_dgemma.errors import ConvertError

PARTIAL, OLD, FUSED = "partial", "old", "fused"
KINDS = (OLD, PARTIAL, FUSED)  # OLD first: a half-done swap is restored before anything else is removed
MARKER = ".mlx_dgemma-convert"
MODEL = "model"
_named: set[Path] = set()  # unmarked folders named already


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing target unless ``force``, and never replace something that is not a model folder."""
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise ConvertError(f"{target} exists and is not a folder: choose another --mlx-path")
    if not force:
        raise ConvertError(
            f"{target} already exists: pass --force to replace it, or choose another --mlx-path"
        )
    if any(target.iterdir()) and not (target / "config.json").is_file():
        raise ConvertError(
            f"{target} exists and is not a model folder (no config.json): refusing to replace it even with --force"
        )


def check_locations(source: Path, target: Path) -> None:
    """The target must not be the source, inside it, or around it (--force would delete the source)."""
    src, dst = source.resolve(), target.resolve()
    if dst == src or src in dst.parents:
        raise ConvertError(
            f"the output {target} is inside the source checkpoint {source}: write it elsewhere"
        )
    if dst in src.parents:
        raise ConvertError(f"the output {target} contains the source checkpoint {source}: write it elsewhere")


class StagedFolder:
    """``with StagedFolder(target, force) as tmp: ...write into tmp...; staged.commit()``."""

    def __init__(self, target: Path, force: bool = False):
        self.target, self.force = target, force
        self.staging: Path | None = None
        self.tmp: Path | None = None
        self.committed = False

    def __enter__(self) -> Path:
        check_target(self.target, self.force)
        self.target.parent.mkdir(parents=True, exist_ok=True)  # convert() has run recover(target) first
        self.staging = make_marked_dir(self.target, PARTIAL)
        self.tmp = self.staging / MODEL
        self.tmp.mkdir()
        return self.tmp

    def commit(self) -> None:
        """Move the finished folder into place (replacing the old one only now, under --force)."""
        assert self.tmp is not None
        check_target(self.target, self.force)
        reached("staged")
        if not self.target.exists():
            os.replace(self.tmp, self.target)
        elif exchange(self.tmp, self.target):  # the previous model is now in the staging folder
            pass
        else:  # two renames; recover() undoes the first if the process dies before the second
            old = make_marked_dir(self.target, OLD)
            try:
                os.replace(self.target, old / MODEL)
                reached("moved-aside")
                os.replace(self.tmp, self.target)
            except BaseException:  # an error or Ctrl-C between the renames: put the previous model back now
                if (old / MODEL).is_dir() and not _exists(self.target):
                    os.replace(old / MODEL, self.target)
                shutil.rmtree(old, ignore_errors=True)
                raise
            reached("swapped")
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        reached("committed")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def reached(point: str) -> None:
    """A step of publishing has just been done (``staged``, ``moved-aside``, ``swapped``, ``committed``).

    Does nothing; the tests replace it to kill the process at that exact point.
    """


def make_marked_dir(target: Path, kind: str) -> Path:
    """A new ``.<name>.<kind>-<pid>-<random>`` folder beside ``target``, with the marker that proves it ours."""
    prefix = f"{_prefix(target, kind)}{os.getpid()}-"
    while True:
        path = target.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()  # the user's usual permissions (mkdtemp's are owner-only)
            break
        except FileExistsError:
            continue
    (path / MARKER).write_text(json.dumps({"target": target.name, "kind": kind, "pid": os.getpid()}) + "\n")
    return path


def recover(target: Path) -> list[Path]:
    """Undo and clean up what conversions to ``target`` that were killed left beside it; returns what was removed.

    A half-done swap (the previous model in an ``old`` folder, nothing at the target) is moved back first.
    Only folders of processes that are gone, and only marked ones (or empty ones) are touched; what looks like
    ours but carries no marker is named in one line on stderr, and so is anything restored or removed.
    """
    removed: list[Path] = []
    unknown: list[Path] = []
    restored = None
    if not target.parent.is_dir():
        return removed
    for kind in KINDS:
        prefix = _prefix(target, kind)
        found = [p for p in target.parent.glob(prefix + "*") if p.is_dir() and not p.is_symlink()]
        for path in sorted(found, key=_age):  # newest first: the one to restore if several are found
            if _alive(_pid_of(path.name[len(prefix) :])):
                continue  # a conversion running now
            if not (path / MARKER).is_file():
                if not _remove_if_empty(path):
                    if path not in _named:  # once per process (recover runs before and within a conversion)
                        unknown.append(path)
                        _named.add(path)
                    continue
            else:
                if kind == OLD and (path / MODEL).is_dir() and not _exists(target):
                    try:
                        os.replace(path / MODEL, target)
                    except OSError:  # something appeared at the target meanwhile: keep the model, say where
                        unknown.append(path)
                        continue
                    restored = path
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if restored is not None:
        print(
            f"note: restored the previous model at {target} (a conversion killed while replacing it had "
            "moved it aside)",
            file=sys.stderr,
        )
    if removed:
        print(
            f"note: removed {len(removed)} leftover folder(s) of interrupted conversions to {target}: "
            f"{', '.join(p.name for p in removed)}",
            file=sys.stderr,
        )
    if unknown:
        print(
            f"warning: kept {len(unknown)} hidden folder(s) beside {target} that look like leftovers of an "
            f"interrupted conversion but are not provably ours: {', '.join(p.name for p in unknown)}; delete "
            "them if you do not need them",
            file=sys.stderr,
        )
    return removed


# -- one atomic exchange of two paths --------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS stdio.h
_CANNOT = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM}


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one atomic step; False (nothing done) where the system cannot."""
    call = _exchange_call()
    if call is None:
        return False
    if call(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in _CANNOT:
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange_call():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):  # glibc 2.28+, musl 1.2.2+
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b: fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):  # macOS 10.12+
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b: fn(a, b, _RENAME_SWAP)
    return None


# -- helpers --------------------------------------------------------------------------------------------------


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _age(path: Path) -> float:
    try:
        return -(path / MARKER).stat().st_mtime
    except OSError:
        return 0.0


def _remove_if_empty(path: Path) -> bool:
    try:
        path.rmdir()  # killed between making the folder and writing its marker
        return True
    except OSError:
        return False


def _pid_of(suffix: str) -> int:
    try:
        return int(suffix.split("-", 1)[0])
    except ValueError:
        return -1


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True  # our own folders are in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
