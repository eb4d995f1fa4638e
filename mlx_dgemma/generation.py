"""Text generation: prompt → chat template → block loop → streamed, typed events.

``stream_generate`` yields a :class:`Draft` after every denoising step (the current argmax canvas as
text), a :class:`Commit` with the new final text of each committed canvas, and one :class:`Done` with the
statistics. ``generate`` returns the text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx

from .cache import DiffusionCache
from .constrain import make_constraint
from .errors import GenerationError
from .loop import CommitEvent, StepEvent, generate_tokens, prefill
from .model import Model
from .sampler import SamplerConfig
from .verify import DraftSession, VerifyConfig

Prompt = str | Sequence[dict[str, Any]]

# Options of autoregressive samplers that have no meaning for the entropy-bound diffusion sampler.
UNSUPPORTED = {
    "temperature": "use t_max / t_min (the linear temperature schedule)",
    "temp": "use t_max / t_min (the linear temperature schedule)",
    "top_p": "the entropy-bound sampler has no nucleus; tune entropy_bound",
    "top_k": "the entropy-bound sampler has no top-k; tune entropy_bound",
    "min_p": "the entropy-bound sampler has no min-p; tune entropy_bound",
    "repetition_penalty": "a canvas is denoised as a whole; there is no token-by-token penalty",
    "presence_penalty": "a canvas is denoised as a whole; there is no token-by-token penalty",
    "frequency_penalty": "a canvas is denoised as a whole; there is no token-by-token penalty",
    "logprobs": "tokens are committed by argmax of a denoised canvas, not sampled one by one",
    "num_beams": "beam search does not apply to block diffusion",
}


@dataclass
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    canvases: int
    decoder_passes: int
    tokens_per_forward: float  # generated tokens / decoder passes: the headline efficiency figure
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    drafter: str = "none"  # the proposer that drafted canvases (see mlx_dgemma.drafter)
    drafted_canvases: int = 0  # canvases that started from a draft ...
    restarted_canvases: int = 0  # ... of which the target rejected (restarted from noise)


@dataclass
class Draft:
    """The canvas being denoised, as text, after one step."""

    text: str
    canvas_index: int
    step: int


@dataclass
class Commit:
    """Final text added by a committed canvas."""

    text: str
    tokens: list[int]
    canvas_index: int


@dataclass
class Done:
    text: str
    finish_reason: str  # "stop" (an end-of-turn token) or "length" (max_tokens reached)
    stats: GenerationStats


def sampler_config(model: Model, **overrides: Any) -> SamplerConfig:
    """The checkpoint's ``generation_config.json`` sampler settings (else the released defaults), overridden
    by any non-``None`` keyword (``max_denoising_steps``, ``t_max``, ``t_min``, ``entropy_bound``, ...)."""
    base = SamplerConfig.from_generation_config(getattr(model, "generation_config", {}) or {})
    known = {f.name for f in fields(SamplerConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise GenerationError(f"unknown sampler option {sorted(unknown)[0]!r}: known are {', '.join(sorted(known))}")
    values = {name: getattr(base, name) for name in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplerConfig(**values)


def encode_prompt(
    tokenizer: Any,
    prompt: Prompt,
    system: str | None = None,
    use_chat_template: bool = True,
    thinking: bool | None = None,
) -> list[int]:
    """Token ids of a prompt: a string or a list of chat messages, through the checkpoint's chat template."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise GenerationError("the prompt is empty: give some text to respond to")
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
        if not messages:
            raise GenerationError("the message list is empty: give at least one user message")
    if not use_chat_template or not getattr(tokenizer, "chat_template", None):
        if not isinstance(prompt, str):
            raise GenerationError("chat messages need a chat template, and this tokenizer has none")
        return list(tokenizer.encode(prompt))
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    if thinking is None:
        # The template's own default: mlx-lm's wrapper would otherwise switch thinking on when it spots
        # thinking tokens in the vocabulary.
        hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
        text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             enable_thinking=thinking)
    # The template writes its own <bos>; don't let the tokenizer add another.
    return list(tokenizer.encode(text, add_special_tokens=False))


