"""DiffusionGemma in MLX: one set of transformer weights run two ways.

* ``encode``: causal over the prompt (and later over each committed canvas); writes the KV cache.
* ``denoise``: bidirectional over a canvas, reading the whole cache plus the canvas; writes nothing.

Parameter names follow the mlx-community / mlx-vlm conversions (``model.decoder.*``, fused expert
``gate_up_proj``), so those folders load as they are; ``sanitize`` maps the original HF checkpoint onto them.
Reference: transformers 5.23 ``models/diffusion_gemma/modeling_diffusion_gemma.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from mlx_dgemma.model import vision as V
from mlx_dgemma.model.cache import DiffusionCache, FullKVCache, Rows, StaleKV, WindowKVCache
from mlx_dgemma.model.config import ModelArgs


class RMSNormNoScale(nn.Module):
    """RMSNorm without a learned weight (v_norm, self-conditioning post-norm)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, None, self.eps)


class MLP(nn.Module):
    """Gated GELU(tanh) MLP: the dense branch of every layer, and the self-conditioning block."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Softmax over all experts (fp32), top-k, renormalise, then scale by each chosen expert's scale."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.top_k = args.top_k_experts
        self.root_size = args.hidden_size**-0.5
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        x = mx.fast.rms_norm(x, None, self.eps) * self.scale * self.root_size
        probs = mx.softmax(self.proj(x).astype(mx.float32), axis=-1)
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=self.top_k - 1, axis=-1)[..., : self.top_k])
        weights = mx.take_along_axis(probs, idx, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return idx, weights * self.per_expert_scale[idx]


class Experts(nn.Module):
    """Routed experts with fused gate/up weights ``[E, 2I, H]`` (gate first), via ``gather_mm``/``gather_qmm``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.intermediate = args.moe_intermediate_size
        self.gate_up_proj = SwitchLinear(
            args.hidden_size, 2 * self.intermediate, args.num_experts, bias=False
        )
        self.down_proj = SwitchLinear(self.intermediate, args.hidden_size, args.num_experts, bias=False)

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        y = self._by_expert(x, idx) if self._per_expert_matmuls() else self._gathered(x, idx)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)

    def _gathered(self, x: mx.array, idx: mx.array) -> mx.array:
        """``gather_mm``/``gather_qmm`` over all (token, expert) pairs: one fused kernel per projection."""
        x = mx.expand_dims(x, (-2, -3))
        # Grouping tokens by expert makes each expert's weights stream once (mlx-lm's SwitchGLU does the same).
        do_sort = idx.size >= 64
        order_idx, inv_order = idx, None
        if do_sort:
            x, order_idx, inv_order = _gather_sort(x, idx)
        gate_up = _switch(self.gate_up_proj, x, order_idx, do_sort)
        gate, up = gate_up[..., : self.intermediate], gate_up[..., self.intermediate :]
        y = _switch(self.down_proj, nn.gelu_approx(gate) * up, order_idx, do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv_order, idx.shape)
        return y.squeeze(-2)

    def _per_expert_matmuls(self) -> bool:
        """On the CPU backend, one BLAS matmul per expert beats ``gather_mm`` ~5x (measured at tenth scale);
        on a GPU ``gather_mm`` is the fused kernel to use. Quantized and adapted experts always gather."""
        mode = EXPERT_MATMULS
        if mode == "auto":
            mode = "per_expert" if mx.default_device() == mx.cpu else "gather"
        plain = type(self.gate_up_proj) is SwitchLinear and type(self.down_proj) is SwitchLinear
        return mode == "per_expert" and plain

    def _by_expert(self, x: mx.array, idx: mx.array) -> mx.array:
        """Sort (token, expert) pairs by expert and run each expert's tokens as one dense matmul.

        Needs the per-expert counts on the host (one sync per layer), which the CPU backend pays anyway.
        """
        k = idx.shape[-1]
        flat = idx.reshape(-1)
        order = mx.argsort(flat)
        counts = np.bincount(np.array(flat), minlength=self.gate_up_proj.weight.shape[0])
        xs = x.reshape(-1, x.shape[-1])[order // k]
        dtype = mx.float32  # the CPU has no fast half-precision matmul; weights are upcast per expert
        outs, start = [], 0
        for e in np.flatnonzero(counts):
            seg = xs[start : start + counts[e]].astype(dtype)
            gate_up = seg @ self.gate_up_proj.weight[e].astype(dtype).T
            gate, up = gate_up[:, : self.intermediate], gate_up[:, self.intermediate :]
            outs.append((nn.gelu_approx(gate) * up) @ self.down_proj.weight[e].astype(dtype).T)
            start += int(counts[e])
        y = mx.concatenate(outs, axis=0)[mx.argsort(order)]
        return y.reshape(*idx.shape, -1).astype(x.dtype)


# "auto": per-expert matmuls on the CPU backend, gather_mm on GPUs; "gather" / "per_expert" force a path.
EXPERT_MATMULS = "auto"


def _switch(layer: nn.Module, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
    """Apply a (possibly quantized) SwitchLinear; in float32 where the device only has float32 kernels."""
    if isinstance(layer, SwitchLinear) and layer.weight.dtype != mx.float32 and mx.default_device() == mx.cpu:
        # MLX's CPU gather_mm is float32-only (Metal has half-precision kernels): upcast there.
        w = layer.weight.astype(mx.float32).swapaxes(-1, -2)
        y = mx.gather_mm(x.astype(mx.float32), w, rhs_indices=idx, sorted_indices=sorted_indices)
        return y.astype(x.dtype)
    return layer(x, idx, sorted_indices=sorted_indices)


def softcap(logits: mx.array, cap: float) -> mx.array:
    """The final soft-cap ``tanh(x / cap) * cap`` (monotonic: the top-k of capped logits is the capped top-k)."""
    return mx.tanh(logits / cap) * cap


def rope_at(rope: nn.Module, x: mx.array, offset: int | mx.array) -> mx.array:
    """RoPE on ``x`` [B, H, L, D] from position ``offset``, or at each token's own position when ``offset`` is an
    int32 [B, L] array (fast decoding runs the decoder on scattered canvas positions: ``cache.CanvasKV``)."""
    if not isinstance(offset, mx.array) or offset.ndim < 2:
        return rope(x, offset=offset)
    B, H, L, D = x.shape
    # mx.fast.rope takes one offset per batch row: make every token a row of its own.
    y = rope(x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D), offset=offset.reshape(-1))
    return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)


