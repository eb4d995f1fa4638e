"""LoRA adapters: the LoRA layers, applying them to a model, and reading an adapter folder.

Applying adapters is what loading needs (``load(..., adapter_path=...)``); training builds on it
(``mlx_dgemma.train``), so this module imports neither the loader nor the training package.

One adapter serves both the encoder and the decoder: this runtime, like the checkpoint, has one set of weights run
two ways. (TRL's PEFT recipe gives the Hugging Face encoder and decoder module trees separate adapters and notes
they then cannot be merged; a shared adapter is what ``fuse`` can fold into a plain checkpoint, so we choose it.)

Targets, per layer: ``attn`` (q/k/v/o projections), ``mlp`` (the dense gated MLP), ``experts`` (the routed experts:
one low-rank pair per expert on the fused ``gate_up_proj`` and on ``down_proj``), and ``self_conditioning`` (the
decoder's self-conditioning MLP, once). The default, ``attn,mlp``, is the reference fine-tune's (TRL: "adapting the
attention and dense-MLP linears ...; the MoE experts, the router, the self-conditioning block ... stay frozen").

Files: ``adapters.safetensors`` (the trained tensors) and ``adapter_config.json`` (mlx-lm's layout:
``fine_tune_type``, ``num_layers``, ``lora_parameters``). :func:`load_adapters` applies them to a loaded model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.lora import LoRASwitchLinear as _MlxLmLoRASwitchLinear

from mlx_dgemma.errors import AdapterError
from mlx_dgemma.model.arrays import flatten, load_safetensors
from mlx_dgemma.model.diffusion_gemma import Model, _switch

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"

TARGETS = {
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "experts": ("experts.gate_up_proj", "experts.down_proj"),
}
SELF_CONDITIONING = "self_conditioning"
DEFAULT_TARGETS = ("attn", "mlp")


@dataclass
class LoRAConfig:
    """Rank, scale (``alpha / rank``), dropout, which layers (the last ``num_layers``; None: all) and targets."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    num_layers: int | None = None
    targets: tuple[str, ...] = field(default=DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        unknown = set(self.targets) - {*TARGETS, SELF_CONDITIONING}
        if unknown:
            known = ", ".join([*TARGETS, SELF_CONDITIONING])
            raise AdapterError(f"unknown LoRA target {sorted(unknown)[0]!r}: choose from {known}")
        if self.rank < 1:
            raise AdapterError(f"the LoRA rank must be at least 1 (got {self.rank})")
        if not 0.0 <= self.dropout < 1.0:  # also refuses nan
            raise AdapterError(f"the LoRA dropout must be in [0, 1) (got {self.dropout})")
        if not math.isfinite(self.alpha):
            raise AdapterError(f"the LoRA alpha must be a finite number (got {self.alpha})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRASwitchLinear(_MlxLmLoRASwitchLinear):
    """mlx-lm's per-expert LoRA, running the base through the model's ``_switch`` (CPU half-precision upcast)."""

    @classmethod
    def wrap(cls, base: SwitchLinear | QuantizedSwitchLinear, r: int, dropout: float, scale: float):
        lora = cls(base.input_dims, base.output_dims, base.num_experts, r=r, dropout=dropout, scale=scale)
        # mlx-lm infers ``linear: SwitchLinear`` from its __init__; its own from_base wraps quantized ones too
        lora.linear = base  # type: ignore[assignment]
        return lora

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = _switch(self.linear, x, indices, sorted_indices)
        z = self.dropout(x)
        if z.dtype != mx.float32 and mx.default_device() == mx.cpu:
            z = z.astype(mx.float32)  # MLX's CPU gather_mm is float32-only
        a, b = self.lora_a.swapaxes(-1, -2), self.lora_b.swapaxes(-1, -2)
        z = mx.gather_mm(z, a.astype(z.dtype), rhs_indices=indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(z, b.astype(z.dtype), rhs_indices=indices, sorted_indices=sorted_indices)
        return y + (self.scale * z).astype(x.dtype)


LORA_TYPES = (LoRALinear, LoRASwitchLinear)


def lora_module_names(model: Model, cfg: LoRAConfig) -> list[str]:
    """Paths (``model.decoder.layers.3.self_attn.q_proj``, ...) of the modules ``cfg`` adapts.

    Full-attention layers have no ``v_proj`` (their values are their keys), so they get one adapter fewer.
    """
    n = len(model.layers)
    first = 0 if cfg.num_layers is None else max(0, n - cfg.num_layers)
    suffixes = [s for t in cfg.targets if t in TARGETS for s in TARGETS[t]]
    names = [f"model.decoder.layers.{i}.{s}" for i in range(first, n) for s in suffixes]
    if SELF_CONDITIONING in cfg.targets:
        names += [f"model.decoder.self_conditioning.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    present = {name for name, _ in model.named_modules()}
    return [name for name in names if name in present]


def apply_lora(model: Model, cfg: LoRAConfig) -> Model:
    """Freeze ``model`` and wrap the targeted layers in LoRA; only the low-rank matrices are trainable.

    Works on plain and quantized layers alike (a quantized base stays quantized and frozen: QLoRA).
    """
    model.freeze()
    modules = dict(model.named_modules())
    wrapped = []
    for name in lora_module_names(model, cfg):
        base = modules[name]
        if isinstance(base, (nn.Linear, nn.QuantizedLinear)):
            # mlx-lm annotates ``linear: nn.Linear`` but handles a QuantizedLinear base (QLoRA)
            lora = LoRALinear.from_base(base, r=cfg.rank, dropout=cfg.dropout, scale=cfg.scale)  # type: ignore[arg-type]
        elif isinstance(base, (SwitchLinear, QuantizedSwitchLinear)):
            lora = LoRASwitchLinear.wrap(base, r=cfg.rank, dropout=cfg.dropout, scale=cfg.scale)
        else:
            raise AdapterError(f"cannot put LoRA on {name} ({type(base).__name__}): is LoRA already applied?")
        lora.freeze()
        lora.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
        wrapped.append((name, lora))
    model.update_modules(tree_unflatten(wrapped))
    return model


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    """The trainable tensors by name: what ``adapters.safetensors`` holds."""
    return dict(flatten(model.trainable_parameters()))


def lora_config_from(config: dict[str, Any]) -> LoRAConfig:
    """The :class:`LoRAConfig` an ``adapter_config.json`` describes."""
    p = config.get("lora_parameters") or {}
    rank = int(p.get("rank", 8))
    alpha = p.get("alpha", p.get("scale", 2.0) * rank)
    return LoRAConfig(
        rank=rank,
        alpha=float(alpha),
        dropout=float(p.get("dropout", 0.0)),
        num_layers=config.get("num_layers"),
        targets=tuple(p.get("targets", DEFAULT_TARGETS)),
    )


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder).expanduser()
    file = folder / CONFIG_FILE
    if not file.is_file() or not (folder / ADAPTER_FILE).is_file():
        raise AdapterError(
            f"no adapters in {folder}: it needs {CONFIG_FILE} and {ADAPTER_FILE} (written by "
            "mlx_dgemma.train --out)"
        )
    from mlx_dgemma.runtime.bounded import parse_json, read_text

    config = parse_json(
        read_text(file, what="adapter config", error=AdapterError),
        str(file),
        AdapterError,
        "fix it or train the adapters again",
    )
    if not isinstance(config, dict):
        raise AdapterError(
            f"{file} holds a JSON {type(config).__name__}, not an object: train the adapters again"
        )
    return config


def load_adapters(model: Model, path: str | Path) -> Model:
    """Apply the adapters saved in ``path`` (LoRA or full fine-tune) to ``model``, in place; returns it.

    This is what ``--adapter-path`` of generate / server / convert calls after ``load_model``.
    """
    folder = Path(path).expanduser()
    config = read_adapter_config(folder)
    kind = config.get("fine_tune_type", "lora")
    if kind == "lora":
        apply_lora(model, lora_config_from(config))
        expected = trainable_weights(model)
    elif kind == "full":
        expected = dict(flatten(model.parameters()))
    else:
        raise AdapterError(f"{folder / CONFIG_FILE} has fine_tune_type {kind!r}: expected 'lora' or 'full'")
    weights = load_safetensors(folder / ADAPTER_FILE)
    _check_adapter_weights(weights, expected, folder, exact=kind == "lora")
    model.load_weights(list(weights.items()), strict=False)
    model.eval()
    return model


def _check_adapter_weights(weights: dict, expected: dict, folder: Path, exact: bool) -> None:
    unexpected = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights)) if exact else []
    wrong = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
    if unexpected or missing or wrong:
        first = (unexpected or missing or wrong)[0]
        raise AdapterError(
            f"adapters in {folder} do not fit this model ({len(unexpected)} unexpected, {len(missing)} missing, "
            f"{len(wrong)} mis-shaped, e.g. {first}): were they trained on another base model?"
        )
