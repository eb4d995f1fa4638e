"""Model arguments read from a checkpoint's ``config.json`` (HF, released and MLX layouts alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlx_dgemma.errors import CheckpointError

MODEL_TYPES = ("diffusion_gemma",)

_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass
class ModelArgs:
    """The text model's shape. Defaults are those of ``google/diffusiongemma-26B-A4B-it``."""

    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    moe_intermediate_size: int = 704
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    num_global_key_value_heads: int = 2
    head_dim: int = 256
    global_head_dim: int = 512
    num_experts: int = 128
    top_k_experts: int = 8
    rms_norm_eps: float = 1e-6
    sliding_window: int = 1024
    max_position_embeddings: int = 262_144
    final_logit_softcapping: float = 30.0
    layer_types: list[str] = field(default_factory=list)
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(_DEFAULT_ROPE))
    canvas_length: int = 256
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: list[int] = field(default_factory=lambda: [1])
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if not self.layer_types and _sane(
            self.num_hidden_layers, "num_hidden_layers"
        ):  # else check() reports it
            # The released pattern: five sliding layers, then one full layer.
            self.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        # The reference forces the last layer to full attention.
        self.layer_types = list(self.layer_types)
        if self.layer_types:  # else check() reports the config
            self.layer_types[-1] = "full_attention"
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"

    def attention_shape(self, layer: int) -> tuple[int, int]:
        """(head_dim, kv_heads) of one layer: full layers have their own."""
        if self.is_sliding(layer):
            return self.head_dim, self.num_key_value_heads
        return self.global_head_dim, self.num_global_key_value_heads

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Build the arguments from a ``config.json`` dict, checking that it is a DiffusionGemma config."""
        if not isinstance(config, dict):
            raise CheckpointError(
                f"{source} holds a JSON {type(config).__name__}, not an object ({{...}}): "
                "re-download it or copy it from the original checkpoint"
            )
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(
                f"{source} has model_type {model_type!r}, not 'diffusion_gemma': "
                "point at a DiffusionGemma checkpoint (e.g. google/diffusiongemma-26B-A4B-it)"
            )
        text = config.get("text_config") or {}
        if not isinstance(text, dict):
            raise CheckpointError(
                f"{source}: text_config is a {type(text).__name__}, not an object: "
                "re-download the checkpoint's config.json"
            )
        text = dict(text)
        if text.get("use_bidirectional_attention") == "all":
            raise CheckpointError(
                f"{source} sets use_bidirectional_attention='all' (a bidirectional encoder), which no released "
                "DiffusionGemma uses and mlx_dgemma does not support: use a checkpoint with 'vision' or none"
            )
        kwargs = {k: text[k] for k in cls.__dataclass_fields__ if k in text}
        kwargs.update(_full_layer_shape(text))
        for key in ("canvas_length", "pad_token_id", "bos_token_id", "eos_token_id"):
            if key in config and config[key] is not None:
                kwargs[key] = config[key]
            elif key in text and text[key] is not None:
                kwargs[key] = text[key]
        kwargs["rope_parameters"] = {**_DEFAULT_ROPE, **(text.get("rope_parameters") or {})}
        try:
            args = cls(**kwargs)
        except (TypeError, AttributeError) as e:
            raise CheckpointError(
                f"{source} has an invalid text_config ({e}): re-download the checkpoint"
            ) from e
        args.check(source)
        return args

    def check(self, source: str = "config.json") -> None:
        """Raise one line naming the first value of the config that cannot describe a model."""

        def bad(name: str, value: Any, want: str) -> CheckpointError:
            return CheckpointError(
                f"{source}: {name} is {value!r}, but it must be {want}: fix the value or "
                "re-download the checkpoint's config.json"
            )

        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, value, "a positive integer")
            if value > MAX_SIZES[name]:
                raise bad(name, value, f"at most {MAX_SIZES[name]} (no model is that large; a typo?)")
        for name in ("rms_norm_eps", "final_logit_softcapping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise bad(name, value, "a positive number")
        if self.top_k_experts > self.num_experts:
            raise bad("top_k_experts", self.top_k_experts, f"at most num_experts ({self.num_experts})")
        for name in ("num_key_value_heads", "num_global_key_value_heads"):
            if self.num_attention_heads % getattr(self, name):
                raise bad(
                    name,
                    getattr(self, name),
                    f"a divisor of num_attention_heads ({self.num_attention_heads})",
                )
        if len(self.layer_types) != self.num_hidden_layers:
            raise bad(
                "layer_types",
                f"a list of {len(self.layer_types)}",
                f"one entry per layer (num_hidden_layers = {self.num_hidden_layers})",
            )
        unknown = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise bad("layer_types", unknown[0], "'sliding_attention' or 'full_attention'")
        ids = [("pad_token_id", self.pad_token_id), ("bos_token_id", self.bos_token_id)]
        ids += [("eos_token_id", t) for t in self.eos_token_id]
        for name, value in ids:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise bad(name, value, f"a token id below vocab_size ({self.vocab_size})")


# Sizes and counts that must be positive integers, and the most each may be: far above any real model (the
# released 26B-A4B has vocab 262144, hidden 2816, 30 layers, 128 experts, 262144 positions), low enough that an
# absurd value (a typo, a hostile file) is refused before anything is allocated for it.
MAX_SIZES = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "moe_intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "num_global_key_value_heads": 1024,
    "head_dim": 1 << 13,
    "global_head_dim": 1 << 13,
    "num_experts": 1 << 13,
    "top_k_experts": 1 << 13,
    "sliding_window": 1 << 24,
    "max_position_embeddings": 1 << 24,
    "canvas_length": 1 << 16,
}
_POSITIVE_INTS = tuple(MAX_SIZES)

# The vision tower's (``vision_config``) sizes, bounded the same way (the released tower: hidden 768, 16 layers).
MAX_VISION_SIZES = {
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1 << 13,
    "pooling_kernel_size": 64,
    "patch_size": 1024,
    "position_embedding_size": 1 << 20,
}


def _sane(value: Any, name: str) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_SIZES[name]


def check_vision(vision: Any, source: str = "config.json") -> None:
    """Raise one line naming the first size of ``vision_config`` (a ``VisionArgs``) that is not a positive
    integer within ``MAX_VISION_SIZES``, before the tower is built."""
    for name, most in MAX_VISION_SIZES.items():
        value = getattr(vision, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
            raise CheckpointError(
                f"{source}: vision_config.{name} is {value!r}, but it must be a positive integer "
                f"of at most {most}: fix the value or re-download the checkpoint's config.json"
            )


def _full_layer_shape(text: dict[str, Any]) -> dict[str, int]:
    """Head dim and kv heads of full-attention layers, from either config form.

    The released config names ``global_head_dim`` / ``num_global_key_value_heads``; ``save_pretrained`` of
    transformers 5.x writes a ``per_layer_config`` with per-layer overrides instead.
    """
    shape: dict[str, int] = {}
    if "global_head_dim" in text:
        shape["global_head_dim"] = text["global_head_dim"]
    if text.get("num_global_key_value_heads") is not None:
        shape["num_global_key_value_heads"] = text["num_global_key_value_heads"]
    layer_types = text.get("layer_types") or []
    for idx, override in (text.get("per_layer_config") or {}).items():
        if not isinstance(override, dict):
            continue
        is_full = idx == "full_attention" or (
            str(idx).isdigit() and int(idx) < len(layer_types) and layer_types[int(idx)] == "full_attention"
        )
        if is_full:
            if "head_dim" in override:
                shape["global_head_dim"] = override["head_dim"]
            if "num_key_value_heads" in override:
                shape["num_global_key_value_heads"] = override["num_key_value_heads"]
    shape.setdefault("num_global_key_value_heads", text.get("num_key_value_heads", 8))
    return shape
