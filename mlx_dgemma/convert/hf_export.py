"""Write a model (e.g. fine-tuned and fused) in the original Hugging Face layout, for transformers and vLLM.

The layout is what ``DiffusionGemmaForBlockDiffusion.save_pretrained`` writes: the weights the encoder and
decoder share under ``model.decoder.*`` (the LM head tied to its embedding, not stored), expert tensors
without a ``.weight`` suffix, each side's ``layer_scalar``, and the vision tower copied unchanged from the
base checkpoint when it has one (this runtime is text-only and never changes it). Quantized layers are
dequantized: the HF layout has no place for MLX's scales and biases.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_dgemma.errors import CheckpointError
from mlx_dgemma.model.arrays import flatten
from mlx_dgemma.model.diffusion_gemma import Model

VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
EXPERT_WEIGHTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)\.weight$")


def hf_weights(model: Model, dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    """``model``'s text weights under HF checkpoint names, dequantized, floating point ones in ``dtype``."""
    out: dict[str, mx.array] = {}
    for path, module in model.named_modules():
        if "scales" in module and hasattr(module, "bits"):  # QuantizedLinear / QuantizedSwitchLinear / ...
            w = mx.dequantize(
                module["weight"],
                module["scales"],
                module.get("biases"),
                module.group_size,
                module.bits,
                mode=getattr(module, "mode", "affine"),
            )
            out[f"{path}.weight"] = w
    quantized = {k.rsplit(".", 1)[0] for k in out}
    for key, value in flatten(model.parameters()):
        if key.rsplit(".", 1)[0] not in quantized:
            out[key] = value
    if isinstance(model.model.decoder.embed_tokens, nn.QuantizedEmbedding):
        out.pop("model.decoder.embed_tokens.scales", None)
        out.pop("model.decoder.embed_tokens.biases", None)
    renamed = {}
    for key, value in out.items():
        key = EXPERT_WEIGHTS.sub(r".experts.\1", key)
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(dtype)
        renamed[key] = value
    return renamed


def vision_weights(base_folder: Path) -> dict[str, mx.array]:
    """The base checkpoint's vision tower tensors (memory-mapped), if it has them."""
    from mlx_dgemma.model.loader import load_weights

    return {k: v for k, v in load_weights(base_folder).items() if k.startswith(VISION_PREFIXES)}


def export_hf(
    model: Model, base_folder: str | Path, out: str | Path, dtype: mx.Dtype | None = mx.bfloat16
) -> Path:
    """Write ``model`` to ``out`` in the original HF layout, with ``base_folder``'s config, tokenizer and
    vision tower; floating-point weights in ``dtype`` (default bfloat16, as released; ``None``: as they are).

    The weights go to a temporary file renamed at the end, so an interrupted export leaves no half-written
    checkpoint.
    """
    base, out = Path(base_folder), Path(out)
    if out.resolve() == base.resolve():
        raise CheckpointError(f"the export folder {out} is the base model's folder: choose another")
    out.mkdir(parents=True, exist_ok=True)
    for file in base.iterdir():
        if file.is_file() and not re.search(r"\.safetensors(\.index\.json)?$", file.name):
            shutil.copy2(file, out / file.name)
    config = json.loads((out / "config.json").read_text())
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    if dtype is not None:
        config["dtype"] = {mx.bfloat16: "bfloat16", mx.float16: "float16", mx.float32: "float32"}[dtype]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = {**vision_weights(base), **hf_weights(model, dtype)}
    tmp = out / "model.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights, metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    return out
