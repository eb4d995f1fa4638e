"""mlx_dgemma: DiffusionGemma on Apple Silicon with MLX."""

from ._platform import use_fast_blas

use_fast_blas()  # must run before mlx is imported

from .cache import DiffusionCache  # noqa: E402
from .config import ModelArgs  # noqa: E402
from .errors import CheckpointError, DGemmaError, GenerationError  # noqa: E402
from .fast import FastConfig  # noqa: E402
from .generation import Commit, Done, Draft, GenerationStats, generate, stream_generate  # noqa: E402
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
    "SamplerConfig",
    "generate",
    "load",
    "load_model",
    "load_tokenizer",
    "stream_generate",
]
