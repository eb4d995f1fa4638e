"""Quantization recipes: which module is quantized, and with how many bits.

* ``uniform``: every quantizable module (embedding, attention, dense MLP, router, experts, self-conditioning)
  at the chosen bits.
* ``mixed``: the recipe of the mlx-community conversions (mlx-vlm's ``quant_predicate``): the embedding (also
  the tied LM head), attention, router and dense MLP at 8 bits; experts and self-conditioning at the chosen
  bits. The experts hold ~90% of the weights, so this costs little size and keeps the sensitive parts sharp.

A module whose input width is not a multiple of the group size stays unquantized, as in mlx-vlm. Norms,
scales and the vision tower are never quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_dgemma.errors import ConvertError

RECIPES = ("uniform", "mixed")
# Affine modes that MLX quantizes and that load back into quantized layers (gather_qmm, quantized_matmul).
# 1-bit is left out: it leaves no usable model, and mlx-vlm loads 1-bit layers with its own kernels.
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
SENSITIVE_BITS = 8
_SENSITIVE_SUFFIXES = ("embed_tokens", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class QuantSpec:
    """How one module is quantized."""

    bits: int
    group_size: int
    mode: str = "affine"


def is_sensitive(module: str) -> bool:
    """Modules the ``mixed`` recipe keeps at 8 bits: embedding, attention, router, dense MLP."""
    return module.endswith(_SENSITIVE_SUFFIXES) or ".self_attn." in module or "router" in module


@dataclass(frozen=True)
class Recipe:
    """A named recipe at a bit width and group size; checked on creation."""

    name: str = "mixed"
    bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.name not in RECIPES:
            raise ConvertError(
                f"unknown quantization recipe {self.name!r}: choose one of {', '.join(RECIPES)}"
            )
        if self.bits not in SUPPORTED_BITS:
            raise ConvertError(
                f"unsupported bit width {self.bits}: choose one of {', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConvertError(
                f"unsupported group size {self.group_size}: choose one of "
                f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
            )

    def spec_for(self, module: str, input_dims: int) -> QuantSpec | None:
        """The quantization of ``module`` (a quantizable layer with ``input_dims`` inputs), or None to keep it."""
        if input_dims % self.group_size:
            return None
        bits = SENSITIVE_BITS if self.name == "mixed" and is_sensitive(module) else self.bits
        return QuantSpec(bits, self.group_size)

    def config_block(self, specs: dict[str, QuantSpec]) -> dict[str, Any]:
        """The ``quantization`` block of config.json: defaults, plus an entry per module that differs."""
        block: dict[str, Any] = {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}
        for module in sorted(specs):
            spec = specs[module]
            if (spec.bits, spec.group_size) != (self.bits, self.group_size):
                block[module] = {"group_size": spec.group_size, "bits": spec.bits}
        return block

    def describe(self) -> str:
        """One line for humans, e.g. for the model card."""
        if self.name == "uniform":
            return f"uniform {self.bits}-bit (group size {self.group_size})"
        return (
            f"mixed {self.bits}-bit: experts and self-conditioning {self.bits}-bit; embedding, attention, router "
            f"and dense MLP {SENSITIVE_BITS}-bit (group size {self.group_size})"
        )

    @property
    def label(self) -> str:
        """Short tag for folder names: ``4bit`` (the community recipe) or ``4bit-uniform``."""
        return f"{self.bits}bit" if self.name == "mixed" else f"{self.bits}bit-{self.name}"
