"""Write a checkpoint in the mlx-community / mlx-vlm 0.7.10 layout, independently of our loader.

The rules are those of mlx-vlm's ``diffusion_gemma`` ``sanitize`` and ``quant_predicate``: only decoder
weights are kept (plus the encoder's own ``layer_scalar`` buffers), expert tensors get a ``.weight`` suffix,
the LM head and vision tower are dropped; when quantizing, embeddings, attention, router and dense MLP are
8-bit, experts and self-conditioning use the chosen bits, norms and scales stay as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

EIGHT_BIT = ("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _mlx_vlm_keys(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    out = {}
    for key, value in weights.items():
        if key == "lm_head.weight" or key.startswith(
            ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
        ):
            continue
        if key.startswith("model.encoder.language_model."):
            if key.endswith(".layer_scalar"):
                out[key] = value
            continue
        if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            key += ".weight"
        out[key] = value
    return out


def _quantizable(key: str) -> bool:
    module = key.rsplit(".", 1)[0]
    return key.endswith(".weight") and "norm" not in module.rsplit(".", 1)[-1]


def write_mlx_community(hf_dir: Path, out: Path, bits: int | None = None, group_size: int = 64) -> Path:
    """Convert the HF checkpoint in ``hf_dir`` to an mlx-community-style folder at ``out``."""
    weights = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    weights = _mlx_vlm_keys(weights)
    config = json.loads((hf_dir / "config.json").read_text())
    if bits is not None:
        quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
        for key in [k for k in weights if _quantizable(k)]:
            module = key[: -len(".weight")]
            eight = module.endswith(EIGHT_BIT) or ".self_attn." in module or "router" in module
            b = 8 if eight else bits
            w, scales, biases = mx.quantize(weights.pop(key), group_size, b)
            weights.update({f"{module}.weight": w, f"{module}.scales": scales, f"{module}.biases": biases})
            if eight and b != bits:
                quantization[module] = {"group_size": group_size, "bits": 8}
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("generation_config.json",):
        if (hf_dir / extra).exists():
            shutil.copy(hf_dir / extra, out / extra)
    return out
