"""Text generation: prompt → chat template → block loop → streamed, typed events, in mlx-lm's shape.

``stream_generate`` yields a :class:`Commit` with the new final text of each committed canvas, one :class:`Done`
with the statistics and, when asked (``drafts=True``), a :class:`Draft` after every denoising step (the
current argmax canvas in ``canvas_text``). Every event has the fields of mlx-lm's ``GenerationResponse``, and
``.text`` is only ever newly committed text, so mlx-lm's ``text += r.text`` collects the answer once.
``generate`` returns the text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import mlx.core as mx
from jinja2 import TemplateError

from . import chat_template, multimodal
from .cache import DiffusionCache
from .constrain import make_constraint
from .errors import GenerationError
from .fast import FastConfig, FastDenoiser
from .loop import CommitEvent, StepEvent, generate_tokens, prefill
from .memory import wired
from .model import Model
from .sampler import SamplerConfig
from .special_text import PlainText
from .verify import DraftSession, VerifyConfig

Prompt = str | Sequence[dict[str, Any]] | Sequence[int] | mx.array

MIN_TEMPERATURE = 0.01  # temperature 0 is served as this, the schedule's floor (as the server does)

# Strings that begin so were templated already (mlx-lm checks the BOS only): Gemma 3's and Gemma 4's turn markers.
TURN_MARKERS = ("<start_of_turn>", "<|turn>")

# Options of autoregressive samplers that have no meaning for the entropy-bound diffusion sampler.
UNSUPPORTED = {
    "top_p": "the entropy-bound sampler has no nucleus; tune entropy_bound",
    "top_k": "the entropy-bound sampler has no top-k; tune entropy_bound",
    "min_p": "the entropy-bound sampler has no min-p; tune entropy_bound",
    "repetition_penalty": "a canvas is denoised as a whole; there is no token-by-token penalty",
    "presence_penalty": "a canvas is denoised as a whole; there is no token-by-token penalty",
    "frequency_penalty": "a canvas is denoised as a whole; there is no token-by-token penalty",
    "logprobs": "tokens are committed by argmax of a denoised canvas, not sampled one by one",
    "num_beams": "beam search does not apply to block diffusion",
    "sampler": "the entropy-bound sampler is built in; set t_max / t_min / entropy_bound",
    "logits_processors": "a canvas is denoised as a whole; there is no token-by-token logits processor",
    "draft_model": "use drafter= (a DiffusionGemma drafter folder, 'lookup' or 'none')",
    "num_draft_tokens": "a drafter proposes whole canvases: use drafter=",
    "kv_bits": "the encoder cache is not quantized; quantize the weights with mlx_dgemma.convert",
    "kv_group_size": "the encoder cache is not quantized; quantize the weights with mlx_dgemma.convert",
    "quantized_kv_start": "the encoder cache is not quantized; quantize the weights with mlx_dgemma.convert",
    "max_kv_size": "sliding layers keep their window already; lower max_tokens or shorten the prompt",
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
    fast: bool = False  # fast decoding (mlx_dgemma.fast), a labelled departure from the reference sampler
    decoder_positions: int = 0  # canvas positions the decoder computed, over all passes
    exact_agreement: float | None = None  # fast mode with FastConfig(check=True): see fast.exact_agreement


@dataclass(kw_only=True)
class Response:
    """The fields of mlx-lm's ``GenerationResponse`` that every event carries (mlx-lm code reads them as is).

    ``generation_tokens`` / ``generation_tps`` count the answer's tokens committed so far; ``peak_memory`` is in
    GB; ``finish_reason`` is ``None`` until the final :class:`Done`. ``token`` is the last committed token
    (``None`` before any), ``from_draft`` whether the canvas started from a drafter's proposal that the target
    kept. ``logprobs`` is always ``None``: tokens are committed by argmax of a denoised canvas.
    """

    token: int | None = None
    logprobs: None = None
    from_draft: bool = False
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    finish_reason: str | None = None


@dataclass
class Draft(Response):
    """The canvas being denoised after one step (only with ``drafts=True``). ``text`` is always ``""`` (nothing
    is committed by a draft); the canvas as text is ``canvas_text``."""

    text: str
    canvas_index: int
    step: int
    canvas_text: str = ""


@dataclass
class Commit(Response):
    """Final text added by a committed canvas: ``text`` is the new text, ``tokens`` its token ids."""

    text: str
    tokens: list[int]
    canvas_index: int


@dataclass
class Done(Response):
    """The end of an answer: ``text`` is ``""`` (every piece came in a :class:`Commit`), ``answer`` the whole
    answer, ``finish_reason`` ``"stop"`` (an end-of-turn token) or ``"length"`` (``max_tokens`` reached) and
    ``stats`` the diffusion statistics."""

    text: str
    stats: GenerationStats
    answer: str = ""


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


def temperature_schedule(model: Model, temperature: float) -> tuple[float, float]:
    """``(t_max, t_min)`` for one temperature T, as the server maps OpenAI's ``temperature``: ``t_max = T`` and
    the checkpoint's ratio ``t_min / t_max`` kept (1/2 in the released config, whose 0.8/0.4 is T = 0.8)."""
    if not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"temperature must be a finite number >= 0 (got {temperature}): try 0.8")
    base = sampler_config(model)
    t = max(temperature, MIN_TEMPERATURE)
    return t, t * base.t_min / base.t_max


