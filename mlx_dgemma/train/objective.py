"""DiffusionGemma's block-diffusion training objective, in MLX.

Public sources (the released model ships no training code; transformers 5.23 has no loss for it):

* Hugging Face TRL, ``examples/scripts/sft_diffusion_gemma.py`` (``DiffusionGemmaSFTTrainer.compute_loss``), written
  against transformers PR #46568 "Make DiffusionGemma trainable" (encoder hidden states, ``self_conditioning_mask``).
* NVIDIA NeMo AutoModel, guide "Fine-Tuning DiffusionGemma" and ``components/loss/dllm_loss.py``
  (``BlockDiffusionCrossEntropyLoss``, ``encoder_ar_loss``); NeMo Automodel PR #3550 states the same recipe.

Per example and step, as both describe it:

1. One answer canvas ``k`` is picked uniformly among the ``ceil(len(answer) / C)`` canvases of the answer.
2. The encoder runs causally, once, over the whole clean sequence ``prompt + answer``. Because it is causal, its
   keys/values for ``prompt + answer[:k*C]`` are exactly what block-by-block inference holds before canvas ``k``
   (sliding layers: the last ``sliding_window - 1`` of them, as ``WindowKVCache`` keeps); the decoder reads only
   that prefix of the cache, and its canvas positions continue after it.
3. The clean canvas is ``answer[k*C:(k+1)*C]``, filled up to ``C`` with EOS past the answer's end (the answer
   itself ends with the chat template's end-of-turn token). Every canvas position is supervised.
4. Corruption: ``t ~ U(eps, 1)`` per example (``eps = 1e-3``); every canvas position is independently replaced,
   with probability ``t``, by a token drawn uniformly from the vocabulary. There is no mask token: this is the
   noise the sampler starts from.
5. Self-conditioning, per example with probability 0.5: a first decoder pass without it, whose logits (raw, not
   temperature-scaled, as in TRL) are ``stop_gradient``-ed and fed as ``self_conditioning_logits`` to the second
   pass; the loss is on the second pass. Other examples get one pass with no signal.
6. Loss: mean cross-entropy over all canvas positions, corrupted and clean alike, with **no 1/t weighting** (NeMo:
   "the uniform corruption kernel has a flat ELBO"; TRL: "plain mean cross-entropy"), plus
   ``encoder_loss_weight`` (default 1.0) times the encoder's next-token cross-entropy over every pair of real
   tokens of the clean sequence, prompt included (encoder hidden states → tied, soft-capped LM head).
   ``mask_prompt`` (``--mask-prompt``, mlx-lm's flag) keeps only the pairs whose next token is an answer token:
   the prompt's language-modelling term is dropped, and the diffusion term (answer canvases only) is unchanged.

Where we chose: TRL runs the no-gradient first pass for every example and zeroes the signal of those not
self-conditioned; we run it only for the self-conditioned rows (same loss, less work). The EOS fill is not part of
the encoder's sequence (inference stops at the first EOS, so the encoder never reads it). Rows of a batch are
laid out so that every row's decoder prefix ends at the same position (see :func:`make_batch`); positions are then
shared by the rows, as in batched inference, which RoPE makes equivalent to per-row positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_dgemma.errors import TrainError
from mlx_dgemma.model.cache import DiffusionCache, FullKVCache, WindowKVCache
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.train.data import Example, num_canvases


@dataclass(frozen=True)
class ObjectiveConfig:
    """Knobs of the objective; defaults are the public recipe's."""

    eps: float = 1e-3  # t ~ U(eps, 1): no example is left uncorrupted
    self_conditioning_p: float = 0.5
    encoder_loss_weight: float = 1.0
    mask_prompt: bool = False  # the encoder's next-token loss on answer tokens only

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise TrainError(f"eps must be in (0, 1) (got {self.eps})")
        if not 0.0 <= self.self_conditioning_p <= 1.0:
            raise TrainError(
                f"the self-conditioning probability must be in [0, 1] (got {self.self_conditioning_p})"
            )
        if not (0.0 <= self.encoder_loss_weight < float("inf")):
            raise TrainError(
                f"the encoder loss weight must be a number >= 0 (got {self.encoder_loss_weight})"
            )


@dataclass
class Batch:
    """A micro-batch laid out for one encoder pass.

    Row ``b`` of ``tokens`` is ``[left pad | prompt + answer[:k*C] | answer[k*C:] | right pad]`` with every
    row's prefix ending at column ``prefix``; the decoder reads the cache up to there.
    """

    tokens: mx.array  # [B, S] int32, clean
    valid: np.ndarray  # [B, S] bool: real tokens
    prefix: int  # where the chosen canvas starts, the same for every row
    targets: mx.array  # [B, C] int32: the clean canvas, EOS-filled
    canvas_index: list[int]  # the canvas k chosen in each row
    answer: np.ndarray | None = None  # [B, S] bool: answer tokens (not prompt, not padding)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens the step trains on: real encoder tokens plus canvas positions."""
        return int(self.valid.sum()) + self.targets.size


