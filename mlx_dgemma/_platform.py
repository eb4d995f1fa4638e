"""Platform fix-ups that must happen before ``mlx`` is imported."""

from __future__ import annotations

import ctypes
import os
import sys

# The Linux mlx-cpu wheel links the reference (Netlib) BLAS, ~100x slower than OpenBLAS for the matmuls here.
# Loading Debian's OpenBLAS globally first makes MLX bind to it. Macs use Accelerate/Metal and skip this.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def use_fast_blas() -> bool:
    """Preload OpenBLAS on Linux when it is installed and mlx is not yet loaded. Returns True if it did."""
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return False
    if os.environ.get("MLX_DGEMMA_NO_OPENBLAS") or not os.path.exists(OPENBLAS):
        return False
    ctypes.CDLL(OPENBLAS, mode=ctypes.RTLD_GLOBAL)
    return True
