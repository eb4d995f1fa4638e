"""Checkpoint conversion for DiffusionGemma (imported as ``mlx_dgemma.convert``).

``convert(hf_path, mlx_path, quantize=True, q_bits=4)`` writes an MLX folder in the mlx-community layout,
streamed tensor by tensor, atomically; ``python -m mlx_dgemma.convert --help`` is the command line.
"""

from .errors import ConvertError
from .pipeline import DEFAULT_SHARD_SIZE, ConvertResult, convert
from .recipes import RECIPES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, Recipe

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
