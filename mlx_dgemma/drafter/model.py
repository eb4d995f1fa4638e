"""The drafter: a small bidirectional transformer that proposes a whole canvas from the target's context features.

In the spirit of DFlash (z-lab's block drafter for autoregressive models), adapted to block diffusion:

* Context: the hidden states of a few of the target's encoder layers (``target_layers``), which the target computes
  anyway while it encodes the prompt and each committed canvas (``cache.capture``). They are concatenated, fused by
  one projection and normalised; every drafter layer reads them as extra keys/values (its own k/v projections).
* Canvas: the drafter's input is the target's embedding of the canvas tokens it knows (pad where it knows none: the
  first pass) plus a learned vector per canvas position. Attention is bidirectional over the canvas and the context.
* Output: the target's own tied, soft-capped LM head on the drafter's final hidden states.

The target's embedding and LM head are shared, frozen and not stored: the drafter's weights are its layers, the
fusion projection and the position vectors. Its hidden size is the target's, so the shared pieces fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn


@dataclass
class DrafterArgs:
    """The drafter's shape. ``hidden_size`` and ``vocab_size`` are the target's."""

    hidden_size: int
    vocab_size: int
    canvas_length: int
    target_layers: list[int] = field(default_factory=lambda: [1, 3, 5])
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 256
    context_window: int = 256  # the drafter reads at most this many of the latest context positions
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DrafterArgs:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Attention(nn.Module):
    """Canvas queries over [context; canvas] keys/values, bidirectional, RoPE on absolute positions."""

    def __init__(self, a: DrafterArgs):
        super().__init__()
        self.heads, self.head_dim = a.num_heads, a.head_dim
        inner = a.num_heads * a.head_dim
        self.q_proj = nn.Linear(a.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(a.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(a.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, a.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(a.head_dim, eps=a.rms_norm_eps)
        self.k_norm = nn.RMSNorm(a.head_dim, eps=a.rms_norm_eps)
        self.rope = nn.RoPE(a.head_dim, base=a.rope_theta)

    def _heads(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        return x.reshape(B, L, self.heads, self.head_dim).transpose(0, 2, 1, 3)

    def __call__(self, h: mx.array, context: mx.array, mask: mx.array | None) -> mx.array:
        B, C, _ = h.shape
        T = context.shape[1]
        both = mx.concatenate([context, h], axis=1)
        q = self.rope(self.q_norm(self._heads(self.q_proj(h))), offset=T)
        k = self.rope(self.k_norm(self._heads(self.k_proj(both))))
        v = self._heads(self.v_proj(both))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, C, -1))


class Layer(nn.Module):
    def __init__(self, a: DrafterArgs):
        super().__init__()
        self.attn_norm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.attn = Attention(a)
        self.mlp_norm = nn.RMSNorm(a.hidden_size, eps=a.rms_norm_eps)
        self.gate_up = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)
        self.down = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def __call__(self, h: mx.array, context: mx.array, mask: mx.array | None) -> mx.array:
        h = h + self.attn(self.attn_norm(h), context, mask)
        gate, up = mx.split(self.gate_up(self.mlp_norm(h)), 2, axis=-1)
        return h + self.down(nn.gelu_approx(gate) * up)


class Drafter(nn.Module):
    """``fuse`` the target's captured features once per position; ``__call__`` drafts a canvas's hidden states."""

    def __init__(self, args: DrafterArgs):
        super().__init__()
        self.args = args
        self.fuse_proj = nn.Linear(len(args.target_layers) * args.hidden_size, args.hidden_size, bias=False)
        self.fuse_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.positions = mx.zeros((args.canvas_length, args.hidden_size))
        self.layers = [Layer(args) for _ in range(args.num_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def fuse(self, features: mx.array) -> mx.array:
        """Captured target features [B, T, len(target_layers) * hidden] → the drafter's context [B, T, hidden]."""
        return self.fuse_norm(self.fuse_proj(features))

    def __call__(
        self, embedded: mx.array, context: mx.array, context_valid: mx.array | None = None
    ) -> mx.array:
        """Final hidden states [B, C, hidden] of a canvas whose tokens are ``embedded`` [B, C, hidden] (the
        target's embedding), given the fused ``context`` [B, T, hidden] (``context_valid`` [B, T]: real positions,
        for left-padded batches). Feed them to the target's LM head."""
        h = embedded + self.positions.astype(embedded.dtype)
        mask = None
        if context_valid is not None:
            canvas = mx.ones((h.shape[0], h.shape[1]), dtype=mx.bool_)
            mask = mx.concatenate([context_valid.astype(mx.bool_), canvas], axis=1)[:, None, None, :]
        for layer in self.layers:
            h = layer(h, context, mask)
        return self.norm(h)
