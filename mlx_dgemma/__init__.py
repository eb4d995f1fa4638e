"""mlx_dgemma: DiffusionGemma on Apple Silicon with MLX."""

from mlx_dgemma.runtime.platform import use_fast_blas

use_fast_blas()  # must run before mlx is imported

from mlx_dgemma.batching import BatchResponse, batch_generate, stream_batch_generate  # noqa: E402
from mlx_dgemma.decoding.fast import FastConfig  # noqa: E402
from mlx_dgemma.decoding.sampler import SamplerConfig  # noqa: E402
from mlx_dgemma.errors import CheckpointError, DGemmaError, GenerationError  # noqa: E402
from mlx_dgemma.generation import (  # noqa: E402
    Commit,
    Done,
    GenerationStats,
    Preview,
    Response,
    generate,
    run,
    stream_generate,
)
from mlx_dgemma.model.cache import DiffusionCache  # noqa: E402
from mlx_dgemma.model.config import ModelArgs  # noqa: E402
from mlx_dgemma.model.diffusion_gemma import Model  # noqa: E402
from mlx_dgemma.model.loader import DEFAULT_MODEL, load, load_model, load_tokenizer  # noqa: E402
from mlx_dgemma.request import GenerationOptions, GenerationRequest, prepare  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "BatchResponse",
    "CheckpointError",
    "Commit",
    "DGemmaError",
    "DiffusionCache",
    "Done",
    "FastConfig",
    "GenerationError",
    "GenerationOptions",
    "GenerationRequest",
    "GenerationStats",
    "Model",
    "ModelArgs",
    "Preview",
    "Response",
    "SamplerConfig",
    "batch_generate",
    "generate",
    "load",
    "load_model",
    "load_tokenizer",
    "prepare",
    "run",
    "stream_batch_generate",
    "stream_generate",
]
