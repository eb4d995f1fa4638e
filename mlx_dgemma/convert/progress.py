"""The converter's progress bar (bytes written, tensors, rate, ETA): tqdm on a terminal, silent when piped."""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """``advance(tensors, nbytes)`` as work is done; ``close()`` at the end. tqdm limits the redraws."""

    def __init__(self, tensors: int, nbytes: int, stream: TextIO | None = None, enabled: bool | None = None):
        stream = stream if stream is not None else sys.stderr
        self.total_tensors, self.tensors = tensors, 0
        self.bar = tqdm(
            total=max(nbytes, 1),
            file=stream,
            disable=not (stream.isatty() if enabled is None else enabled),
            desc="convert",
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            dynamic_ncols=True,
        )
        self._postfix()

    def advance(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self._postfix()
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
