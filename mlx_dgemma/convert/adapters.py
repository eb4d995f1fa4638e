"""``--adapter-path``: fold fine-tuned adapters into the weights before converting them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlx_dgemma.convert.staging import FUSED, MODEL, make_marked_dir, recover
from mlx_dgemma.model.arrays import flatten
from mlx_dgemma.model.loader import load_model, resolve


@contextmanager
def fused_source(source: str | Path, adapter_path: str | Path, target: Path) -> Iterator[Path]:
    """A temporary plain checkpoint of ``source`` with the adapters of ``mlx_dgemma.train`` fused in.

    Written next to the output ``target`` (same file system), in a marked ``.<name>.fused-*`` folder, and
    removed afterwards (or, if the process was killed, by the next conversion to ``target``). A quantized base
    (QLoRA) is dequantized, so that the conversion quantizes the fused weights once, by its own recipe. The
    fused folder keeps the base's vision tower (its config drops ``vision_config`` when the base has none).
    """
    from mlx_dgemma.train import load_adapters
    from mlx_dgemma.train.lora import save_fused, stored_dtype

    folder = resolve(source)
    model = load_adapters(load_model(folder), adapter_path)
    quantized = any("scales" in name for name in _parameter_names(model))
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = make_marked_dir(target, FUSED)
    try:
        yield save_fused(model, folder, tmp / MODEL, stored_dtype(folder), dequantize=quantized)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parameter_names(model) -> list[str]:
    return [name for name, _ in flatten(model.parameters())]
