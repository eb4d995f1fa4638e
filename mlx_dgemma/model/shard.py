"""Tensor-parallel DiffusionGemma over an ``mx.distributed`` group: each rank holds and loads only its part.

What is split (the scheme of mlx-lm's MoE models, e.g. ``qwen3_moe.shard``, and of transformers'
``base_model_tp_plan``):

* the routed experts: every expert's intermediate width (``gate_up_proj`` rows, ``down_proj`` columns);
  every rank routes every token and computes its slice of all chosen experts, then the ranks sum;
* the dense MLP the same way (``gate``/``up`` rows, ``down`` columns);
* the attention of the sliding layers by heads (q/k/v rows, o columns; each rank caches its own heads).

What stays whole on every rank: the attention of the global layers (2 key/value heads, keys = values:
the reference's plan leaves them unsplit), the router, the norms, the self-conditioning block and the
embedding, which is also the LM head (split by vocabulary, every pass would have to exchange the whole
canvas of logits: 256 x 262144 floats, 268 MB, against ~1.4 MB per layer for everything else).

Each layer then needs two sums over the ranks (one for sliding attention, one for the dense and expert
branches together). Quantized weights are split on quantization-group boundaries, so a split can be
uneven by one group (e.g. the released experts' 704 = 11 groups of 64: 6 and 5).

Weights are cut while still lazy (memory-mapped) and evaluated one tensor at a time, so a rank's peak is
its share plus one whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_dgemma.model.arrays import flatten
from mlx_dgemma.model.diffusion_gemma import Model, Whole
from mlx_dgemma.runtime.distributed import DistributedError, check_same

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Cut:
    """Keep ``ranges`` of a module's output rows (``"out"``) or input columns (``"in"``), in logical units."""

    side: str
    ranges: Ranges


class SumOverRanks(Whole):
    """A layer's hook (``DecoderLayer.sharding``): sums this rank's partial outputs over the group."""

    def __init__(self, group: mx.distributed.Group, split_attention: bool):
        self.group, self.split_attention = group, split_attention

    def attention(self, h: mx.array) -> mx.array:
        return mx.distributed.all_sum(h, group=self.group) if self.split_attention else h

    def feed_forward(self, dense: mx.array, moe: mx.array) -> tuple[mx.array, mx.array]:
        # One collective for both branches: half the latency of two, the same bytes.
        both = mx.distributed.all_sum(mx.concatenate([dense, moe], axis=-1), group=self.group)
        return both[..., : dense.shape[-1]], both[..., dense.shape[-1] :]


def _share(total: int, unit: int, n: int, r: int, what: str) -> tuple[int, int]:
    """Rank ``r``'s contiguous part of ``total`` split over ``n`` ranks in whole ``unit``s."""
    units = total // unit
    if units < n:
        raise DistributedError(
            f"cannot split this model over {n} ranks: its {what} ({total}) splits into at most {units} parts; "
            f"launch at most {units} ranks"
        )
    return r * units // n * unit, (r + 1) * units // n * unit


def _in_unit(module: nn.Module) -> int:
    """The granularity of a module's input columns: its quantization group, or 1."""
    return getattr(module, "group_size", 1) if "scales" in module else 1