class Attention(nn.Module):
    """Attention with q/k/v norms and scale 1.0. Full layers have no ``v_proj``: values are the raw keys."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.is_sliding = args.is_sliding(layer)
        self.head_dim, self.n_kv_heads = args.attention_shape(layer)
        self.n_heads = args.num_attention_heads
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        if self.is_sliding:
            self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.v_norm = RMSNormNoScale(eps)
        rope = args.rope_parameters["sliding_attention" if self.is_sliding else "full_attention"]
        self.rope = initialize_rope(self.head_dim, rope["rope_theta"], False, rope)

    def __call__(
        self, x: mx.array, cache: FullKVCache | WindowKVCache | Rows, mask: mx.array | str | None, write: bool
    ) -> mx.array:
        q, k, v = self._project(x)
        if isinstance(cache, Rows):  # several requests in one pass: each attends to its own cache
            parts = [self._attend(pq, pk, pv, c, m, write) for (pq, pk, pv), c, m in cache.split(q, k, v)]
            out = mx.concatenate([o.reshape(1, -1, o.shape[-1]) for o in parts], axis=1)
        else:
            out = self._attend(q, k, v, cache, mask, write)
        return self.o_proj(out)

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Queries, keys and values [B, L, heads, head_dim], normed (keys and values), before RoPE."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim) if self.is_sliding else k
        return q, self.k_norm(k), self.v_norm(v)

    def _attend(
        self,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        cache: FullKVCache | WindowKVCache,
        mask: mx.array | str | None,
        write: bool,
    ) -> mx.array:
        """Attention of ``q`` over the cache and ``k``/``v`` at the cache's positions: [B, L, heads * head_dim]."""
        B, L = q.shape[:2]
        offset = cache.offset
        q = rope_at(self.rope, q.transpose(0, 2, 1, 3), offset)
        k = rope_at(self.rope, k.transpose(0, 2, 1, 3), offset)
        v = v.transpose(0, 2, 1, 3)
        k, v = cache.update_and_fetch(k, v) if write else cache.fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)


