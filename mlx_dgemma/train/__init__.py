"""Training DiffusionGemma in MLX: the block-diffusion objective, LoRA / full fine-tuning, checkpoints, fusing.

``load_adapters(model, path)`` applies adapters written by ``mlx_dgemma.train`` to a loaded model.
"""

from mlx_dgemma.errors import TrainError
from mlx_dgemma.train.data import Example, data_files, load_jsonl
from mlx_dgemma.train.lora import LoRAConfig, apply_lora, fuse_lora, load_adapters, prepare_full, save_fused
from mlx_dgemma.train.objective import ObjectiveConfig, training_loss
from mlx_dgemma.train.trainer import TrainConfig, Trainer, TrainResult

__all__ = [
    "Example",
    "LoRAConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "Trainer",
    "apply_lora",
    "data_files",
    "fuse_lora",
    "load_adapters",
    "load_jsonl",
    "prepare_full",
    "save_fused",
    "training_loss",
]
