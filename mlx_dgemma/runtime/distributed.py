"""Rank coordination when started by ``mlx.launch``: the group, a bounded connect, and agreement checks.

A single process (no ``MLX_RANK`` in the environment, which ``mlx.launch`` sets) never touches
``mx.distributed``: everything here then answers "one rank, rank 0".
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

from mlx_dgemma.errors import DistributedError

CONNECT_TIMEOUT = 60.0  # seconds; MLX_DGEMMA_CONNECT_TIMEOUT overrides it


def launched() -> bool:
    """True when this process is one rank of an ``mlx.launch`` job."""
    return "MLX_RANK" in os.environ


@functools.cache
def launched_group() -> mx.distributed.Group | None:
    """The group of all ranks started by ``mlx.launch``, or ``None`` in a single process (or one rank).

    The ring backend retries connecting forever when a peer is missing; after
    ``MLX_DGEMMA_CONNECT_TIMEOUT`` seconds (default 60) this process prints one error line and ends.
    """
    hostfile = os.environ.get("MLX_HOSTFILE")
    if not launched() or (hostfile and Path(hostfile).is_file() and not Path(hostfile).read_text().strip()):
        return None  # not launched, or launched on one host (mlx.launch -n 1 writes an empty hostfile)
    timeout = float(os.environ.get("MLX_DGEMMA_CONNECT_TIMEOUT", CONNECT_TIMEOUT))
    rank = os.environ.get("MLX_RANK", "?")
    message = (
        f"error: rank {rank} could not reach the other ranks within {timeout:g} s: check that every host "
        "in the hostfile is up and runs the same command, the addresses and ports, and any firewall "
        "(MLX_DGEMMA_CONNECT_TIMEOUT sets the wait)"
    )
    # init blocks in C++ holding the GIL, so no Python thread or signal handler can time it out: a tiny
    # shell process says why and ends this one (SIGTERM has no Python handler) unless init returns first.
    watchdog = subprocess.Popen(
        ["/bin/sh", "-c", f"sleep {timeout}; echo {shlex.quote(message)} >&2; kill -TERM {os.getpid()}"],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        group = mx.distributed.init(strict=True)
    except Exception as e:
        raise DistributedError(f"rank {rank} could not join the other ranks: {e}") from None
    finally:
        os.killpg(watchdog.pid, signal.SIGKILL)  # the shell and its sleep, which holds our stderr open
        watchdog.wait()
    return group if group.size() > 1 else None


def rank() -> int:
    """This process's rank (0 in a single process)."""
    group = launched_group()
    return 0 if group is None else group.rank()


def is_leader() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and answers HTTP."""
    return rank() == 0


def quiet_followers() -> None:
    """On ranks other than 0, send standard output to nowhere (errors still reach standard error)."""
    if not is_leader():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)


def fingerprint(folder: Path) -> bytes:
    """A digest of a checkpoint (config, generation config, the names, shapes and sizes of its tensors)
    that is cheap to compute: headers only, no weights are read."""
    h = hashlib.sha256()
    for name in ("config.json", "generation_config.json"):
        file = folder / name
        h.update(file.read_bytes() if file.is_file() else b"-")
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(header_len, 1 << 26)))
        h.update(str(file.stat().st_size).encode())
    return h.digest()


def check_same(group: mx.distributed.Group, folder: Path) -> None:
    """Raise on every rank if the ranks run different mlx_dgemma versions or hold different checkpoints."""
    from mlx_dgemma import __version__

    mine = hashlib.sha256(__version__.encode()).digest()[:8] + fingerprint(folder)[:8]
    everyone = mx.distributed.all_gather(mx.array(list(mine), dtype=mx.int32)[None], group=group)
    rows = [bytes(r) for r in cast(list[list[int]], everyone.tolist())]  # 2-D int32
    for r, row in enumerate(rows):
        if row[:8] != rows[0][:8]:
            raise DistributedError(
                f"rank {r} runs another mlx_dgemma version than rank 0: install the same "
                f"version ({__version__} on rank {group.rank()}) on every machine"
            )
        if row[8:] != rows[0][8:]:
            raise DistributedError(
                f"rank {r} has another model than rank 0 (checkpoint fingerprint {row[8:].hex()} vs "
                f"{rows[0][8:].hex()}): put the same checkpoint folder on every machine"
            )


def broadcast_json(obj: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's ``obj`` (JSON-serialisable) on every rank; the others pass anything (ignored).

    Two ``all_sum`` calls (length, then the bytes, zero everywhere but on rank 0): the backends have no
    broadcast, and a sum of one contribution is exact.
    """
    data = json.dumps(obj).encode() if group.rank() == 0 else b""
    n = cast(int, mx.distributed.all_sum(mx.array([len(data)], dtype=mx.int32), group=group).item())
    mine = mx.array(list(data), dtype=mx.int32) if data else mx.zeros((n,), dtype=mx.int32)
    payload = mx.distributed.all_sum(mine, group=group)
    return json.loads(bytes(cast(list[int], payload.tolist())).decode())


def broadcast_array(array: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's numpy ``array`` on every rank; the others pass anything (ignored).

    Its shape and dtype travel as JSON, then the values in one ``all_sum`` (zeros everywhere but on rank 0,
    exact as ``broadcast_json``'s bytes).
    """
    import numpy as np

    head = broadcast_json(
        {"shape": list(array.shape), "dtype": str(array.dtype)} if group.rank() == 0 else None, group
    )
    mine = mx.array(array) if group.rank() == 0 else mx.zeros(head["shape"], dtype=getattr(mx, head["dtype"]))
    return np.array(mx.distributed.all_sum(mine, group=group)).astype(head["dtype"], copy=False)


def agree(flag: bool, group: mx.distributed.Group) -> bool:
    """Rank 0's ``flag`` on every rank (one tiny ``all_sum``)."""
    mine = mx.array([1 if flag and group.rank() == 0 else 0], dtype=mx.int32)
    return bool(mx.distributed.all_sum(mine, group=group).item())
