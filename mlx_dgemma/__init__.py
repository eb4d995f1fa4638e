"""mlx_dgemma: DiffusionGemma on Apple Silicon with MLX."""

from ._platform import use_fast_blas

use_fast_blas()  # must run before mlx is imported

from .cache import DiffusionCache  # noqa: E402
from .config import ModelArgs  # noqa: E402
from .errors import CheckpointError, DGemmaError  # noqa: E402
from .loader import load_model  # noqa: E402
from .model import Model  # noqa: E402

__version__ = "0.1.0"

__all__ = ["CheckpointError", "DGemmaError", "DiffusionCache", "Model", "ModelArgs", "load_model"]
