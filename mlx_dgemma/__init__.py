"""mlx_dgemma: DiffusionGemma on Apple Silicon with MLX."""

import sys

from ._platform import use_fast_blas

use_fast_blas()  # must run before mlx is imported

# The CLI module ``mlx_dgemma.generate`` is loaded before the function of the same name is bound below: a
# submodule loaded later would replace the package's ``generate`` function with itself. Not when it is the
# module being run (``python -m mlx_dgemma.generate``): runpy warns if it is already loaded then.
_argv = getattr(sys, "orig_argv", [])
if not any((a == "-m" and b == "mlx_dgemma.generate") or a == "-mmlx_dgemma.generate"
           for a, b in zip(_argv, [*_argv[1:], ""])):
    from . import generate as _generate_cli  # noqa: F401
from .cache import DiffusionCache  # noqa: E402
from .config import ModelArgs  # noqa: E402
from .errors import CheckpointError, DGemmaError, GenerationError  # noqa: E402
from .fast import FastConfig  # noqa: E402
from .generation import Commit, Done, Draft, GenerationStats, Response, generate, stream_generate  # noqa: E402
from .loader import DEFAULT_MODEL, load, load_model, load_tokenizer  # noqa: E402
from .model import Model  # noqa: E402
from .sampler import SamplerConfig  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CheckpointError",
    "Commit",
    "DGemmaError",
    "DiffusionCache",
    "Done",
    "Draft",
    "FastConfig",
    "GenerationError",
    "GenerationStats",
    "Model",
    "ModelArgs",
    "Response",
    "SamplerConfig",
    "generate",
    "load",
    "load_model",
    "load_tokenizer",
    "stream_generate",
]
