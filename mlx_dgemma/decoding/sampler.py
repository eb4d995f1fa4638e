"""The DiffusionGemma entropy-bound sampler, one denoising step at a time, in MLX.

A functional port of the per-step pieces of ``transformers``' ``generation_diffusion_gemma.py``:
``LinearTemperatureScheduleLogitsProcessor`` (:func:`temperature`, :func:`process_logits`),
``EntropyBoundSampler`` (:func:`initial_canvas`, :func:`accept_mask`, :func:`renoise`),
``StableAndConfidentStoppingCriteria`` (:func:`init_history`, :func:`is_stable_and_confident`),
``DiffusionGemmaGenerationMixin._denoising_step`` (:func:`denoise_step`) and ``_finalize_canvas``
(:func:`finalize_canvas`). The reference keeps state in objects (the accepted mask, the argmax history);
here every piece of state is an argument and a return value.

Every function is pure on ``mx.array`` s, never reads a value back to the host and takes its randomness
from an explicit ``mx.random`` key, so a whole step can be wrapped in ``mx.compile``
(``mx.compile(functools.partial(denoise_step, cfg=cfg))``; pass ``step`` as an ``mx.array`` so that one
trace serves every step).

Known, documented differences from the reference (both only matter at exact ties / ulp-level boundaries):

* Equal entropies: ``torch.sort`` and ``mx.argsort`` may order ties differently. Acceptance can only differ
  when tied entropies straddle the cut-off, which float logits practically never produce.
* ``torch.cumsum`` on CPU accumulates float32 in double; ``mx.cumsum`` accumulates in float32, and the
  entropies themselves may differ from ``torch.distributions.Categorical`` by a few ulps. A position whose
  ``sum - max`` lies within ~1e-6 of ``entropy_bound`` (or a mean entropy within ~1e-6 of
  ``confidence_threshold``) may be decided differently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import mlx.core as mx

from mlx_dgemma.errors import SamplerConfigError

# torch.distributions.Categorical clamps log-probabilities to this before multiplying by the probabilities,
# so that a -inf logit contributes 0 * finite = 0 to the entropy instead of 0 * -inf = nan.
_F32_MIN = -3.4028234663852886e38

_SAMPLER_CLS_NAME = "EntropyBoundSamplerConfig"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings. Defaults are those of the released ``generation_config.json`` (and of the reference's
    ``DiffusionGemmaGenerationConfig._get_default_generation_params``).

    Validity follows ``DiffusionGemmaGenerationConfig.validate`` / ``EntropyBoundSamplerConfig``:
    ``max_denoising_steps > 0``, ``0 <= t_min < t_max``, ``entropy_bound > 0``, ``stability_threshold >= 0``,
    ``confidence_threshold > 0``. ``t_min == 0`` is valid: the step counter never reaches 0, so the
    temperature stays positive.
    """

    max_denoising_steps: int = 48
    t_max: float = 0.8
    t_min: float = 0.4
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SamplerConfigError` (a ``ValueError``) with one line naming the field and the fix."""

        def fail(msg: str) -> NoReturn:
            raise SamplerConfigError(f"SamplerConfig.{msg}")

        n = self.max_denoising_steps
        if not _is_int(n) or n <= 0:
            fail(f"max_denoising_steps must be a positive integer (got {n!r}); use e.g. 48")
        for name in ("t_min", "t_max", "entropy_bound", "confidence_threshold"):
            if not _is_real(getattr(self, name)):
                fail(f"{name} must be a finite number (got {getattr(self, name)!r})")
        if self.t_min < 0:
            fail(f"t_min must be >= 0 (got {self.t_min!r}); use e.g. 0.4")
        if self.t_max <= self.t_min:
            fail(
                f"t_max must be greater than t_min (got t_max={self.t_max!r}, t_min={self.t_min!r}); "
                "raise t_max or lower t_min"
            )
        if self.entropy_bound <= 0:
            fail(f"entropy_bound must be > 0 (got {self.entropy_bound!r}); use e.g. 0.1")
        s = self.stability_threshold
        if not _is_int(s) or s < 0:
            fail(f"stability_threshold must be an integer >= 0 (got {s!r}); use 0 to disable it, e.g. 1")
        if self.confidence_threshold <= 0:
            fail(f"confidence_threshold must be > 0 (got {self.confidence_threshold!r}); use e.g. 0.005")

    @classmethod
    def from_generation_config(cls, d: Mapping[str, Any]) -> SamplerConfig:
        """Read the sampler fields of a ``generation_config.json`` dict (or ``GenerationConfig.to_dict()``).

        Keys as the reference writes them: ``max_denoising_steps``, ``t_min``, ``t_max``,
        ``stability_threshold``, ``confidence_threshold`` and ``sampler_config`` = ``{"_cls_name":
        "EntropyBoundSamplerConfig", "entropy_bound": ...}`` (``to_dict()`` leaves it as an object with an
        ``entropy_bound`` attribute; both are read). Missing or ``null`` fields take the defaults, as the
        reference's ``generate`` does. Other keys (eos, pad, ...) are ignored.
        """
        defaults = cls()
        kw: dict[str, Any] = {}
        for name in ("max_denoising_steps", "t_min", "t_max", "stability_threshold", "confidence_threshold"):
            value = d.get(name)
            kw[name] = getattr(defaults, name) if value is None else value
        sc = d.get("sampler_config")
        if isinstance(sc, Mapping):
            cls_name = sc.get("_cls_name", _SAMPLER_CLS_NAME)
            if cls_name != _SAMPLER_CLS_NAME:
                raise SamplerConfigError(
                    f"SamplerConfig.sampler_config: only {_SAMPLER_CLS_NAME} is supported (got {cls_name!r})"
                )
            bound = sc.get("entropy_bound")
        else:
            bound = getattr(sc, "entropy_bound", None)
        kw["entropy_bound"] = defaults.entropy_bound if bound is None else bound
        # JSON may spell 1.0 as 1: store floats as floats so that to_generation_config() stays loadable.
        for name in ("t_min", "t_max", "entropy_bound", "confidence_threshold"):
            if _is_int(kw[name]):
                kw[name] = float(kw[name])
        return cls(**kw)

    def to_generation_config(self) -> dict[str, Any]:
        """The sampler fields in the reference's ``generation_config.json`` layout."""
        return {
            "max_denoising_steps": self.max_denoising_steps,
            "sampler_config": {"_cls_name": _SAMPLER_CLS_NAME, "entropy_bound": float(self.entropy_bound)},
            "t_min": float(self.t_min),
            "t_max": float(self.t_max),
            "stability_threshold": self.stability_threshold,
            "confidence_threshold": float(self.confidence_threshold),
        }


# ----------------------------------------------------------------------------------------------------------
# Temperature schedule (LinearTemperatureScheduleLogitsProcessor)


def temperature(step: int | mx.array, cfg: SamplerConfig) -> mx.array:
    """Temperature at ``step``: ``t_min + (t_max - t_min) * step / N``, a float32 scalar.

    ``step`` counts DOWN: N at the first denoising step, 1 at the last. The arithmetic is float32 in the
    same order as the reference's ``_denoising_step`` (which passes the step as an int32 tensor), so the
    result is bit-identical to it.
    """
    n = mx.array(step, dtype=mx.int32) if not isinstance(step, mx.array) else step
    return cfg.t_min + (cfg.t_max - cfg.t_min) * (n.astype(mx.float32) / cfg.max_denoising_steps)


def process_logits(logits: mx.array, step: int | mx.array, cfg: SamplerConfig) -> mx.array:
    """Temperature-scaled float32 logits ``[B, C, V]`` (the reference's ``processed_logits``)."""
    return logits.astype(mx.float32) / temperature(step, cfg)


# ----------------------------------------------------------------------------------------------------------
# Entropy, acceptance, renoising (EntropyBoundSampler)


def log_softmax(logits: mx.array) -> mx.array:
    """Log-probabilities over the last axis."""
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def entropy_from_logprobs(logprobs: mx.array) -> mx.array:
    """Entropy ``[...]`` of log-probabilities ``[..., V]``, as ``torch.distributions.Categorical.entropy``."""
    return -mx.sum(mx.exp(logprobs) * mx.maximum(logprobs, _F32_MIN), axis=-1)


def entropy(logits: mx.array) -> mx.array:
    """Per-position entropy ``[B, C]`` of logits ``[B, C, V]``, from one log-softmax."""
    return entropy_from_logprobs(log_softmax(logits))


def initial_canvas(key: mx.array, batch: int, length: int, vocab: int) -> mx.array:
    """A canvas of tokens drawn uniformly from ``[0, vocab)``, int32 ``[batch, length]``."""
    return mx.random.randint(0, vocab, (batch, length), dtype=mx.int32, key=key)


def accept_mask(entropy: mx.array, entropy_bound: float) -> mx.array:
    """Positions to accept, bool ``[B, C]``: the k lowest-entropy positions with ``sum - max <= bound``.

    Exactly the reference's recipe: sort ascending, cumulative sum, keep where ``cumsum - sorted <= bound``
    (the sorted value is the running max), scatter back to canvas order. The lowest-entropy position of a
    row is therefore always accepted. Ties may be ordered differently from ``torch.sort`` (module docstring).
    """
    order = mx.argsort(entropy, axis=-1)
    sorted_entropy = mx.take_along_axis(entropy, order, axis=-1)
    # Same expression as the reference (not an exclusive cumsum) so rounding matches as closely as possible.
    selected = (mx.cumsum(sorted_entropy, axis=-1) - sorted_entropy) <= entropy_bound
    return mx.put_along_axis(mx.zeros(entropy.shape, dtype=mx.bool_), order, selected, axis=-1)


def renoise(canvas: mx.array, accepted: mx.array, key: mx.array, vocab: int) -> mx.array:
    """Replace every non-accepted position with a fresh uniform token; accepted positions are kept."""
    noise = initial_canvas(key, canvas.shape[0], canvas.shape[1], vocab)
    return mx.where(accepted, canvas, noise)


# ----------------------------------------------------------------------------------------------------------
# Adaptive stopping (StableAndConfidentStoppingCriteria)


def init_history(cfg: SamplerConfig, batch: int, length: int) -> mx.array:
    """Empty argmax history, int32 ``[stability_threshold, B, C]`` filled with -1 (matches no token).

    Make a fresh one for every canvas (the reference calls ``reset()`` per canvas).
    """
    return mx.full((cfg.stability_threshold, batch, length), -1, dtype=mx.int32)


def is_stable_and_confident(
    argmax: mx.array, history: mx.array, entropy: mx.array, cfg: SamplerConfig
) -> tuple[mx.array, mx.array]:
    """Stopping test for one step. Returns ``(stop [B] bool, new_history)``.

    Stable: ``argmax`` equals each of the previous ``stability_threshold`` argmax canvases (always true when
    the threshold is 0). Confident: mean entropy of the processed logits ``< confidence_threshold``.
    ``history`` is the ``[S, B, C]`` array from :func:`init_history`; the new one drops the oldest canvas and
    appends ``argmax`` (the reference's ``torch.roll`` + overwrite).
    """
    argmax = argmax.astype(mx.int32)
    if cfg.stability_threshold == 0:
        stable = mx.ones((argmax.shape[0],), dtype=mx.bool_)
        new_history = history
    else:
        stable = mx.all(history == argmax[None], axis=(0, 2))
        new_history = mx.concatenate([history[1:], argmax[None]], axis=0)
    confident = mx.mean(entropy, axis=-1) < cfg.confidence_threshold
    return stable & confident, new_history


# ----------------------------------------------------------------------------------------------------------
# One denoising step (_denoising_step)


class StepOutput(NamedTuple):
    """What :func:`denoise_step` returns; feed the fields back in as the next step's arguments."""

    canvas: mx.array  # int32 [B, C]: next decoder input (accepted samples + fresh noise)
    argmax: mx.array  # int32 [B, C]: argmax of the processed logits; what is committed at the end
    logits: mx.array  # float32 [B, C, V]: processed logits, the next step's self-conditioning input
    done: mx.array  # bool [B]: row has stopped denoising (stays True)
    history: mx.array  # int32 [S, B, C]: argmax history for the stability test
    accepted: mx.array  # bool [B, C]: positions accepted this step (before finished rows are frozen)


def denoise_step(
    logits: mx.array,
    canvas: mx.array,
    argmax: mx.array,
    prev_logits: mx.array | None,
    done: mx.array,
    history: mx.array,
    step: int | mx.array,
    key: mx.array,
    cfg: SamplerConfig,
    settle: bool = False,
) -> StepOutput:
    """One sampler step on the decoder's raw logits ``[B, C, V]``.

    Args:
        logits: raw (soft-capped) decoder logits for ``canvas``; the vocabulary is ``logits.shape[-1]``.
        canvas: int32 ``[B, C]`` decoder input of this step.
        argmax: previous step's argmax canvas (on the first step, the initial canvas, as the reference).
        prev_logits: previous processed logits (self-conditioning), or ``None`` on the first step.
        done: bool ``[B]``, rows that already stopped denoising (all False at a canvas start).
        history: from :func:`init_history` or the previous step.
        step: remaining steps, N..1.
        key: ``mx.random`` key; split here into the categorical draw and the re-noising draw.
        cfg: sampler settings.
        settle: not the reference's: positions whose input token the argmax reproduces with an entropy under
            ``cfg.confidence_threshold`` are accepted without spending the entropy budget (a verified draft's
            canvas, ``VerifyConfig.settle``: held drafted tokens would otherwise use up the budget every step).

    Rows already ``done`` keep their previous canvas, argmax and processed logits, as in the reference; the
    stopping test still sees (and the history still records) their frozen argmax. The returned ``logits``
    are float32; casting them to the embedding dtype for self-conditioning is the model's business.
    """
    sample_key, noise_key = mx.random.split(key)
    processed = process_logits(logits, step, cfg)
    # One log-softmax serves the draw and the entropy (acceptance and confidence alike).
    logprobs = log_softmax(processed)
    ent = entropy_from_logprobs(logprobs)
    sample = mx.random.categorical(logprobs, axis=-1, key=sample_key).astype(mx.int32)
    # argmax of the processed logits, not of logprobs: the shift by logsumexp can round near-ties together.
    new_argmax = mx.argmax(processed, axis=-1).astype(mx.int32)

    # A verified draft's canvas (settle): sure, reproduced input tokens are accepted at no cost to the budget.
    if settle:
        settled = (canvas == new_argmax) & (ent < cfg.confidence_threshold)
        accepted = accept_mask(mx.where(settled, 0.0, ent), cfg.entropy_bound) | settled
    else:
        accepted = accept_mask(ent, cfg.entropy_bound)
    new_canvas = renoise(mx.where(accepted, sample, canvas), accepted, noise_key, processed.shape[-1])

    frozen = done[:, None]
    new_argmax = mx.where(frozen, argmax.astype(mx.int32), new_argmax)
    new_canvas = mx.where(frozen, canvas.astype(mx.int32), new_canvas)
    if prev_logits is not None:
        processed = mx.where(frozen[..., None], prev_logits.astype(mx.float32), processed)
    # Frozen rows' entropies are stale here, but they are already done and `done` only ever turns on.
    stop, new_history = is_stable_and_confident(new_argmax, history, ent, cfg)
    return StepOutput(new_canvas, new_argmax, processed, done | stop, new_history, accepted)


# ----------------------------------------------------------------------------------------------------------
# After the denoising loop (_finalize_canvas)


def is_one_of(tokens: mx.array, ids: Iterable[int]) -> mx.array:
    """Bool mask of ``tokens`` equal to any of ``ids`` (all False for none)."""
    hit = mx.zeros(tokens.shape, dtype=mx.bool_)
    for token in ids:
        hit = hit | (tokens == token)
    return hit


def finalize_canvas(
    canvas: mx.array,
    finished: mx.array,
    eos_ids: Sequence[int] | int | None,
    pad_id: int | None,
) -> tuple[mx.array, mx.array]:
    """Commit a denoised (argmax) canvas. Returns ``(canvas, finished)``.

    As the reference's ``_finalize_canvas`` with its EOS stopping criterion: a row is finished if it was
    before or its canvas holds any EOS id. Rows finished before this canvas become all pad; in the others,
    every token after the first EOS becomes pad (the EOS itself is kept). Without ``pad_id`` tokens are left
    as they are. The max-length criterion (all rows finished after the last canvas) is the caller's loop.
    """
    if isinstance(eos_ids, int):
        eos_ids = [eos_ids]
    eos_ids = list(eos_ids or [])
    is_eos = is_one_of(canvas, eos_ids)
    new_finished = finished | mx.any(is_eos, axis=-1)
    if pad_id is None:
        return canvas, new_finished
    canvas = mx.where(finished[:, None], mx.array(pad_id, dtype=canvas.dtype), canvas)
    is_eos = is_one_of(canvas, eos_ids)  # the reference looks for EOS after padding previously finished rows
    eos_count = mx.cumsum(is_eos.astype(mx.int32), axis=-1)
    pad_mask = (eos_count > 0) & ~((eos_count == 1) & is_eos)
    return mx.where(pad_mask, mx.array(pad_id, dtype=canvas.dtype), canvas), new_finished
