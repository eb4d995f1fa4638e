"""Gradient checkpointing (``--grad-checkpoint``): each layer's activations are recomputed in the backward pass.

The same idea as mlx-lm's ``tuner.trainer.grad_checkpoint`` (``mx.checkpoint`` around a layer's call, with its
trainable parameters passed in so that their gradients flow), but per model instance rather than by patching the
layer class for every model in the process.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn


def checkpoint_layers(model: Any) -> Any:
    """Make every layer of ``model.layers`` recompute its activations in the backward pass; returns ``model``.

    Loss and gradients are unchanged; peak memory drops to about one layer's activations.
    """
    for layer in model.layers:
        cls: type[nn.Module] = type(layer)
        if not getattr(cls, "_checkpointed", False):
            layer.__class__ = _checkpointed(cls)
    return model


@cache
def _checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose call runs under ``mx.checkpoint``."""

    def __call__(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        # Objects the layer reads and changes (its KV cache) hold arrays the gradient must flow through: they go
        # in and out of the checkpoint explicitly (arrays it only captured would get no gradient), and the
        # recomputation starts from the state the first call saw (or it would append its keys twice).
        objects = [
            a
            for a in (*args, *kwargs.values())
            if hasattr(a, "__dict__") and not isinstance(a, (mx.array, nn.Module))
        ]
        before = [dict(vars(o)) for o in objects]

        def inner(params: Any, arrays: list[dict[str, mx.array]], *args: Any, **kwargs: Any) -> Any:
            for obj, state, given in zip(objects, before, arrays):
                vars(obj).update(state)
                vars(obj).update(given)
            self.update(params)  # the recomputation must see the parameters the gradient is taken for
            return cls.__call__(self, *args, **kwargs), [_arrays(o) for o in objects]

        out, after = mx.checkpoint(inner)(
            self.trainable_parameters(), [_arrays(o) for o in objects], *args, **kwargs
        )
        for obj, state in zip(objects, after):
            vars(obj).update(state)
        return out

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_checkpointed": True})


def _arrays(obj: Any) -> dict[str, mx.array]:
    return {k: v for k, v in vars(obj).items() if isinstance(v, mx.array)}
