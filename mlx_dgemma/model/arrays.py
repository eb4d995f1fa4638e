"""``tree_flatten`` and ``mx.load`` typed as the calls made here use them.

mlx's annotations cover every form of each call (``tree_flatten`` with a ``destination`` dict, ``mx.load`` of a
``.npy`` file or with ``return_metadata``); these wrappers name the one form the package calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten


def flatten(tree: Any, prefix: str = "") -> list[tuple[str, mx.array]]:
    """``tree_flatten`` without a ``destination``: always a list of (dotted name, leaf)."""
    return cast(list[tuple[str, mx.array]], tree_flatten(tree, prefix=prefix))


def load_safetensors(file: str | Path) -> dict[str, mx.array]:
    """``mx.load`` of a ``.safetensors`` file without metadata: always a dict of arrays (memory-mapped)."""
    return cast(dict[str, mx.array], mx.load(str(file)))
