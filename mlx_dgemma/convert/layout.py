"""Tensor names: the original Hugging Face checkpoint onto the mlx-community / mlx-vlm layout.

The rules are those of mlx-vlm 0.7.10's ``diffusion_gemma`` ``sanitize``, which our ``Model.sanitize`` also
reads: the shared text weights live under ``model.decoder.*`` (a tied weight stored under the encoder's name
moves there), the encoder keeps only its own ``layer_scalar`` buffers, the fused expert tensors gain a
``.weight`` suffix, the tied LM head and rotary buffers are dropped. The vision tower keeps its names; its
clipping calibration tensors are dropped unless the vision config uses clipped linears.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
ENCODER_TEXT = "model.encoder.language_model."
DECODER = "model.decoder."
_EXPERTS = (".experts.gate_up_proj", ".experts.down_proj")
_CLIPPING = ("input_max", "input_min", "output_max", "output_min")


def is_vision(name: str) -> bool:
    """True for a tensor of the vision tower or the vision embedder."""
    return name.startswith(VISION_PREFIXES)


def keeps_vision(config: dict[str, Any], drop_vision: bool) -> bool:
    """Whether the output carries the vision tower: when the source has one and it is not dropped."""
    return not drop_vision and bool(config.get("vision_config"))


def output_names(keys: Iterable[str], config: dict[str, Any], keep_vision: bool) -> dict[str, str]:
    """``{source key: output name}`` for every source tensor that goes into the output, in source-key order."""
    keys = set(keys)
    clipped = bool((config.get("vision_config") or {}).get("use_clipped_linears"))
    names = {}
    for key in sorted(keys):
        name = _output_name(key, keys, keep_vision, clipped)
        if name is not None:
            names[key] = name
    return names


def _output_name(key: str, keys: set[str], keep_vision: bool, clipped: bool) -> str | None:
    if key == "lm_head.weight" or "rotary_emb" in key:
        return None
    if is_vision(key):
        if not keep_vision or (not clipped and key.rsplit(".", 1)[-1] in _CLIPPING):
            return None
        return key
    if key.startswith(ENCODER_TEXT) and not key.endswith(".layer_scalar"):
        key = DECODER + key[len(ENCODER_TEXT) :]  # a tied weight stored on the encoder side
        if key in keys or key + ".weight" in keys:
            return None
    if key.endswith(_EXPERTS):
        key += ".weight"
    return key
