"""A one-line progress bar (tensors and bytes) on a terminal; silent when the output is piped."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress:
    """``advance(tensors, nbytes)`` as work is done; redraws at most ten times a second; ``close()`` at the end."""

    WIDTH = 24

    def __init__(self, tensors: int, nbytes: int, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total_tensors, self.total_bytes = tensors, max(nbytes, 1)
        self.tensors = self.nbytes = 0
        self.start = self.last = time.monotonic()

    def advance(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.nbytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self.last >= 0.1:
            self.last = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        """The bar as text: ``[####....] 42% 120/290 tensors 1.2 GB/2.9 GB 310 MB/s ETA 6s``."""
        frac = min(self.nbytes / self.total_bytes, 1.0)
        filled = int(frac * self.WIDTH)
        elapsed = max(now - self.start, 1e-6)
        rate = self.nbytes / elapsed
        eta = (self.total_bytes - self.nbytes) / rate if rate > 0 else 0.0
        return (
            f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {frac:4.0%} "
            f"{self.tensors}/{self.total_tensors} tensors {human_bytes(self.nbytes)}/{human_bytes(self.total_bytes)} "
            f"{human_bytes(rate)}/s ETA {eta:.0f}s"
        )

    def _draw(self, now: float) -> None:
        self.stream.write("\r\x1b[K" + self.line(now))
        self.stream.flush()