@dataclass
class Noise:
    """The random part of one step: the corrupted canvas and who is self-conditioned."""

    canvas: mx.array  # [B, C] int32: the decoder's input
    t: np.ndarray  # [B] corruption level of each row
    self_condition: np.ndarray  # [B] bool


def choose_canvases(examples: Sequence[Example], canvas_length: int, rng: np.random.Generator) -> list[int]:
    """One canvas index per example, uniform over that example's answer canvases."""
    return [int(rng.integers(num_canvases(len(ex.answer), canvas_length))) for ex in examples]


def make_batch(
    examples: Sequence[Example], canvas_index: Sequence[int], canvas_length: int, pad_id: int, fill_id: int
) -> Batch:
    """Lay out ``examples`` so that each row's canvas ``canvas_index[b]`` starts at the same column."""
    C = canvas_length
    heads = [ex.prompt + ex.answer[: k * C] for ex, k in zip(examples, canvas_index)]
    tails = [ex.answer[k * C :] for ex, k in zip(examples, canvas_index)]
    prefix, rest = max(map(len, heads)), max(map(len, tails))
    tokens = np.full((len(examples), prefix + rest), pad_id, dtype=np.int32)
    valid = np.zeros(tokens.shape, dtype=bool)
    answer = np.zeros(tokens.shape, dtype=bool)
    targets = np.full((len(examples), C), fill_id, dtype=np.int32)
    for b, (head, tail) in enumerate(zip(heads, tails)):
        tokens[b, prefix - len(head) : prefix + len(tail)] = head + tail
        valid[b, prefix - len(head) : prefix + len(tail)] = True
        answer[b, prefix - len(head) + len(examples[b].prompt) : prefix + len(tail)] = True
        targets[b, : min(C, len(tail))] = tail[:C]
    return Batch(mx.array(tokens), valid, prefix, mx.array(targets), list(canvas_index), answer)


def split_batch(
    examples: Sequence[Example], canvas_index: Sequence[int], canvas_length: int, pad_id: int, fill_id: int
) -> list[Batch]:
    """``make_batch`` once per distinct canvas index: the same rows, laid out in fewer columns.

    One layout aligns every row's prefix; rows whose canvases differ then pad each other (a row training its
    second canvas has a prefix a canvas longer, a row training its first has a tail a canvas longer): about half
    the encoder's positions are padding on two-canvas answers. Apart, each part pads only to its own rows.
    """
    parts = []
    for k in sorted(set(canvas_index)):
        rows = [i for i, c in enumerate(canvas_index) if c == k]
        parts.append(make_batch([examples[i] for i in rows], [k] * len(rows), canvas_length, pad_id, fill_id))
    return parts


def sample_noise(
    targets: np.ndarray, vocab_size: int, rng: np.random.Generator, cfg: ObjectiveConfig
) -> Noise:
    """Corrupt each row at its own level ``t ~ U(eps, 1)`` with uniform random tokens; draw self-conditioning."""
    B: int
    C: int
    B, C = targets.shape
    t = cfg.eps + (1.0 - cfg.eps) * rng.random(B)
    replace = rng.random((B, C)) < t[:, None]
    random_tokens = rng.integers(0, vocab_size, size=(B, C))
    canvas = np.where(replace, random_tokens, targets).astype(np.int32)
    self_condition = rng.random(B) < cfg.self_conditioning_p
    return Noise(mx.array(canvas), t, self_condition)


# -- the cache the training pass writes, and the views the decoder reads ---------------------------------------


class GrowingKVCache(FullKVCache):
    """A full-attention cache that concatenates instead of pre-allocating: simple to differentiate."""

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = self.fetch(keys, values)
        self.offset += keys.shape[2]
        return self.keys, self.values

    def fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.keys is None:
            return keys, values
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)


def keep_all_cache(model: Model) -> DiffusionCache:
    """Per-layer caches that keep every position (sliding layers too), so any prefix can be read back."""
    everything = 1 << 30  # a window no sequence reaches: the encoder's masks still apply the real window
    return DiffusionCache(
        [
            WindowKVCache(everything) if model.args.is_sliding(i) else GrowingKVCache()
            for i in range(len(model.layers))
        ]
    )


