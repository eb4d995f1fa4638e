"""The encoder's KV cache, which the decoder reads without writing.

Full-attention layers reuse mlx-lm's ``KVCache`` (pre-allocated, grows in steps). Sliding layers keep, in
temporal order, exactly the last ``sliding_window - 1`` positions, as transformers' ``DynamicSlidingWindowLayer``
does: the decoder attends to *all* of what a sliding layer stores plus the canvas, so storing more (mlx-lm's
``RotatingKVCache`` keeps ``window - 1 + n`` after an n-token update) would change the decoder's output.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache


class FullKVCache(KVCache):
    """mlx-lm's growing cache, plus a read-only view with extra (canvas) keys appended."""

    def fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Cached keys/values followed by ``keys``/``values``, without storing the latter."""
        if self.keys is None:
            return keys, values
        k, v = self.keys_and_values()
        return mx.concatenate([k, keys], axis=2), mx.concatenate([v, values], axis=2)


class WindowKVCache:
    """Keeps the last ``window - 1`` positions of a sliding-attention layer."""

    def __init__(self, window: int):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions seen so far, not positions stored

    def fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Stored keys/values followed by ``keys``/``values``, without storing the latter."""
        if self.keys is None:
            return keys, values
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store ``keys``/``values`` and return everything the new queries may attend to."""
        keys, values = self.fetch(keys, values)
        keep = self.window - 1
        self.offset += keys.shape[2] - (0 if self.keys is None else self.keys.shape[2])
        self.keys, self.values = keys[..., -keep:, :], values[..., -keep:, :]
        return keys, values

    @property
    def stored(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None]:
        return self.keys, self.values


class DiffusionCache(list):
    """Per-layer caches, plus the padding mask that all layers share.

    ``valid`` is ``None`` while every cached position is a real token, else a bool ``[B, offset]`` array
    (left padding of batched prompts). ``offset`` is the number of positions encoded so far.
    """

    def __init__(self, layers: list[FullKVCache | WindowKVCache]):
        super().__init__(layers)
        self.valid: mx.array | None = None
        # Hidden states of these encoder layers are kept for a drafter (its context features), one
        # [B, L, len(capture) * hidden] chunk per encode call.
        self.capture: tuple[int, ...] = ()
        self.features: list[mx.array] = []
        # Bool [B, offset]: which cached positions are vision tokens (None until an image is encoded); an image
        # block continuing into the next encode call keeps attending both ways (``vision.record_vision_positions``).
        self.vision: mx.array | None = None

    @property
    def offset(self) -> int:
        return self[0].offset if self else 0

    def extend_valid(self, mask: mx.array | None, batch: int, length: int) -> None:
        """Record the padding mask of ``length`` newly encoded positions (``None``: all real)."""
        if mask is None and self.valid is None:
            return
        new = mx.ones((batch, length), dtype=mx.bool_) if mask is None else mask.astype(mx.bool_)
        old = self.valid
        if old is None:
            old = mx.ones((batch, self.offset - length), dtype=mx.bool_)
        self.valid = mx.concatenate([old, new], axis=1)

    def state_arrays(self) -> list[mx.array]:
        """Every array the cache holds, e.g. for ``mx.eval``."""
        arrays = [a for c in self for a in (c.keys, c.values) if a is not None]
        return arrays + ([self.valid] if self.valid is not None else []) + self.features
