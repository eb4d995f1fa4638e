"""Training-side adapter work: full fine-tuning setup, writing adapter files, and fusing.

The LoRA layers and :func:`load_adapters` live in ``mlx_dgemma.model.adapters`` (loading needs them, training builds on
them); they are re-exported here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from mlx_dgemma.errors import TrainError
from mlx_dgemma.model.adapters import (  # noqa: F401  (re-exported: the training package's public names)
    ADAPTER_FILE,
    CONFIG_FILE,
    DEFAULT_TARGETS,
    LORA_TYPES,
    SELF_CONDITIONING,
    TARGETS,
    AdapterError,
    LoRAConfig,
    LoRASwitchLinear,
    apply_lora,
    load_adapters,
    lora_config_from,
    lora_module_names,
    read_adapter_config,
    trainable_weights,
)
from mlx_dgemma.model.diffusion_gemma import Model


def prepare_full(model: Model, train_router: bool = False) -> Model:
    """Make every weight trainable except the ``layer_scalar`` buffers and, unless asked, the MoE router.

    NeMo's recipe keeps the router frozen during fine-tuning; training from scratch needs ``train_router=True``.
    """
    if any(
        isinstance(m, (nn.QuantizedLinear, QuantizedSwitchLinear, nn.QuantizedEmbedding))
        for _, m in model.named_modules()
    ):
        raise TrainError("full fine-tuning needs an unquantized model: use LoRA on a quantized one (QLoRA)")
    model.unfreeze()
    model.model.encoder.freeze()  # only the encoder's layer_scalar buffers live there
    for layer in model.layers:
        layer.freeze(keys=["layer_scalar"], recurse=False)
        if not train_router:
            layer.router.freeze()
    return model


def adapter_config(
    fine_tune_type: str, lora: LoRAConfig | None, num_layers: int, **extra: Any
) -> dict[str, Any]:
    """The ``adapter_config.json`` dict (mlx-lm's keys, plus our targets and alpha)."""
    config: dict[str, Any] = {"fine_tune_type": fine_tune_type, "num_layers": num_layers}
    if lora is not None:
        config["num_layers"] = lora.num_layers if lora.num_layers is not None else num_layers
        config["lora_parameters"] = {
            "rank": lora.rank,
            "alpha": lora.alpha,
            "scale": lora.scale,
            "dropout": lora.dropout,
            "targets": list(lora.targets),
        }
    return {**config, **extra}


def save_adapters(model: nn.Module, folder: Path, config: dict[str, Any]) -> None:
    """Write ``adapters.safetensors`` (the trainable tensors) and ``adapter_config.json`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / ADAPTER_FILE, lambda p: mx.save_safetensors(str(p), trainable_weights(model)))
    _atomic(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def fuse_lora(model: Model, dequantize: bool = False) -> Model:
    """Fold every LoRA module into its base layer, in place.

    A quantized base layer is re-quantized as it was, which rounds the whole layer again (lossy: the result
    drifts from the adapter model); ``dequantize`` instead dequantizes every quantized layer of the model.
    """
    fused = [
        (name, m.fuse(dequantize=dequantize))
        for name, m in model.named_modules()
        if isinstance(m, LORA_TYPES)
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        from mlx_lm.utils import dequantize_model

        dequantize_model(model)
    return model


def save_fused(
    model: Model, base_folder: Path, out: Path, dtype: mx.Dtype | None = None, dequantize: bool = False
) -> Path:
    """Write ``model`` (adapters fused) as a plain checkpoint folder that ``mlx_dgemma.load`` reads.

    Config, tokenizer, chat template and other small files are copied from the base folder; the weights are
    written in the mlx-community layout (with the vision tower when the model has one), floating-point ones in
    ``dtype`` (default: as they are now; see :func:`stored_dtype` for the base's). A quantized base stays
    quantized unless ``dequantize``.
    """
    from mlx_lm.utils import save_model

    fuse_lora(model, dequantize)
    if dtype is not None:
        model.set_dtype(dtype)
    out.mkdir(parents=True, exist_ok=True)
    for file in base_folder.iterdir():
        if file.is_file() and not re.search(r"\.safetensors(\.index\.json)?$", file.name):
            shutil.copy2(file, out / file.name)
    config = json.loads((out / "config.json").read_text())
    if dequantize:
        for key in ("quantization", "quantization_config"):
            config.pop(key, None)
    if getattr(model, "vision_args", None) is None and config.get("vision_config"):
        config["vision_config"] = (
            None  # no tower in the weights written: mlx-vlm would otherwise refuse the folder
        )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_model(out, model)
    return out


def stored_dtype(folder: Path) -> mx.Dtype:
    """The dtype a checkpoint stores its embedding in (read from the file header, no weights loaded)."""
    from mlx_dgemma.model.loader import load_weights

    weights = load_weights(folder)
    floating = [(k, v.dtype) for k, v in weights.items() if mx.issubdtype(v.dtype, mx.floating)]
    return next(
        (d for k, d in floating if "embed_tokens.weight" in k), floating[0][1] if floating else mx.float32
    )


def _atomic(path: Path, write) -> None:
    """Write through a temporary file, so an interrupt never leaves a half-written checkpoint file."""
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")  # mx.save_safetensors wants the suffix
    write(tmp)
    tmp.replace(path)
