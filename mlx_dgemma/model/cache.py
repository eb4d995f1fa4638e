"""The encoder's KV cache, which the decoder reads without writing.

Full-attention layers reuse mlx-lm's ``KVCache`` (pre-allocated, grows in steps). Sliding layers keep, in
temporal order, exactly the last ``sliding_window - 1`` positions, as transformers' ``DynamicSlidingWindowLayer``
does: the decoder attends to *all* of what a sliding layer stores plus the canvas, so storing more (mlx-lm's
``RotatingKVCache`` keeps ``window - 1 + n`` after an n-token update) would change the decoder's output.

Both follow mlx-lm's cache protocol (``state`` / ``from_state``), so ``mlx_lm.models.cache``'s
``make_prompt_cache`` / ``save_prompt_cache`` / ``load_prompt_cache`` work on them. ``load_prompt_cache`` finds a
layer's class by name in that module's namespace (``globals()[name]``): we register our two class names there
(see ``_register``) rather than renaming them after mlx-lm's, whose behaviour differs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mlx.core as mx
import mlx_lm.models.cache as mlx_lm_cache
from mlx_lm.models.cache import KVCache, _BaseCache


class FullKVCache(KVCache):
    """mlx-lm's growing cache, plus a read-only view with extra (canvas) keys appended."""

    def fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Cached keys/values followed by ``keys``/``values``, without storing the latter."""
        if self.keys is None:
            return keys, values
        k, v = self.keys_and_values()
        return mx.concatenate([k, keys], axis=2), mx.concatenate([v, values], axis=2)


class WindowKVCache(_BaseCache):
    """Keeps the last ``window - 1`` positions of a sliding-attention layer."""

    def __init__(self, window: int):
        self.window = window
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # positions seen so far, not positions stored

    def fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Stored keys/values followed by ``keys``/``values``, without storing the latter."""
        if self.keys is None or self.values is None:  # both set together
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

    def size(self) -> int:
        return self.stored

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:  # both set together
            return 0
        return self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None, int, int]:
        """mlx-lm's protocol: everything ``from_state`` needs, arrays and scalars (``save_prompt_cache``)."""
        return self.keys, self.values, self.offset, self.window

    @state.setter
    def state(self, v: tuple[mx.array | None, mx.array | None, int, int]) -> None:
        self.keys, self.values, self.offset, self.window = v


def _register() -> None:
    """Make ``mlx_lm.models.cache.load_prompt_cache`` able to rebuild our layer caches from their class names."""
    for cls in (FullKVCache, WindowKVCache):
        # Should mlx-lm ever define a class of the same name, leave it be: a cache loaded as that class is then
        # refused in one line by ``request.as_diffusion_cache`` instead of this import failing.
        if not hasattr(mlx_lm_cache, cls.__name__):
            setattr(mlx_lm_cache, cls.__name__, cls)


_register()


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


def copy_cache(cache: DiffusionCache) -> DiffusionCache:
    """A cache that shares no mutable object with ``cache``.

    MLX arrays are immutable, but mlx-lm's ``KVCache`` writes into its pre-allocated buffer by slice
    assignment, which rebinds the array *object* it holds: a shallow copy would see later writes. Fresh
    layer objects holding fresh slices are enough (no data is copied).
    """
    layers: list[FullKVCache | WindowKVCache] = []
    for c in cache:
        if isinstance(c, WindowKVCache):
            new_w = WindowKVCache(c.window)
            new_w.keys, new_w.values, new_w.offset = c.keys, c.values, c.offset
            layers.append(new_w)
        else:
            new_f = FullKVCache()
            if c.keys is not None:
                new_f.keys, new_f.values = c.keys[..., : c.offset, :], c.values[..., : c.offset, :]
            new_f.offset = c.offset
            layers.append(new_f)
    out = DiffusionCache(layers)
    out.valid, out.capture, out.features = cache.valid, cache.capture, list(cache.features)
    mx.eval(out.state_arrays())
    return out


class StaleKV:
    """Fast decoding's canvas keys/values: per layer, those of every canvas position ``[B, H, C, D]`` from the
    last pass that computed it. A sparse pass (``Model.denoise(positions=...)``) writes its own positions' in and
    reads the others' as they were (Fast-dLLM's approximate cache). ``stores`` is ``None`` before the first pass."""

    def __init__(self, canvas: int, stores: list[tuple[mx.array, mx.array] | None] | None = None):
        self.canvas, self.stores = canvas, stores

    def views(self, cache: DiffusionCache, positions: mx.array) -> list[CanvasKV]:
        """One layer cache view per layer for a pass over canvas ``positions`` [B, S]."""
        if self.stores is None:
            self.stores = [None] * len(cache)
        return [CanvasKV(c, self, i, positions) for i, c in enumerate(cache)]

    def arrays(self) -> list[mx.array]:
        """Every array held, e.g. for ``mx.eval``."""
        return [a for kv in self.stores or [] if kv is not None for a in kv]


class CanvasKV:
    """A layer's cache as the decoder sees it during a sparse pass (duck-types ``FullKVCache.fetch``).

    ``fetch`` writes this pass's positions into the layer's ``StaleKV`` store and returns the layer cache's keys
    followed by every canvas position's. ``offset`` is each query token's absolute position (``model.rope_at``
    reads it per token).
    """

    def __init__(self, cache: FullKVCache | WindowKVCache, stale: StaleKV, layer: int, positions: mx.array):
        self.cache, self.stale, self.layer, self.positions = cache, stale, layer, positions

    @property
    def offset(self) -> mx.array:
        return self.positions + self.cache.offset

    def fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        stores = self.stale.stores
        assert stores is not None  # ``StaleKV.views`` fills it before making any view
        store = stores[self.layer]
        if store is None:
            B, C = keys.shape[0], self.stale.canvas
            store = (
                mx.zeros((B, keys.shape[1], C, keys.shape[3]), keys.dtype),
                mx.zeros((B, values.shape[1], C, values.shape[3]), values.dtype),
            )
        idx = self.positions[:, None, :, None]
        k = mx.put_along_axis(store[0], mx.broadcast_to(idx, keys.shape), keys, axis=2)
        v = mx.put_along_axis(store[1], mx.broadcast_to(idx, values.shape), values, axis=2)
        stores[self.layer] = (k, v)
        return self.cache.fetch(k, v)


class Rows:
    """One layer's caches for a decoder pass over several requests (``Model.denoise_rows``). The pass's tokens are
    the requests' canvases side by side, [1, sum of B*S]; ``split`` cuts a projection back into each request's
    [B, S, ...] part, paired with the layer cache (or sparse view) and the padding mask it attends with."""

    def __init__(self, caches: list[Any], shapes: list[tuple[int, int]], masks: list[mx.array | None]):
        self.caches, self.shapes, self.masks = caches, shapes, masks

    def split(self, *arrays: mx.array) -> Iterator[tuple[tuple[mx.array, ...], Any, mx.array | None]]:
        start = 0
        for cache, (b, n), mask in zip(self.caches, self.shapes, self.masks):
            part = tuple(a[:, start : start + b * n].reshape(b, n, *a.shape[2:]) for a in arrays)
            yield part, cache, mask
            start += b * n
