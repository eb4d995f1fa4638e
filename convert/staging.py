"""Atomic output: build the folder under a hidden sibling name, rename it into place when complete.

An interrupted conversion leaves either nothing (Python-level interruption, SIGTERM: the partial folder is
removed) or, if the process was killed outright, a hidden ``.<name>.partial-<pid>-*`` folder with no
``config.json`` (it is written last), which no loader accepts and the next conversion to the same target
removes. The target itself is never half-written.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from .errors import ConvertError

PARTIAL, OLD = "partial", "old"


def check_target(target: Path, force: bool) -> None:
    """Refuse an existing target unless ``force``, and never replace something that is not a model folder."""
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise ConvertError(f"{target} exists and is not a folder: choose another --mlx-path")
    if not force:
        raise ConvertError(f"{target} already exists: pass --force to replace it, or choose another --mlx-path")
    if any(target.iterdir()) and not (target / "config.json").is_file():
        raise ConvertError(
            f"{target} exists and is not a model folder (no config.json): refusing to replace it even with --force"
        )


def check_locations(source: Path, target: Path) -> None:
    """The target must not be the source, inside it, or around it (--force would delete the source)."""
    src, dst = source.resolve(), target.resolve()
    if dst == src or src in dst.parents:
        raise ConvertError(f"the output {target} is inside the source checkpoint {source}: write it elsewhere")
    if dst in src.parents:
        raise ConvertError(f"the output {target} contains the source checkpoint {source}: write it elsewhere")


class StagedFolder:
    """``with StagedFolder(target, force) as tmp: ...write into tmp...; staged.commit()``."""

    def __init__(self, target: Path, force: bool = False):
        self.target, self.force = target, force
        self.tmp: Path | None = None
        self.committed = False

    def __enter__(self) -> Path:
        check_target(self.target, self.force)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.target)
        self.tmp = _make_dir(self.target.parent, _own_prefix(self.target, PARTIAL))
        return self.tmp

    def commit(self) -> None:
        """Move the finished folder into place (replacing the old one only now, under --force)."""
        assert self.tmp is not None
        check_target(self.target, self.force)
        old = None
        if self.target.exists():
            old = _make_dir(self.target.parent, _own_prefix(self.target, OLD))
            os.replace(self.target, old / "model")
        os.replace(self.tmp, self.target)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.committed and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def remove_stale(target: Path) -> list[Path]:
    """Remove leftovers of conversions to ``target`` whose process is gone (killed mid-way)."""
    removed = []
    for kind in (PARTIAL, OLD):
        prefix = _prefix(target, kind)
        for path in target.parent.glob(prefix + "*"):
            if path.is_dir() and not _alive(_pid_of(path.name[len(prefix) :])):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _make_dir(parent: Path, prefix: str) -> Path:
    """A new folder ``<prefix><random>`` with the user's usual permissions (mkdtemp's are owner-only)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-"


def _own_prefix(target: Path, kind: str) -> str:
    """``.<name>.partial-<pid>-``: the pid tells a later run whether its owner is still alive."""
    return f"{_prefix(target, kind)}{os.getpid()}-"


def _pid_of(suffix: str) -> int:
    try:
        return int(suffix.split("-", 1)[0])
    except ValueError:
        return -1


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
