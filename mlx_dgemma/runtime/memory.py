"""Wiring the model's memory during generation, as ``mlx_lm.generate.wired_limit`` does for large models.

On a Mac, macOS may page a large model's weights out of GPU-visible memory between passes; raising MLX's
wired limit to the device's recommended working set keeps them resident while a generation runs. Devices
that report no recommended working set (the CPU backend, other GPUs) are left alone. mlx-lm's version prints
its warning on stdout, where our CLI writes the answer, so this one warns through ``warnings``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import mlx.core as mx
import mlx.nn as nn

from mlx_dgemma.model.arrays import flatten

T = TypeVar("T")
CLOSE = 0.9  # warn when the model's weights take more than this share of the recommended working set


class MemoryWarning(UserWarning):
    """The model nearly fills (or exceeds) the device's recommended working set: generation may be slow."""


def recommended_working_set() -> int | None:
    """The device's ``max_recommended_working_set_size`` in bytes, or ``None`` where it reports none."""
    info = getattr(mx, "device_info", None) or getattr(getattr(mx, "metal", None), "device_info", None)
    if info is None:
        return None
    try:
        size = info().get("max_recommended_working_set_size")
    except RuntimeError:  # no such device (e.g. Metal unavailable)
        return None
    return int(size) if size else None


def model_bytes(model: nn.Module) -> int:
    """Bytes of every array the model holds."""
    return sum(v.nbytes for _, v in flatten(model.parameters()) if isinstance(v, mx.array))


@contextmanager
def wired_limit(model: nn.Module) -> Iterator[None]:
    """Raise the wired limit to the recommended working set for the duration; restore it afterwards.

    A no-op where the device reports no recommended working set. Warns (``MemoryWarning``) when the model
    takes more than 90% of it.
    """
    limit = recommended_working_set()
    if limit is None:
        yield
        return
    size = model_bytes(model)
    if size > CLOSE * limit:
        warnings.warn(
            f"the model needs {size / 2**30:.1f} GiB, close to this device's recommended working set of "
            f"{limit / 2**30:.1f} GiB: generation may be slow; use a smaller quantization or free memory",
            MemoryWarning,
            stacklevel=3,
        )
    old = mx.set_wired_limit(limit)
    try:
        yield
    finally:
        mx.synchronize()  # the limit must not change under a running evaluation
        mx.set_wired_limit(old)


def wired(model: nn.Module, events: Iterator[T]) -> Iterator[T]:
    """``events``, generated with the model's memory wired (``wired_limit``) until they end or are closed."""
    with wired_limit(model):
        yield from events
