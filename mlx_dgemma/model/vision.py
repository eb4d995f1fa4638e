"""Gemma 4's vision tower and DiffusionGemma's multimodal embedder in MLX, and the encoder's image plumbing.

Reference: transformers 5.23 ``models/gemma4/modeling_gemma4.py`` (``Gemma4VisionModel``: patch embedder with a
2-D position table, bidirectional encoder with axial RoPE and q/k/v norms at scale 1.0, position-based average
pooling, optional standardization) and ``models/diffusion_gemma/modeling_diffusion_gemma.py``
(``DiffusionGemmaMultimodalEmbedder``, ``get_placeholder_mask`` / ``masked_scatter``,
``get_block_sequence_ids_for_mask``). Parameter names match the HF checkpoint under ``model.encoder.``, which
the mlx-community (mlx-vlm) folders keep as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_dgemma.errors import GenerationError

VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_CLIPPING = ("input_min", "input_max", "output_min", "output_max")


@dataclass
class VisionArgs:
    """The vision tower's shape (``vision_config``) plus the image token ids of the top-level config."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "axial", "rope_theta": 100.0}
    )
    image_token_id: int = 258_880
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    # text_config.use_bidirectional_attention == "vision": tokens of one image attend both ways in the encoder.
    # (Kept here, not in ModelArgs, whose fields fingerprint the text model for drafters.)
    bidirectional: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VisionArgs | None:
        """From a checkpoint's ``config.json`` dict; None when it has no ``vision_config``."""
        vision = config.get("vision_config")
        if not vision:
            return None
        kwargs = {k: vision[k] for k in cls.__dataclass_fields__ if vision.get(k) is not None}
        for key in ("image_token_id", "boi_token_id", "eoi_token_id"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        kwargs["bidirectional"] = (config.get("text_config") or {}).get(
            "use_bidirectional_attention"
        ) == "vision"
        args = cls(**kwargs)
        args.rope_parameters = {"rope_theta": 100.0, **(args.rope_parameters or {})}
        return args


def has_vision_weights(weights: dict[str, mx.array]) -> bool:
    """True when a checkpoint carries the vision tower (fused / text-only conversions leave it out)."""
    return any(k.startswith(VISION_PREFIXES) for k in weights)


def check_positions(positions: mx.array, args: VisionArgs) -> None:
    """Raise if a patch position is past the tower's position table (the reference's embedding lookup fails)."""
    top = int(positions.max()) if positions.size else 0
    if top >= args.position_embedding_size:
        raise GenerationError(
            f"an image is {top + 1} patches along one side, but this vision tower knows "
            f"{args.position_embedding_size} positions: use a smaller image budget or a less elongated image"
        )


def keep_vision_key(key: str, args: VisionArgs) -> bool:
    """Clipping calibration tensors are kept only when the tower clips (as mlx-vlm's ``sanitize`` does)."""
    return args.use_clipped_linears or key.rsplit(".", 1)[-1] not in _CLIPPING


class ClippableLinear(nn.Module):
    """A bias-free linear whose input and output may be clamped to calibrated ranges (``use_clipped_linears``)."""

    def __init__(self, in_dims: int, out_dims: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min, self.input_max = mx.array(-mx.inf), mx.array(mx.inf)
            self.output_min, self.output_max = mx.array(-mx.inf), mx.array(mx.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if self.clipped:
            x = mx.clip(x, self.input_min, self.input_max)
        y = self.linear(x)
        return mx.clip(y, self.output_min, self.output_max) if self.clipped else y


def _rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """Gemma 4's RMSNorm: computed in float32, cast back."""
    return mx.fast.rms_norm(x.astype(mx.float32), weight, eps).astype(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return _rms_norm(x, self.weight.astype(mx.float32), self.eps)


def _rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate the first half of each head by the x position and the second half by the y position."""
    half = x.shape[-1] // 2
    parts = []
    for sl in (slice(0, half), slice(half, None)):
        xp, c, s = x[..., sl], cos[..., sl], sin[..., sl]
        parts.append(xp * c + _rotate_half(xp) * s)
    return mx.concatenate(parts, axis=-1)


class VisionAttention(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        c = a.use_clipped_linears
        self.q_proj = ClippableLinear(a.hidden_size, self.n_heads * self.head_dim, c)
        self.k_proj = ClippableLinear(a.hidden_size, self.n_kv * self.head_dim, c)
        self.v_proj = ClippableLinear(a.hidden_size, self.n_kv * self.head_dim, c)
        self.o_proj = ClippableLinear(self.n_heads * self.head_dim, a.hidden_size, c)
        self.q_norm = RMSNorm(self.head_dim, a.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, a.rms_norm_eps)
        self.eps = a.rms_norm_eps

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array) -> mx.array:
        B, N, _ = x.shape
        q = axial_rope(self.q_norm(self.q_proj(x).reshape(B, N, self.n_heads, self.head_dim)), cos, sin)
        k = axial_rope(self.k_norm(self.k_proj(x).reshape(B, N, self.n_kv, self.head_dim)), cos, sin)
        v = _rms_norm(self.v_proj(x).reshape(B, N, self.n_kv, self.head_dim), None, self.eps)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, N, -1))


class VisionMLP(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        c = a.use_clipped_linears
        self.gate_proj = ClippableLinear(a.hidden_size, a.intermediate_size, c)
        self.up_proj = ClippableLinear(a.hidden_size, a.intermediate_size, c)
        self.down_proj = ClippableLinear(a.intermediate_size, a.hidden_size, c)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.self_attn = VisionAttention(a)
        self.mlp = VisionMLP(a)
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.layers = [VisionLayer(a) for _ in range(a.num_hidden_layers)]
        spatial = a.head_dim // 2
        theta = float(a.rope_parameters.get("rope_theta", 100.0))
        self._inv_freq = 1.0 / (theta ** (mx.arange(0, spatial, 2, dtype=mx.float32) / spatial))

    def __call__(self, x: mx.array, positions: mx.array, valid: mx.array) -> mx.array:
        freqs = positions.astype(mx.float32)[..., None] * self._inv_freq  # [B, N, 2, head_dim / 4]
        fx, fy = freqs[:, :, 0], freqs[:, :, 1]
        angles = mx.concatenate([fx, fx, fy, fy], axis=-1)[:, :, None, :]  # broadcast over heads
        cos, sin = mx.cos(angles).astype(x.dtype), mx.sin(angles).astype(x.dtype)
        mask = valid[:, None, None, :]  # bidirectional; padding patches are never attended to
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x


class PatchEmbedder(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * a.patch_size**2, a.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, a.position_embedding_size, a.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array, padding: mx.array) -> mx.array:
        w = self.input_proj.weight
        h = self.input_proj((2 * (pixels - 0.5)).astype(w.dtype))  # pixels come in [0, 1]
        pos = mx.maximum(positions, 0)
        table = self.position_embedding_table
        emb = table[0][pos[..., 0]] + table[1][pos[..., 1]]
        return h + mx.where(padding[..., None], mx.zeros_like(emb), emb)


class VisionTower(nn.Module):
    """``Gemma4VisionModel``: patches [B, N, 3 p^2] and (x, y) positions (-1 for padding) to soft tokens."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.args = a
        self.patch_embedder = PatchEmbedder(a)
        self.encoder = VisionEncoder(a)
        if a.standardize:
            self.std_bias = mx.zeros((a.hidden_size,))
            self.std_scale = mx.ones((a.hidden_size,))

    def __call__(self, pixel_values: mx.array, positions: mx.array) -> mx.array:
        """The valid soft tokens of every image, concatenated: [sum of soft tokens, hidden]."""
        k = self.args.pooling_kernel_size
        length = pixel_values.shape[-2] // (k * k)
        padding = (positions == -1).all(axis=-1)
        h = self.patch_embedder(pixel_values, positions, padding)
        dtype = h.dtype
        h = self.encoder(h, positions, ~padding)
        h = mx.where(padding[..., None], mx.zeros_like(h), h)
        pooled, keep = _avg_pool(h, positions, length)
        pooled = pooled.astype(dtype).astype(mx.float32) * (self.args.hidden_size**0.5)
        pooled = pooled.reshape(-1, pooled.shape[-1])[mx.array(np.flatnonzero(np.array(keep).reshape(-1)))]
        if self.args.standardize:
            pooled = (pooled - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return pooled.astype(dtype)


def _avg_pool(h: mx.array, positions: mx.array, length: int) -> tuple[mx.array, mx.array]:
    """Average each k x k group of patches into one soft token (grid order), as the reference's one-hot matmul."""
    B, N, H = h.shape
    if length == N:
        return h, mx.ones((B, N), dtype=mx.bool_)
    k = int((N // length) ** 0.5)
    if k * k * length != N:
        raise GenerationError(
            f"cannot pool {N} patches into {length} soft tokens: use the model's image processor"
        )
    pos = mx.maximum(positions, 0)
    max_x = pos[..., 0].max(axis=-1, keepdims=True) + 1
    cell = pos // k
    idx = cell[..., 0] + (max_x // k) * cell[..., 1]  # [B, N]
    rows = mx.broadcast_to(mx.arange(B)[:, None], idx.shape)
    out = mx.zeros((B, length, H), dtype=mx.float32).at[rows, idx].add(h.astype(mx.float32) / (k * k))
    hit = mx.zeros((B, length), dtype=mx.int32).at[rows, idx].add(1)
    return out, hit > 0


class MultimodalEmbedder(nn.Module):
    """``embed_vision``: weightless RMSNorm, then a projection into the text model's width."""

    def __init__(self, a: VisionArgs, text_hidden: int):
        super().__init__()
        self.embedding_projection = nn.Linear(a.hidden_size, text_hidden, bias=False)
        self.eps = a.rms_norm_eps

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(_rms_norm(x, None, self.eps))


# -- the encoder's side: placeholders and the bidirectional-vision mask ---------------------------------------


def scatter_image_features(
    h: mx.array, input_ids: mx.array, features: mx.array, image_token_id: int
) -> mx.array:
    """``masked_scatter``: the image features, in order, replace the embeddings of the image placeholder tokens."""
    where = np.flatnonzero(np.array(input_ids).reshape(-1) == image_token_id)
    if len(where) != features.shape[0]:
        raise GenerationError(
            f"the prompt has {len(where)} image placeholder tokens but the images give {features.shape[0]} soft "
            "tokens: build the prompt and pixels with the same image processor (mlx_dgemma.model.image_processing)"
        )
    if len(where) == 0:
        return h
    B, L, D = h.shape
    flat = h.reshape(B * L, D)
    flat[mx.array(where)] = features.astype(h.dtype)
    return flat.reshape(B, L, D)


def block_ids(is_vision: mx.array) -> mx.array:
    """``get_block_sequence_ids_for_mask``: one id per contiguous run of vision tokens, -1 for text."""
    v = np.array(is_vision).astype(bool)
    prev = np.zeros_like(v)
    prev[:, 1:] = v[:, :-1]
    groups = np.cumsum(v & ~prev, axis=1) - 1
    return mx.array(np.where(v, groups, -1).astype(np.int32))


def record_vision_positions(
    cache: Any, mm_token_type_ids: mx.array | None, B: int, L: int
) -> mx.array | None:
    """Append the new tokens' vision flags to ``cache.vision`` and return block ids of every position so far.

    ``mm_token_type_ids`` (1 image, 2 video, 0 text) covers either the new tokens or, as the reference indexes
    it, the whole sequence (cached positions included). None when no new token is a vision token: the overlay
    then changes nothing, since only vision queries gain keys.
    """
    old = getattr(cache, "vision", None)
    offset = cache.offset
    if mm_token_type_ids is None:
        new = None
    else:
        types = mx.array(mm_token_type_ids)
        if types.ndim == 1:
            types = types[None]
        if types.shape[-1] == offset + L and offset:
            types = types[:, offset:]
        if types.shape != (B, L):
            raise GenerationError(
                f"mm_token_type_ids has shape {tuple(types.shape)}, expected ({B}, {L}) for the new tokens "
                f"(or ({B}, {offset + L}) for the whole sequence): pass the processor's output as it is"
            )
        new = (types == 1) | (types == 2)
        if not new.any().item():
            new = None
    if new is None and old is None:
        return None
    if old is None:
        old = mx.zeros((B, offset), dtype=mx.bool_)
    cache.vision = mx.concatenate([old, new if new is not None else mx.zeros((B, L), dtype=mx.bool_)], axis=1)
    return None if new is None else block_ids(cache.vision)


def or_same_block(allowed: mx.array, blocks: mx.array, offset: int, stored: int, L: int) -> mx.array:
    """OR ``blockwise_overlay`` into a [L, K] or [B, 1, L, K] mask: a vision query sees every key of its block."""
    q = blocks[:, offset : offset + L]
    k = blocks[:, offset - stored : offset + L]
    same = (q[:, :, None] == k[:, None, :]) & (q[:, :, None] >= 0)
    return allowed | same[:, None]


def safe_chunk_end(is_vision: np.ndarray, start: int, end: int) -> int:
    """Move a prefill chunk's end past the run of vision tokens it would cut (an image block is encoded whole,
    as the reference encodes its prompt in one call)."""
    n = is_vision.shape[-1]
    while end < n and end > start and is_vision[:, end - 1].any() and is_vision[:, end].any():
        end += 1
    return end


def prefill_with_images(
    model: Any,
    input_ids: mx.array,
    cache: Any,
    pixel_values: mx.array | None,
    image_position_ids: mx.array | None,
    mm_token_type_ids: mx.array | None,
    chunk: int = 2048,
) -> None:
    """Encode a prompt with images into ``cache`` in chunks of about ``chunk`` positions.

    The tower runs once over all images; each chunk takes the features of its own placeholders, and no chunk
    boundary falls inside an image block (with bidirectional vision attention, a split block would lose the
    keys of its later half; the reference encodes the whole prompt in one call).
    """
    feats = None if pixel_values is None else model.get_image_features(pixel_values, image_position_ids)
    ids = np.array(input_ids)
    is_image = (
        ids == model.vision_args.image_token_id if model.vision_args is not None else np.zeros_like(ids, bool)
    )
    types = None if mm_token_type_ids is None else np.array(mm_token_type_ids)
    vision_runs = is_image if types is None else (types == 1) | (types == 2)
    if feats is not None and int(is_image.sum()) != feats.shape[0]:
        raise GenerationError(
            f"the prompt has {int(is_image.sum())} image placeholder tokens but the images give {feats.shape[0]} "
            "soft tokens: build the prompt and pixels with the same image processor (mlx_dgemma.model.image_processing)"
        )
    used, start, n = 0, 0, ids.shape[1]
    while start < n:
        end = safe_chunk_end(vision_runs, start, min(start + chunk, n))
        count = int(is_image[:, start:end].sum())
        part = None if feats is None else feats[used : used + count]
        used += count
        model.encode(
            input_ids[:, start:end],
            cache,
            mm_token_type_ids=None if types is None else mx.array(types[:, start:end]),
            image_features=part if part is not None and count else None,
        )
        mx.eval(cache.state_arrays())
        start = end
