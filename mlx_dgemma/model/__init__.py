"""The model: its arguments (``config``), the network (``diffusion_gemma``), the encoder's KV cache (``cache``), the
vision tower and its image processing, checkpoint loading with LoRA adapters, and tensor-parallel sharding."""

from mlx_dgemma.model.cache import DiffusionCache
from mlx_dgemma.model.config import ModelArgs
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.model.loader import DEFAULT_MODEL, load, load_model, load_tokenizer

__all__ = ["DEFAULT_MODEL", "DiffusionCache", "Model", "ModelArgs", "load", "load_model", "load_tokenizer"]
