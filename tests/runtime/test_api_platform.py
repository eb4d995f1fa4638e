"""The Linux speed trap: ``import mlx.core`` before ``import mlx_dgemma`` leaves MLX on its reference BLAS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mlx_dgemma.runtime.platform import OPENBLAS

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists(OPENBLAS),
    reason="the OpenBLAS preload is for Linux with Debian's OpenBLAS installed",
)


def stderr_of(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_DGEMMA_NO_OPENBLAS")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_mlx_first_warns_once_with_the_fix():
    err = stderr_of(
        "import mlx.core as mx\nimport mlx_dgemma\nimport mlx_dgemma.runtime.platform as p\np.use_fast_blas()"
    )
    assert err.count("SlowBLASWarning") == 1  # once per process
    assert "import mlx_dgemma first" in err and f"LD_PRELOAD={OPENBLAS}" in err
    assert "<string>:2" in err  # points at the user's import line


@pytest.mark.parametrize(
    ("code", "env"),
    [
        (
            "import mlx_dgemma\nimport mlx.core\nfrom mlx_dgemma.runtime.platform import system_openblas_loaded as s\n"
            "assert s()",
            {},
        ),  # the right order: preloaded
        ("import mlx.core\nimport mlx_dgemma", {"LD_PRELOAD": OPENBLAS}),  # the other fix
        ("import mlx.core\nimport mlx_dgemma", {"MLX_DGEMMA_NO_OPENBLAS": "1"}),  # opted out
    ],
)
def test_no_warning_when_mlx_has_openblas_or_the_user_opted_out(code, env):
    assert "SlowBLASWarning" not in stderr_of(code, **env)
