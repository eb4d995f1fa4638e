"""``--adapter-path``: fold fine-tuned adapters into the weights before converting them."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlx_dgemma.loader import load_model, resolve


@contextmanager
def fused_source(source: str | Path, adapter_path: str | Path, near: Path) -> Iterator[Path]:
    """A temporary plain checkpoint of ``source`` with the adapters of ``mlx_dgemma.train`` fused in.

    Written next to the output (same file system) and removed afterwards. A quantized base (QLoRA) is
    dequantized, so that the conversion quantizes the fused weights once, by its own recipe. The fused
    folder keeps the base's vision tower (its config drops ``vision_config`` when the base has none).
    """
    from mlx_dgemma.train import load_adapters
    from mlx_dgemma.train.lora import save_fused, stored_dtype

    folder = resolve(source)
    model = load_adapters(load_model(folder), adapter_path)
    quantized = any("scales" in name for name in _parameter_names(model))
    near.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fused-", dir=near) as tmp:
        yield save_fused(model, folder, Path(tmp), stored_dtype(folder), dequantize=quantized)


def _parameter_names(model) -> list[str]:
    from mlx.utils import tree_flatten

    return [name for name, _ in tree_flatten(model.parameters())]
