"""Checkpoint conversion for DiffusionGemma (imported as ``mlx_dgemma.convert``).

``convert(hf_path, mlx_path, quantize=True, q_bits=4)`` (mlx-lm's signature) writes an MLX folder in the
mlx-community layout, streamed tensor by tensor, atomically; ``python -m mlx_dgemma.convert --help`` is the
command line. The package itself is callable, as mlx-lm's ``convert`` function is: ``from mlx_dgemma import
convert; convert("google/diffusiongemma-26B-A4B-it", quantize=True)``.
"""

import sys
from types import ModuleType
from typing import Any

from mlx_dgemma.convert.api import convert
from mlx_dgemma.convert.pipeline import DEFAULT_SHARD_SIZE, ConvertResult
from mlx_dgemma.convert.recipes import RECIPES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, Recipe
from mlx_dgemma.errors import ConvertError

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "RECIPES",
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "ConvertError",
    "ConvertResult",
    "Recipe",
    "convert",
]


class _CallableModule(ModuleType):
    """``mlx_dgemma.convert`` is a package (the converter and its command line) and, called, the ``convert``
    function: ``from mlx_dgemma import convert`` gives the package, and mlx-lm code calls it."""

    def __call__(self, *args: Any, **kwargs: Any) -> ConvertResult:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