def plan(model: Model, n: int, r: int) -> tuple[dict[str, Cut], dict[str, int]]:
    """Rank ``r`` of ``n``'s cuts (module path -> Cut) and new sizes (attribute path -> value).

    Raises ``DistributedError`` (identically on every rank) when the model cannot be split ``n`` ways.
    """
    args = model.args
    kv = args.num_key_value_heads
    if kv % n or args.num_attention_heads % n:
        ways = [d for d in range(1, kv + 1) if kv % d == 0 and args.num_attention_heads % d == 0]
        raise DistributedError(
            f"cannot split this model over {n} ranks: its {kv} key/value heads (sliding attention) split over "
            f"{', '.join(map(str, ways))} ranks; launch one of those"
        )
    cuts: dict[str, Cut] = {}
    sizes: dict[str, int] = {}
    for i, layer in enumerate(model.layers):
        p = f"model.decoder.layers.{i}"
        attn = layer.self_attn
        if attn.is_sliding:
            hq, hk, d = attn.n_heads // n, attn.n_kv_heads // n, attn.head_dim
            q, k = ((r * hq * d, (r + 1) * hq * d),), ((r * hk * d, (r + 1) * hk * d),)
            if (hq * d) % _in_unit(attn.o_proj):
                raise DistributedError(
                    f"cannot split this model over {n} ranks: {hq} heads of {d} do not fill "
                    f"whole quantization groups of o_proj; launch fewer ranks"
                )
            cuts.update(
                {
                    f"{p}.self_attn.q_proj": Cut("out", q),
                    f"{p}.self_attn.k_proj": Cut("out", k),
                    f"{p}.self_attn.v_proj": Cut("out", k),
                    f"{p}.self_attn.o_proj": Cut("in", q),
                }
            )
            sizes.update({f"{p}.self_attn.n_heads": hq, f"{p}.self_attn.n_kv_heads": hk})
        a, b = _share(args.intermediate_size, _in_unit(layer.mlp.down_proj), n, r, "dense MLP width")
        cuts.update(
            {
                f"{p}.mlp.gate_proj": Cut("out", ((a, b),)),
                f"{p}.mlp.up_proj": Cut("out", ((a, b),)),
                f"{p}.mlp.down_proj": Cut("in", ((a, b),)),
            }
        )
        width = args.moe_intermediate_size
        a, b = _share(width, _in_unit(layer.experts.down_proj), n, r, "expert width")
        cuts.update(
            {
                f"{p}.experts.gate_up_proj": Cut("out", ((a, b), (width + a, width + b))),
                f"{p}.experts.down_proj": Cut("in", ((a, b),)),
            }
        )
        sizes[f"{p}.experts.intermediate"] = b - a
    return cuts, sizes


def _slice(x: mx.array, axis: int, ranges: Ranges) -> mx.array:
    index = [slice(None)] * x.ndim
    parts = []
    for a, b in ranges:
        index[axis] = slice(a, b)
        parts.append(x[tuple(index)])
    # A copy, so that the whole (memory-mapped) tensor is not kept alive by a view of it.
    return mx.contiguous(parts[0]) if len(parts) == 1 else mx.concatenate(parts, axis=axis)


def _cut_param(module: nn.Module, name: str, x: mx.array, cut: Cut) -> mx.array:
    if cut.side == "out":
        return _slice(x, -2 if name != "bias" else -1, cut.ranges)
    if name == "bias":
        return x
    scale = 1.0
    if "scales" in module:  # quantized: weight columns pack 32 // bits inputs, scales/biases one per group
        scale = module.bits / 32 if name == "weight" else 1 / module.group_size
    return _slice(x, -1, tuple((int(a * scale), int(b * scale)) for a, b in cut.ranges))


def shard_weights(
    model: Model, weights: dict[str, mx.array], group: mx.distributed.Group, folder: Path
) -> dict[str, mx.array]:
    """Cut ``weights`` (full, lazy, checked against ``model``) to this rank's part and reshape ``model`` to match.

    Checks first that every rank holds the same checkpoint and mlx_dgemma version. Returns the rank's
    weights, evaluated one tensor at a time; ``model``'s sharded layers now sum over ``group``.
    """
    check_same(group, folder)
    cuts, sizes = plan(model, group.size(), group.rank())
    modules = dict(model.named_modules())
    out: dict[str, mx.array] = {}
    for key in sorted(weights):
        x = weights.pop(key)
        path, name = key.rsplit(".", 1)
        if path in cuts:
            x = _cut_param(modules[path], name, x, cuts[path])
        mx.eval(x)
        out[key] = x
    mx.clear_cache()  # the whole tensors read on the way: give their memory back
    model.update(tree_unflatten(list(out.items())))
    for attr, value in sizes.items():
        path, name = attr.rsplit(".", 1)
        setattr(modules[path], name, value)
    for layer in model.layers:
        layer.sharding = SumOverRanks(group, layer.self_attn.is_sliding)
    return out


def weight_bytes(model: Model) -> int:
    """Bytes of the parameters this rank holds."""
    return sum(v.nbytes for _, v in flatten(model.parameters()))