def check_context(model: Model, prompt_tokens: int, max_tokens: int) -> None:
    """Raise if the prompt plus the canvases needed for ``max_tokens`` exceed the context window."""
    if max_tokens <= 0:
        raise GenerationError(f"max_tokens must be a positive integer (got {max_tokens})")
    canvas = model.args.canvas_length
    needed = prompt_tokens + math.ceil(max_tokens / canvas) * canvas
    window = model.args.max_position_embeddings
    if needed > window:
        raise GenerationError(
            f"prompt of {prompt_tokens} tokens plus {max_tokens} new tokens (in {canvas}-token canvases) needs "
            f"{needed} positions, but the context window is {window}: shorten the prompt or lower max_tokens"
        )


class _Text:
    """Incremental detokenization: text of all kept tokens, released only when it is stable."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""

    def add(self, tokens: list[int]) -> str:
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens)
        # A multi-byte character split across canvases decodes to U+FFFD until its other bytes arrive.
        stable = text.rstrip("\ufffd")
        new = stable[len(self.sent) :] if stable.startswith(self.sent) else stable
        self.sent = stable
        return new


def _keep(tokens: list[int], eos: set[int], room: int) -> tuple[list[int], bool]:
    """The tokens of a committed canvas that belong to the answer, and whether an EOS ended it."""
    for i, t in enumerate(tokens[:room]):
        if t in eos:
            return tokens[:i], True
    return tokens[:room], False


def stream_generate(
    model: Model,
    tokenizer: Any,
    prompt: Prompt,
    max_tokens: int | None = None,
    *,
    system: str | None = None,
    use_chat_template: bool = True,
    thinking: bool | None = None,
    seed: int | None = None,
    max_denoising_steps: int | None = None,
    t_max: float | None = None,
    t_min: float | None = None,
    entropy_bound: float | None = None,
    stability_threshold: int | None = None,
    confidence_threshold: float | None = None,
    adaptive_stopping: bool = True,
    drafts: bool = True,
    prompt_ids: Sequence[int] | None = None,
    cache: DiffusionCache | None = None,
    drafter: Any = "auto",
    verify: VerifyConfig | None = None,
    response_format: dict[str, Any] | None = None,
    json_schema: Any = None,
    infill: str | None = None,
    **unsupported: Any,
) -> Iterator[Draft | Commit | Done]:
    """Generate a response, yielding drafts, commits and a final ``Done`` (see the module docstring).

    ``max_tokens`` is exact (default: the checkpoint's ``max_new_tokens``, else 256). Sampler options
    default to the checkpoint's ``generation_config.json``. Autoregressive-only options (``top_p``,
    ``repetition_penalty``, ...) raise a ``GenerationError`` naming the option.

    ``prompt_ids`` are the prompt's token ids, used as given (``prompt`` may then be ``None``). ``cache``
    is a cache that already holds the first ``cache.offset`` of them (e.g. a previous turn's): only the rest
    are encoded; it is left holding the prompt and every canvas encoded after it.

    ``drafter`` proposes canvases for the model to verify (``mlx_dgemma.drafter.make_proposer``): ``"auto"``
    (the model folder's own drafter, if any), ``"none"``, ``"lookup"``, a drafter folder or a proposer;
    ``verify`` sets how drafts are verified. The commit rule stays the model's.

    Structured output (``constrain.py``): ``response_format`` (OpenAI's ``json_object`` / ``json_schema``,
    or ``regex`` / ``lark``) or ``json_schema`` (a schema dict or JSON text) makes every committed token follow
    the grammar; ``infill`` is a template whose ``{{N}}`` holes (N tokens each) the model fills while the rest
    is held fixed (no drafter then). Constrained generation syncs with the host at every denoising step.
    """
    for name in unsupported:
        hint = UNSUPPORTED.get(name, "it is not a DiffusionGemma generation option")
        raise GenerationError(f"{name!r} is not supported: {hint}")
    cfg = sampler_config(
        model, max_denoising_steps=max_denoising_steps, t_max=t_max, t_min=t_min, entropy_bound=entropy_bound,
        stability_threshold=stability_threshold, confidence_threshold=confidence_threshold,
    )
    gen_config = getattr(model, "generation_config", {}) or {}
    max_tokens = max_tokens if max_tokens is not None else gen_config.get("max_new_tokens") or 256
    if prompt_ids is None:
        ids = encode_prompt(tokenizer, prompt, system, use_chat_template, thinking)
    else:
        ids = list(prompt_ids)
    from .drafter import make_proposer

    proposer = make_proposer(drafter, model)
    cache = cache if cache is not None else model.make_cache()
    if cache.offset == 0:
        cache.capture = getattr(proposer, "capture", ())
    session = DraftSession(proposer, [ids], verify) if proposer is not None else None
    if not ids or cache.offset > len(ids):
        raise GenerationError(f"prompt_ids has {len(ids)} tokens but the cache already holds {cache.offset}: "
                              "give a non-empty prompt that the cache is a prefix of")
    check_context(model, len(ids), max_tokens)
    eos = eos_ids(model, tokenizer)
    constraint = make_constraint(tokenizer, sorted(eos), model.args.pad_token_id or 0,
                                 model.args.vocab_size, max_tokens, model.args.canvas_length, response_format,
                                 json_schema, infill)
    if infill is not None:
        session = None  # a draft would overwrite the held positions of the canvas it starts

    mx.reset_peak_memory()
    start = time.perf_counter()
    encoded = len(ids) - cache.offset
    prefill(model, mx.array([ids[cache.offset :]], dtype=mx.int32), cache)
    prompt_time = time.perf_counter() - start
    passes, canvases, kept, reason = 0, 0, 0, "length"
    text = _Text(tokenizer)
    events = generate_tokens(model, cache, max_tokens, cfg, seed=seed, adaptive_stopping=adaptive_stopping,
                             eos_ids=sorted(eos), drafts=session, constraint=constraint)
    for event in events:
        if isinstance(event, StepEvent):
            if drafts:
                draft, _ = _keep(event.argmax[0].tolist(), eos, max_tokens - kept)
                yield Draft(tokenizer.decode(draft), event.canvas_index, event.step)
            continue
        assert isinstance(event, CommitEvent)
        canvases += 1
        passes += int(event.decoder_passes[0].item())
        new, stopped = _keep(event.tokens[0].tolist(), eos, max_tokens - kept)
        kept += len(new)
        yield Commit(text.add(new), new, event.canvas_index)
        if stopped:
            reason = "stop"
            break
    elapsed = time.perf_counter() - start
    stats = GenerationStats(
        prompt_tokens=len(ids),
        generated_tokens=kept,
        canvases=canvases,
        decoder_passes=passes,
        tokens_per_forward=kept / max(passes, 1),
        prompt_tps=encoded / max(prompt_time, 1e-9),
        generation_tps=kept / max(elapsed - prompt_time, 1e-9),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        drafter=proposer.name if proposer is not None else "none",
        drafted_canvases=session.drafted if session is not None else 0,
        restarted_canvases=session.restarted if session is not None else 0,
    )
    yield Done(text.sent, reason, stats)


def generate(model: Model, tokenizer: Any, prompt: Prompt, max_tokens: int | None = None, **kwargs: Any) -> str:
    """Generate a response and return its text (same options as :func:`stream_generate`)."""
    done = None
    for event in stream_generate(model, tokenizer, prompt, max_tokens, drafts=False, **kwargs):
        done = event
    assert isinstance(done, Done)
    return done.text


def eos_ids(model: Model, tokenizer: Any) -> set[int]:
    """Every id that ends generation: the checkpoint's ``eos_token_id`` (generation config first) and the
    tokenizer's."""
    gen_eos = (getattr(model, "generation_config", {}) or {}).get("eos_token_id")
    if gen_eos is None:
        gen_eos = model.args.eos_token_id
    eos = {gen_eos} if isinstance(gen_eos, int) else set(gen_eos)
    return eos | set(getattr(tokenizer, "eos_token_ids", None) or [])
