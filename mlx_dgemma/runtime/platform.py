"""Platform fix-ups that must happen before ``mlx`` is imported."""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

# The Linux mlx-cpu wheel links the reference (Netlib) BLAS, ~100x slower than OpenBLAS for the matmuls here.
# Loading Debian's OpenBLAS globally first makes MLX bind to it. Macs use Accelerate/Metal and skip this.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


_warned = False


class SlowBLASWarning(RuntimeWarning):
    """MLX was imported before mlx_dgemma could load OpenBLAS: it runs on its bundled reference BLAS."""


def use_fast_blas() -> bool:
    """Preload OpenBLAS on Linux when it is installed and mlx is not yet loaded. Returns True if it did.

    If ``mlx.core`` is already loaded, a preload comes too late (MLX has bound its bundled BLAS; measured: loading
    OpenBLAS afterwards changes nothing), so warn once, with the fix, unless OpenBLAS was preloaded already.
    """
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("MLX_DGEMMA_NO_OPENBLAS") or not os.path.exists(OPENBLAS):
        return False
    if "mlx.core" in sys.modules:
        global _warned
        if not _warned and _on_cpu(sys.modules["mlx.core"]) and not system_openblas_loaded():
            _warned = True
            warnings.warn(
                "mlx.core was imported before mlx_dgemma, so MLX runs on its bundled reference BLAS (a decoder pass "
                f"~15x slower): import mlx_dgemma first, or run with LD_PRELOAD={OPENBLAS} "
                "(MLX_DGEMMA_NO_OPENBLAS=1 silences this)",
                SlowBLASWarning,
                stacklevel=3,
            )
        return False
    ctypes.CDLL(OPENBLAS, mode=ctypes.RTLD_GLOBAL)
    return True


def system_openblas_loaded() -> bool:
    """Whether the system's OpenBLAS is mapped into this process (``LD_PRELOAD`` or an earlier preload).

    Only the system library counts: numpy's and torch's bundled copies export prefixed symbols MLX never calls.
    """
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return True  # cannot tell: say nothing rather than something wrong
    return any(p.startswith("/usr/") and "openblas" in p for p in paths)


def _on_cpu(mx) -> bool:
    try:
        return mx.default_device() == mx.cpu
    except Exception:  # an mlx too old or too new to ask: assume the CPU backend, where BLAS matters
        return True