def prefix_view(
    model: Model, cache: DiffusionCache, batch: Batch, rows: np.ndarray | None = None
) -> DiffusionCache:
    """What inference's cache would hold after encoding ``prompt + answer[:k*C]`` of each of ``rows`` (all if None).

    Read-only: the decoder never writes it.
    """
    T, keep = batch.prefix, model.args.sliding_window - 1
    index = None if rows is None else mx.array(rows.astype(np.int32))
    layers: list[FullKVCache | WindowKVCache] = []
    for c in cache:
        keys, values = (c.keys, c.values) if index is None else (c.keys[index], c.values[index])
        if isinstance(c, GrowingKVCache):
            view: FullKVCache | WindowKVCache = GrowingKVCache()
            view.keys, view.values = keys[:, :, :T], values[:, :, :T]
        else:
            view = WindowKVCache(keep + 1)
            start = max(0, T - keep)
            view.keys, view.values = keys[:, :, start:T], values[:, :, start:T]
        view.offset = T
        layers.append(view)
    out = DiffusionCache(layers)
    valid = batch.valid[:, :T] if rows is None else batch.valid[rows, :T]
    if not valid.all():
        out.valid = mx.array(valid)
    return out


# -- the loss --------------------------------------------------------------------------------------------------


def denoise_self_conditioned(model: Model, canvas: mx.array, cache: DiffusionCache) -> mx.array:
    """Two decoder passes: the second conditioned on the first's logits, through which no gradient flows."""
    first = mx.stop_gradient(model.denoise(canvas, cache))
    return model.denoise(canvas, cache, first)


def encoder_loss(
    model: Model, hidden: mx.array, tokens: mx.array, valid: np.ndarray, targets: np.ndarray | None = None
) -> mx.array:
    """Mean next-token cross-entropy of the encoder over every pair of real tokens (whose next token is in
    ``targets``, when given: the answer, for ``mask_prompt``)."""
    total, count = _encoder_sum(model, hidden, tokens, valid, targets)
    return total / max(count, 1)


def _encoder_sum(
    model: Model, hidden: mx.array, tokens: mx.array, valid: np.ndarray, targets: np.ndarray | None = None
) -> tuple[mx.array, int]:
    """``encoder_loss``'s sum and the number of pairs it is over."""
    ce = nn.losses.cross_entropy(model.logits(hidden[:, :-1]), tokens[:, 1:])
    pairs = valid[:, :-1] & valid[:, 1:]
    if targets is not None:
        pairs = pairs & targets[:, 1:]
    if pairs.all():
        return ce.sum(), int(pairs.size)
    return (ce * mx.array(pairs)).sum(), int(pairs.sum())


def _diffusion_sum(model: Model, cache: DiffusionCache, batch: Batch, noise: Noise) -> mx.array:
    """Summed cross-entropy of the decoder's logits against the clean canvas, over every canvas position."""
    total = mx.array(0.0)
    for with_sc in (False, True):
        picked = np.flatnonzero(noise.self_condition == with_sc)
        if picked.size == 0:
            continue
        rows = None if picked.size == batch.size else picked
        view = prefix_view(model, cache, batch, rows)
        index = None if rows is None else mx.array(rows.astype(np.int32))
        canvas = noise.canvas if index is None else noise.canvas[index]
        targets = batch.targets if index is None else batch.targets[index]
        logits = denoise_self_conditioned(model, canvas, view) if with_sc else model.denoise(canvas, view)
        total = total + nn.losses.cross_entropy(logits, targets).sum()
    return total


def training_loss(
    model: Model,
    batch: Batch | Sequence[Batch],
    noise: Noise | Sequence[Noise],
    encoder_loss_weight: float = 1.0,
    mask_prompt: bool = False,
) -> tuple[mx.array, mx.array, mx.array]:
    """``(total, diffusion, encoder)`` losses of one micro-batch; differentiable in the model's trainable weights.

    A micro-batch may come in parts (``split_batch``: one layout per canvas index), each with its noise; the
    losses are then the means over all the parts' positions and token pairs, as if they were one batch.
    ``mask_prompt``: the encoder's next-token loss covers the answer's tokens only, not the prompt's.

    The cache is built inside, so gradients flow from the decoder's loss through the cached keys/values into the
    encoder pass.
    """
    batches = [batch] if isinstance(batch, Batch) else batch
    noises = [noise] if isinstance(noise, Noise) else noise
    parts = list(zip(batches, noises, strict=True))
    if mask_prompt and any(b.answer is None for b, _ in parts):
        raise ValueError("mask_prompt needs a batch from make_batch (it marks the answer tokens)")
    diffusion, encoder, positions, pairs = mx.array(0.0), mx.array(0.0), 0, 0
    for b, n in parts:
        cache = keep_all_cache(model)
        valid = None if b.valid.all() else mx.array(b.valid)
        hidden = model.encode(b.tokens, cache, valid)
        diffusion = diffusion + _diffusion_sum(model, cache, b, n)
        positions += b.targets.size
        if encoder_loss_weight != 0:
            total, count = _encoder_sum(model, hidden, b.tokens, b.valid, b.answer if mask_prompt else None)
            encoder, pairs = encoder + total, pairs + count
    diffusion = diffusion / positions
    if encoder_loss_weight == 0:
        return diffusion, diffusion, mx.array(0.0)
    encoder = encoder / max(pairs, 1)
    return diffusion + encoder_loss_weight * encoder, diffusion, encoder