class Whole:
    """A layer's outputs in one process are whole; ``mlx_dgemma.model.shard.SumOverRanks`` sums them over ranks."""

    def attention(self, h: mx.array) -> mx.array:
        return h

    def feed_forward(self, dense: mx.array, moe: mx.array) -> tuple[mx.array, mx.array]:
        return dense, moe


class DecoderLayer(nn.Module):
    """One transformer layer: attention, then a dense MLP and routed experts summed under four norms."""

    sharding: Whole = Whole()  # replaced per layer by mlx_dgemma.model.shard when split over several ranks

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        hidden, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(hidden, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(hidden, eps=eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(
        self,
        x: mx.array,
        cache: FullKVCache | WindowKVCache | Rows,
        mask: mx.array | str | None,
        write: bool,
        layer_scalar: mx.array,
    ) -> mx.array:
        h = self.self_attn(self.input_layernorm(x), cache, mask, write)
        x = x + self.post_attention_layernorm(self.sharding.attention(h))
        dense = self.mlp(self.pre_feedforward_layernorm(x))
        idx, weights = self.router(x)  # routes on the raw residual, not on a normed input
        moe = self.experts(self.pre_feedforward_layernorm_2(x), idx, weights)
        dense, moe = self.sharding.feed_forward(dense, moe)
        moe = self.post_feedforward_layernorm_2(moe)
        x = x + self.post_feedforward_layernorm(self.post_feedforward_layernorm_1(dense) + moe)
        return x * layer_scalar


class SelfConditioning(nn.Module):
    """Adds the previous step's soft prediction to the canvas embedding: ``post_norm(e + mlp(pre_norm(s)))``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.pre_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_norm = RMSNormNoScale(args.rms_norm_eps)
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, embeds: mx.array, soft: mx.array | None) -> mx.array:
        # With no signal (first step) the reference feeds zeros, and the block maps zeros to zeros exactly.
        if soft is not None:
            s = self.pre_norm(soft)
            embeds = embeds + self.down_proj(nn.gelu_approx(self.gate_proj(s)) * self.up_proj(s))
        return self.post_norm(embeds)


class Decoder(nn.Module):
    """The shared weights: embedding (also the tied LM head), layers, final norm, self-conditioning."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)
        self.embed_scale = args.hidden_size**0.5

    def embed(self, ids: mx.array) -> mx.array:
        h = self.embed_tokens(ids)
        # The reference rounds sqrt(hidden) to the weight dtype before scaling.
        return h * mx.array(self.embed_scale, dtype=h.dtype)

    def soft_embed(self, probs: mx.array) -> mx.array:
        """``probs @ embedding * sqrt(hidden)``: the expected embedding under a distribution over the vocabulary."""
        e = self.embed_tokens
        if isinstance(e, nn.QuantizedEmbedding):
            h = mx.quantized_matmul(
                probs,
                e.weight,
                e.scales,
                e.biases,
                transpose=False,
                group_size=e.group_size,
                bits=e.bits,
                mode=e.mode,
            )
        else:
            h = probs.astype(e.weight.dtype) @ e.weight
        return h * mx.array(self.embed_scale, dtype=h.dtype)


class EncoderLayerScalars(nn.Module):
    """The one tensor the encoder does not share with the decoder: its per-layer output scale."""

    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class EncoderLanguageModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [EncoderLayerScalars() for _ in range(args.num_hidden_layers)]


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs, vision: V.VisionArgs | None = None):
        super().__init__()
        self.language_model = EncoderLanguageModel(args)
        if vision is not None:  # multimodal checkpoints: Gemma 4's vision tower and its embedder
            self.vision_tower = V.VisionTower(vision)
            self.embed_vision = V.MultimodalEmbedder(vision, args.hidden_size)


class DiffusionGemmaModel(nn.Module):
    def __init__(self, args: ModelArgs, vision: V.VisionArgs | None = None):
        super().__init__()
        self.encoder = Encoder(args, vision)
        self.decoder = Decoder(args)


class Model(nn.Module):
    """DiffusionGemma's text model: ``encode`` a prompt into a cache, ``denoise`` canvases against it."""

    def __init__(
        self,
        args: ModelArgs,
        generation_config: dict | None = None,
        vision: V.VisionArgs | None = None,
    ):
        super().__init__()
        self.args = args
        self.vision_args = vision  # None: text only (no vision tower in the checkpoint)
        self.model = DiffusionGemmaModel(args, vision)
        # A read-only mapping, kept out of the module tree (plain dicts there are treated as submodules).
        self.generation_config = MappingProxyType(dict(generation_config or {}))

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.decoder.layers

    def make_cache(self) -> DiffusionCache:
        """Empty per-layer caches: a window cache for sliding layers, a growing one for full layers."""
        a = self.args
        return DiffusionCache(
            [
                WindowKVCache(a.sliding_window) if a.is_sliding(i) else FullKVCache()
                for i in range(len(self.layers))
            ]
        )

    def encode(
        self,
        input_ids: mx.array,
        cache: DiffusionCache,
        mask: mx.array | None = None,
        pixel_values: mx.array | None = None,
        image_position_ids: mx.array | None = None,
        mm_token_type_ids: mx.array | None = None,
        image_features: mx.array | None = None,
    ) -> mx.array:
        """Run the causal encoder over ``input_ids`` [B, L], appending their keys/values to ``cache``.

        ``mask`` [B, L] marks real tokens (1) and left padding (0) of batched prompts. Positions continue after
        what the cache holds, shared by all rows, as in the reference. Returns the final hidden states; the
        hidden states after the layers in ``cache.capture`` are appended to ``cache.features`` (a drafter's).

        Images, under the names of the reference's processor: ``pixel_values`` [I, patches, 3 p^2] and
        ``image_position_ids`` [I, patches, 2] give the features that replace the image placeholder tokens in
        order (or pass ``image_features`` from :meth:`get_image_features`); ``mm_token_type_ids`` [B, L] (or the
        whole sequence's) lets tokens of one image attend both ways when the config sets
        ``use_bidirectional_attention: "vision"``.
        """
        decoder = self.model.decoder
        B, L = input_ids.shape
        valid = self._valid_keys(cache, mask, B, L)
        blocks = None
        if self.vision_args is not None and self.vision_args.bidirectional:
            blocks = V.record_vision_positions(cache, mm_token_type_ids, B, L)
        masks = {kind: self._encoder_mask(cache, kind, L, valid, blocks) for kind in ("sliding", "full")}
        h = decoder.embed(input_ids)
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, image_position_ids)
        if image_features is not None:
            h = V.scatter_image_features(h, input_ids, image_features, self._vision().image_token_id)
        scalars = self.model.encoder.language_model.layers
        captured = []
        for i, (layer, scalar, c) in enumerate(zip(decoder.layers, scalars, cache)):
            mask_l = masks["sliding" if layer.self_attn.is_sliding else "full"]
            h = layer(h, c, mask_l, write=True, layer_scalar=scalar.layer_scalar)
            if i in cache.capture:
                captured.append(h)
        if captured:
            cache.features.append(mx.concatenate(captured, axis=-1))
        cache.extend_valid(mask, B, L)
        return decoder.norm(h)

    def denoise(
        self,
        canvas: mx.array,
        cache: DiffusionCache,
        self_conditioning_logits: mx.array | None = None,
        *,
        soft: mx.array | None = None,
        positions: mx.array | None = None,
        stale: StaleKV | None = None,
        capped: bool = True,
    ) -> mx.array:
        """Logits [B, S, V] (float32, soft-capped) for ``canvas`` [B, S], attending to the cache and the canvas.

        ``self_conditioning_logits`` are the previous step's processed logits (``None`` on the first step); or
        pass their soft embedding [B, S, H] as ``soft`` (fast mode builds it from the top-k). The cache is read,
        never written. ``capped=False``: the raw float32 logits, before the soft-cap.

        Fast mode's sparse pass: ``canvas`` holds only the tokens at canvas ``positions`` [B, S]; the other
        positions of the ``stale.canvas``-long canvas are seen through ``stale`` (their keys/values from the last
        pass that computed them), and this pass's are written into it.
        """
        decoder = self.model.decoder
        if self_conditioning_logits is not None:
            soft = self._soft(self_conditioning_logits)
        h = decoder.self_conditioning(decoder.embed(canvas), soft)
        masks, layer_caches = self._decoder_inputs(canvas, cache, positions, stale)
        for layer, c in zip(decoder.layers, layer_caches):
            mask_l = masks["sliding" if layer.self_attn.is_sliding else "full"]
            h = layer(h, c, mask_l, write=False, layer_scalar=layer.layer_scalar)
        raw = decoder.embed_tokens.as_linear(decoder.norm(h)).astype(mx.float32)
        return softcap(raw, self.args.final_logit_softcapping) if capped else raw

    def denoise_rows(self, passes: Sequence[Any]) -> list[mx.array]:
        """One decoder pass over several requests' canvases: each of ``passes`` holds ``denoise``'s arguments as
        attributes (``decoding.canvas.Pass``: its own cache, canvas positions, self-conditioning). Their tokens
        share every projection, expert and the LM head (on a Mac the weights stream once for all of them); each
        request attends only to its own cache and canvas, at its own positions. Returns each one's logits."""
        if len(passes) == 1:
            return [passes[0].run(self)]
        decoder = self.model.decoder
        shapes = [tuple(p.canvas.shape) for p in passes]
        embeds = [decoder.embed(p.canvas).reshape(1, b * n, -1) for p, (b, n) in zip(passes, shapes)]
        softs = [
            self._soft(p.self_conditioning_logits) if p.self_conditioning_logits is not None else p.soft
            for p in passes
        ]
        soft = None
        if any(x is not None for x in softs):  # zeros for a first step: the block maps them to zero exactly
            dtype = next(x.dtype for x in softs if x is not None)
            soft = mx.concatenate(
                [
                    (x if x is not None else mx.zeros((*shape, e.shape[-1]), dtype)).reshape(
                        1, -1, e.shape[-1]
                    )
                    for x, e, shape in zip(softs, embeds, shapes)
                ],
                axis=1,
            )
        h = decoder.self_conditioning(mx.concatenate(embeds, axis=1), soft)
        inputs = [self._decoder_inputs(p.canvas, p.cache, p.positions, p.stale) for p in passes]
        for i, layer in enumerate(decoder.layers):
            kind = "sliding" if layer.self_attn.is_sliding else "full"
            rows = Rows([caches[i] for _, caches in inputs], shapes, [masks[kind] for masks, _ in inputs])
            h = layer(h, rows, None, write=False, layer_scalar=layer.layer_scalar)
        raw = decoder.embed_tokens.as_linear(decoder.norm(h)).astype(mx.float32)
        out, start = [], 0
        for p, (b, n) in zip(passes, shapes):
            part = raw[:, start : start + b * n].reshape(b, n, -1)
            out.append(softcap(part, self.args.final_logit_softcapping) if p.capped else part)
            start += b * n
        return out

    def _soft(self, self_conditioning_logits: mx.array) -> mx.array:
        probs = mx.softmax(self_conditioning_logits.astype(mx.float32), axis=-1)
        return self.model.decoder.soft_embed(probs)

    def _decoder_inputs(
        self, canvas: mx.array, cache: DiffusionCache, positions: mx.array | None, stale: StaleKV | None
    ) -> tuple[dict[str, Any], Sequence[Any]]:
        """The padding masks of a pass (per layer kind) and the layer caches it reads (a sparse pass's views)."""
        B = canvas.shape[0]

        def masks(C: int) -> dict[str, Any]:
            return {kind: self._decoder_mask(cache, kind, B, C) for kind in ("sliding", "full")}

        if positions is None:
            return masks(canvas.shape[1]), cache
        assert stale is not None  # a sparse pass sees the rest of the canvas through ``stale`` (``denoise``)
        return masks(stale.canvas), stale.views(cache, positions)

    def _vision(self) -> V.VisionArgs:
        if self.vision_args is None:
            raise V.GenerationError(
                "this checkpoint has no vision tower, so it cannot read images: use a multimodal checkpoint "
                "(e.g. google/diffusiongemma-26B-A4B-it, or one converted without --drop-vision)"
            )
        return self.vision_args

    def get_image_features(self, pixel_values: mx.array, image_position_ids: mx.array | None) -> mx.array:
        """Soft tokens of the images, projected into the text model's width: [sum of soft tokens, hidden]."""
        vision = self._vision()
        if image_position_ids is None:
            raise V.GenerationError(
                "pixel_values need image_position_ids: pass the image processor's output as it is"
            )
        encoder = self.model.encoder
        positions = mx.array(image_position_ids).astype(mx.int32)
        V.check_positions(positions, vision)
        return encoder.embed_vision(encoder.vision_tower(mx.array(pixel_values), positions))

    def logits(self, h: mx.array) -> mx.array:
        """Tied LM head in float32, soft-capped as the reference does."""
        return softcap(
            self.model.decoder.embed_tokens.as_linear(h).astype(mx.float32), self.args.final_logit_softcapping
        )

    # -- masks -------------------------------------------------------------------------------------------

    def _first_cache(self, cache: DiffusionCache, kind: str) -> FullKVCache | WindowKVCache | None:
        want_window = kind == "sliding"
        return next((c for c in cache if isinstance(c, WindowKVCache) == want_window), None)

    @staticmethod
    def _stored(c: FullKVCache | WindowKVCache) -> int:
        return c.stored if isinstance(c, WindowKVCache) else c.offset

    def _valid_keys(self, cache: DiffusionCache, mask: mx.array | None, B: int, L: int) -> mx.array | None:
        """Validity of every absolute position up to the end of the new tokens, or None if all are real."""
        if mask is None and cache.valid is None:
            return None
        old = cache.valid if cache.valid is not None else mx.ones((B, cache.offset), dtype=mx.bool_)
        new = mx.ones((B, L), dtype=mx.bool_) if mask is None else mask.astype(mx.bool_)
        return mx.concatenate([old, new], axis=1)

    def _encoder_mask(
        self, cache: DiffusionCache, kind: str, L: int, valid: mx.array | None, blocks: mx.array | None = None
    ):
        c = self._first_cache(cache, kind)
        if c is None:
            return None
        offset, stored = c.offset, self._stored(c)
        window = self.args.sliding_window if kind == "sliding" else None
        # Only the oldest cached keys can leave a query's window; without padding plain causal suffices.
        if blocks is None and valid is None and (window is None or stored + L <= window):
            return "causal" if L > 1 else None
        q = mx.arange(offset, offset + L)[:, None]
        k = mx.arange(offset - stored, offset + L)[None, :]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
        if blocks is not None:  # the reference ORs the block overlay in before the padding mask
            allowed = V.or_same_block(allowed, blocks, offset, stored, L)
        if valid is not None:
            # A padding query would see no key at all; letting it see itself keeps its (unused) row finite.
            allowed = (allowed & valid[:, None, None, offset - stored :]) | (k == q)
        return allowed

    def _decoder_mask(self, cache: DiffusionCache, kind: str, B: int, C: int):
        c = self._first_cache(cache, kind)
        if c is None or cache.valid is None:
            return None  # bidirectional over everything stored plus the canvas
        stored = self._stored(c)
        keys = mx.concatenate(
            [cache.valid[:, cache.offset - stored :], mx.ones((B, C), dtype=mx.bool_)], axis=1
        )
        return keys[:, None, None, :]

    # -- checkpoint mapping ---------------------------------------------------------------------------------

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint keys (original HF or mlx-community layout) onto this module's parameter names.

        The HF checkpoint stores the tied encoder/decoder weights once (either side), the LM head tied to the
        embedding, the vision tower (kept when this model has one) and ``layer_scalar`` buffers per side.
        """
        out: dict[str, mx.array] = {}
        enc = "model.encoder.language_model."
        for key, value in weights.items():
            if "rotary_emb" in key:
                continue
            if key.startswith(V.VISION_PREFIXES):
                if self.vision_args is not None and V.keep_vision_key(key, self.vision_args):
                    out[key] = value
                continue
            if key == "lm_head.weight":
                continue
            if key.startswith(enc) and not key.endswith(".layer_scalar"):
                # A tied weight stored under the encoder's name: it is the decoder's too.
                key = "model.decoder." + key[len(enc) :]
                if key in weights:
                    continue
            if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                key += ".weight"
            out[key] = value
        return out