def schedule_options(model: Model, temperature: float | None, t_max: float | None,
                     t_min: float | None) -> tuple[float | None, float | None]:
    """``(t_max, t_min)`` of a call that may give one ``temperature`` instead (the API's ``temperature=``, the
    CLI's ``--temp``): mapped by :func:`temperature_schedule`; giving both is an error."""
    if temperature is None:
        return t_max, t_min
    if t_max is not None or t_min is not None:
        raise GenerationError("give either temperature or t_max/t_min, not both")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise GenerationError(f"temperature must be a number (got {temperature!r}): try 0.8")
    return temperature_schedule(model, float(temperature))


def as_image_list(images: Any, image: Any = None) -> list[Any] | None:
    """``images=`` (ours) or ``image=`` (mlx-vlm's), each one image (a path, PIL image, array, bytes) or a list of
    them, as a list (``None`` when neither is given)."""
    if image is not None:
        if images is not None:
            raise GenerationError("give either images= or image= (mlx-vlm's name), not both")
        images = image
    if images is None:
        return None
    return list(images) if isinstance(images, (list, tuple)) else [images]


def encode_prompt(
    tokenizer: Any,
    prompt: Prompt,
    system: str | None = None,
    use_chat_template: bool = True,
    thinking: bool | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    *,
    parse_special_tokens: bool = False,
    keep_special: Sequence[str] = (),
) -> list[int]:
    """Token ids of a prompt, as mlx-lm takes prompts: token ids (a list or ``mx.array``) are used as given; a
    string that already starts with the template's BOS or a turn marker is encoded as is; any other string or a
    list of chat messages goes through the checkpoint's chat template (``chat_template_kwargs`` passed to it).

    Text that goes through the template (messages' content, ``system``, a plain string) is read as text: a
    special token's spelling in it (``<start_of_turn>``, ...) is not that token, so it cannot forge a turn
    (``mlx_dgemma.special_text``), except the spellings in ``keep_special`` (the image placeholder).
    ``parse_special_tokens=True`` reads them as special tokens, as a pre-templated text means them."""
    ids = _token_ids(prompt)
    if ids is not None:
        return ids
    if isinstance(prompt, str):
        if not prompt.strip():
            raise GenerationError("the prompt is empty: give some text to respond to")
        bos = getattr(tokenizer, "bos_token", None)
        if use_chat_template and prompt.startswith(tuple(m for m in (bos, *TURN_MARKERS) if m)):
            return list(tokenizer.encode(prompt, add_special_tokens=False))
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
    kwargs = dict(chat_template_kwargs or {})
    plain = None
    if not parse_special_tokens:
        plain = PlainText(tokenizer, [messages, kwargs, tokenizer.chat_template], keep_special)
        messages = [_marked(m, plain) for m in messages]
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    # The template's own default for thinking: mlx-lm's wrapper would otherwise switch it on when it spots
    # thinking tokens in the vocabulary, so render with the Hugging Face tokenizer itself.
    hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
    try:
        # Reserved kwargs refused, the template's own code time-limited (mlx_dgemma.chat_template).
        text = chat_template.render(hf_tokenizer, messages, True, kwargs)
    except TemplateError as e:  # raised on purpose for messages the template rejects (unknown role, ...)
        raise GenerationError(f"the chat template rejected the messages: {e}") from None
    if plain is not None:
        text, typed = plain.unmark(text)
        if typed:  # a message holds a special-token spelling: tokenized as text
            return plain.encode(text, typed)
    # The template writes its own <bos>; don't let the tokenizer add another.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _marked(message: Any, plain: PlainText) -> Any:
    """A chat message with its text (string content or text parts) marked to be read as text."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": plain.mark(content)}
    if isinstance(content, list):
        parts = [{**p, "text": plain.mark(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str)
                 else p for p in content]
        return {**message, "content": parts}
    return message


def _token_ids(prompt: Any) -> list[int] | None:
    """``prompt`` as a list of token ids if it is token ids (a list of ints or an ``mx.array``), else None."""
    if isinstance(prompt, mx.array):
        if prompt.ndim == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.ndim != 1 or not mx.issubdtype(prompt.dtype, mx.integer):
            raise GenerationError(f"a prompt given as an mx.array must be 1-D token ids (got shape "
                                  f"{tuple(prompt.shape)}, {prompt.dtype}): pass tokenizer.encode(text)")
        ids = prompt.tolist()
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        ids = list(prompt)
    else:
        return None
    if not ids:
        raise GenerationError("the prompt has no tokens: give some text or token ids to respond to")
    return ids


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
    drafts: bool = False,
    prompt_ids: Sequence[int] | None = None,
    cache: DiffusionCache | None = None,
    drafter: Any = "auto",
    verify: VerifyConfig | None = None,
    prompt_cache: list[Any] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    fast: bool | FastConfig = False,
    images: Sequence[Any] | Any | None = None,
    image: Sequence[Any] | Any | None = None,
    temperature: float | None = None,
    response_format: dict[str, Any] | None = None,
    json_schema: Any = None,
    infill: str | None = None,
    parse_special_tokens: bool = False,
    **unsupported: Any,
) -> Iterator[Draft | Commit | Done]:
    """Generate a response, yielding commits, a final ``Done`` and, with ``drafts=True``, a ``Draft`` per
    denoising step (see the module docstring).

    ``prompt`` is taken as mlx-lm takes it (see :func:`encode_prompt`): token ids as given, a templated string
    as is, else text or chat messages through the chat template (``system``, ``thinking`` and
    ``chat_template_kwargs`` go to the template; special-token spellings in their text are text unless
    ``parse_special_tokens``). ``max_tokens`` is exact (default: the checkpoint's
    ``max_new_tokens``, else 256). Sampler options default to the checkpoint's ``generation_config.json``.
    Autoregressive-only options (``top_p``, ``repetition_penalty``, ...) raise a ``GenerationError`` naming
    the option.

    ``prompt_cache`` works as mlx-lm's: a cache from ``mlx_lm.models.cache.make_prompt_cache(model)`` or
    ``load_prompt_cache``; the prompt is encoded after what it holds, and it is left holding the prompt and
    the answer (through its end-of-turn token), ready for the next turn's prompt.

    ``prompt_ids`` are the whole conversation's token ids, used as given (``prompt`` may then be ``None``);
    ``cache`` is a cache that already holds the first ``cache.offset`` of them (e.g. a previous turn's): only the
    rest are encoded; it is left holding the prompt and every canvas encoded after it.

    ``drafter`` proposes canvases for the model to verify (``mlx_dgemma.drafter.make_proposer``): ``"auto"``
    (the model folder's own drafter, if any), ``"none"``, ``"lookup"``, a drafter folder or a proposer;
    ``verify`` sets how drafts are verified. The commit rule stays the model's.

    ``fast`` switches on fast decoding (``mlx_dgemma.fast``: fewer decoder positions and sampler FLOPs per
    token), a labelled departure from the reference sampler; a ``FastConfig`` picks its techniques.

    ``temperature`` T sets the schedule as the CLI's ``--temp`` and the server's ``temperature`` do (see
    :func:`temperature_schedule`), instead of ``t_max`` / ``t_min``.

    ``images`` (paths, PIL images, uint8 arrays, bytes; one or a list; ``image=`` as mlx-vlm names it) are read
    by the vision tower; chat messages may carry
    image content parts instead (see ``mlx_dgemma.multimodal``). With ``prompt_ids``, the ids hold one image
    placeholder per image, which is expanded to the image's soft tokens.

    Structured output (``constrain.py``): ``response_format`` (OpenAI's ``json_object`` / ``json_schema``,
    or ``regex`` / ``lark``) or ``json_schema`` (a schema dict or JSON text) makes every committed token follow
    the grammar; ``infill`` is a template whose ``{{N}}`` holes (N tokens each) the model fills while the rest
    is held fixed (no drafter then). Constrained generation syncs with the host at every denoising step.
    """
    for name in unsupported:
        hint = UNSUPPORTED.get(name, "it is not a DiffusionGemma generation option")
        raise GenerationError(f"{name!r} is not supported: {hint}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise GenerationError(f"seed must be an integer from 0 to 2**64 - 1 (got {seed!r}): pick one in that range")
    t_max, t_min = schedule_options(model, temperature, t_max, t_min)
    images = as_image_list(images, image)
    cfg = sampler_config(
        model, max_denoising_steps=max_denoising_steps, t_max=t_max, t_min=t_min, entropy_bound=entropy_bound,
        stability_threshold=stability_threshold, confidence_threshold=confidence_threshold,
    )
    gen_config = getattr(model, "generation_config", {}) or {}
    max_tokens = max_tokens if max_tokens is not None else gen_config.get("max_new_tokens") or 256
    image_list: list[Any] = []
    keep: tuple[str, ...] = ()
    if images or multimodal.has_images(prompt):
        placeholder = tokenizer.convert_ids_to_tokens(getattr(model.vision_args, "image_token_id", 0))
        prompt, image_list = multimodal.split_images(prompt, images, placeholder)
        keep = (placeholder,)  # placed in the text for the images: stays special
    if prompt_ids is None:
        ids = encode_prompt(tokenizer, prompt, system, use_chat_template, thinking, chat_template_kwargs,
                            parse_special_tokens=parse_special_tokens, keep_special=keep)
    else:
        ids = list(prompt_ids)
    if prompt_cache is not None:
        if cache is not None:
            raise GenerationError("give either prompt_cache (mlx-lm's) or cache, not both")
        cache = as_diffusion_cache(model, prompt_cache)
    given = len(ids)
    if prompt_cache is not None:
        ids = [model.args.pad_token_id] * cache.offset + ids  # placeholders: only ids[cache.offset:] are read
    image_prompt = None
    if image_list:
        image_prompt = multimodal.prepare(model, ids, image_list, cache.offset if cache is not None else 0)
        given += len(image_prompt.ids) - len(ids)
        ids = image_prompt.ids
    from .drafter import make_proposer

    proposer = make_proposer(drafter, model)
    cache = cache if cache is not None else model.make_cache()
    if cache.offset == 0:
        cache.capture = getattr(proposer, "capture", ())
    eos = eos_ids(model, tokenizer)
    session = DraftSession(proposer, [ids], verify, sorted(eos)) if proposer is not None else None
    if not ids or cache.offset > len(ids):
        raise GenerationError(f"prompt_ids has {len(ids)} tokens but the cache already holds {cache.offset}: "
                              "give a non-empty prompt that the cache is a prefix of")
    check_context(model, len(ids), max_tokens)
    constraint = make_constraint(tokenizer, sorted(eos), model.args.pad_token_id or 0,
                                 model.args.vocab_size, max_tokens, model.args.canvas_length, response_format,
                                 json_schema, infill)
    if infill is not None:
        session = None  # a draft would overwrite the held positions of the canvas it starts

    mx.reset_peak_memory()
    start = time.perf_counter()
    encoded = len(ids) - cache.offset
    if image_prompt is not None:
        multimodal.prefill(model, image_prompt, cache)
    else:
        prefill(model, mx.array([ids[cache.offset :]], dtype=mx.int32), cache)
    prompt_time = time.perf_counter() - start
    passes, canvases, reason = 0, 0, "length"
    text = _Text(tokenizer)
    meter = _Meter(given, encoded / max(prompt_time, 1e-9), start + prompt_time)
    denoiser = FastDenoiser(fast if isinstance(fast, FastConfig) else FastConfig(), sorted(eos)) if fast else None
    events = wired(model, generate_tokens(model, cache, max_tokens, cfg, seed=seed,
                                          adaptive_stopping=adaptive_stopping, eos_ids=sorted(eos), drafts=session,
                                          denoiser=denoiser, constraint=constraint))
    tail: list[int] = []  # the last canvas's kept tokens and the end-of-turn token that ended it
    for event in events:
        if isinstance(event, StepEvent):
            if drafts:
                draft, _ = _keep(event.argmax[0].tolist(), eos, max_tokens - len(text.tokens))
                yield Draft("", event.canvas_index, event.step, tokenizer.decode(draft), **meter.fields(text))
            continue
        assert isinstance(event, CommitEvent)
        canvases += 1
        passes += int(event.decoder_passes[0].item())
        committed = event.tokens[0].tolist()
        new, stopped = _keep(committed, eos, max_tokens - len(text.tokens))
        tail = committed[: len(new) + 1] if stopped else new
        piece = text.add(new)
        kept_draft = event.drafted and not event.restarted
        yield Commit(piece, new, event.canvas_index, **meter.fields(text), from_draft=kept_draft)
        if stopped:
            reason = "stop"
            break
    events.close()
    if prompt_cache is not None:
        # Hold the whole answer, as mlx-lm's cache does: the last canvas is never encoded by the loop.
        _encode_tail(model, cache, tail)
    elapsed = time.perf_counter() - start
    kept = len(text.tokens)
    stats = GenerationStats(
        prompt_tokens=given,
        generated_tokens=kept,
        canvases=canvases,
        decoder_passes=passes,
        tokens_per_forward=kept / max(passes, 1),
        prompt_tps=meter.prompt_tps,
        generation_tps=kept / max(elapsed - prompt_time, 1e-9),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        drafter=proposer.name if proposer is not None else "none",
        drafted_canvases=session.drafted if session is not None else 0,
        restarted_canvases=session.restarted if session is not None else 0,
        fast=denoiser is not None,
        decoder_positions=denoiser.positions if denoiser else passes * model.args.canvas_length,
        exact_agreement=sum(denoiser.exact) / len(denoiser.exact) if denoiser and denoiser.exact else None,
    )
    yield Done("", stats, text.sent, **meter.fields(text), finish_reason=reason)


class _Meter:
    """The mlx-lm ``GenerationResponse`` figures of an answer so far."""

    def __init__(self, prompt_tokens: int, prompt_tps: float, generation_start: float):
        self.prompt_tokens, self.prompt_tps, self.generation_start = prompt_tokens, prompt_tps, generation_start

    def fields(self, text: _Text) -> dict[str, Any]:
        n = len(text.tokens)
        return {
            "token": text.tokens[-1] if text.tokens else None,
            "prompt_tokens": self.prompt_tokens,
            "prompt_tps": self.prompt_tps,
            "generation_tokens": n,
            "generation_tps": n / max(time.perf_counter() - self.generation_start, 1e-9),
            "peak_memory": mx.get_peak_memory() / 1e9,
        }


def _encode_tail(model: Model, cache: DiffusionCache, tokens: list[int]) -> None:
    if tokens:
        prefill(model, mx.array([tokens], dtype=mx.int32), cache)


def as_diffusion_cache(model: Model, prompt_cache: list[Any]) -> DiffusionCache:
    """mlx-lm's prompt cache (the list ``make_prompt_cache`` or ``load_prompt_cache`` returns) as the model's
    cache. The layer caches are shared, not copied, so the caller's list sees what is encoded."""
    if isinstance(prompt_cache, DiffusionCache):
        return prompt_cache
    want = [type(c) for c in model.make_cache()]
    if not isinstance(prompt_cache, list) or [type(c) for c in prompt_cache] != want:
        raise GenerationError(f"prompt_cache does not fit this model (it needs {len(want)} layer caches, as "
                              "make_prompt_cache(model) makes them): make it, or save it, from this model")
    return DiffusionCache(prompt_cache)


def generate(
    model: Model,
    tokenizer: Any,
    prompt: Prompt,
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate a response and return its text (same options as :func:`stream_generate`), as mlx-lm's
    ``generate``: with ``verbose``, print the text as it comes, then the prompt and generation speeds and the
    peak memory. An image (path) or list of images as the 4th argument is mlx-vlm's ``image``."""
    if isinstance(verbose, (str, list, tuple)) and "image" not in kwargs:  # mlx-vlm's generate(m, p, prompt, image)
        kwargs["image"], verbose = verbose, False
    if not isinstance(verbose, bool):
        raise GenerationError(f"generate's 4th argument is verbose (True/False), as in mlx-lm, not {verbose!r}: "
                              "pass max_tokens by keyword")
    kwargs.setdefault("drafts", False)
    if verbose:
        print("=" * 10)
    text, response = "", None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    assert isinstance(response, Done)
    if verbose:
        print()
        print("=" * 10)
        if not text:
            print("No text generated for this prompt")
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {response.peak_memory:.3f} GB")
    return text


def eos_ids(model: Model, tokenizer: Any) -> set[int]:
    """Every id that ends generation: the checkpoint's ``eos_token_id`` (generation config first) and the
    tokenizer's."""
    gen_eos = (getattr(model, "generation_config", {}) or {}).get("eos_token_id")
    if gen_eos is None:
        gen_eos = model.args.eos_token_id
    eos = {gen_eos} if isinstance(gen_eos, int) else set(gen_eos)
    return eos | set(getattr(tokenizer, "eos_token_ids", None) or [])
