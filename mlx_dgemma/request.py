"""A generation request, built once: ``prepare`` turns an API call's options into a :class:`GenerationRequest`.

Everything that can be wrong with a request is found here, before any decoding: the prompt (chat template,
special-token spellings, images), the sampler settings (``temperature`` mapped onto the schedule), the seed, the
context window, the grammar (compiled once), the drafter. ``generation.run`` then streams the answer of a
request; the server builds its request with the same ``prepare`` (its own chat rendering gives the ids).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, cast

import mlx.core as mx
from jinja2 import TemplateError

from mlx_dgemma.decoding.constrain import Constraint, FillInMiddle, make_constraint
from mlx_dgemma.decoding.fast import FastConfig
from mlx_dgemma.decoding.sampler import SamplerConfig
from mlx_dgemma.decoding.verify import Proposer, VerifyConfig
from mlx_dgemma.errors import GenerationError
from mlx_dgemma.model.cache import DiffusionCache
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.prompt import chat_template, multimodal
from mlx_dgemma.prompt.special_text import PlainText

Prompt = str | Sequence[dict[str, Any]] | Sequence[int] | mx.array

MIN_TEMPERATURE = 0.01  # temperature 0 is served as this, the schedule's floor
DEFAULT_MAX_TOKENS = 256  # without max_tokens and without the checkpoint's max_new_tokens

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


@dataclass(kw_only=True)
class GenerationOptions:
    """What a caller of ``stream_generate`` / ``generate`` / ``prepare`` may set (every field optional).

    Prompt: ``system``, ``use_chat_template``, ``thinking`` and ``chat_template_kwargs`` go to the chat template;
    special-token spellings in message text are text unless ``parse_special_tokens``. ``prompt_ids``: the whole
    conversation's ids, used as given. ``images`` / ``image`` (mlx-vlm's name): paths, PIL images, arrays, bytes.
    Cache: ``cache`` (ours, holding a prefix of the ids) or ``prompt_cache`` (mlx-lm's list, left holding the
    prompt and the answer). Sampler: ``temperature`` or ``t_max``/``t_min``, ``max_denoising_steps``,
    ``entropy_bound``, ``stability_threshold``, ``confidence_threshold``, ``adaptive_stopping``, ``seed``.
    Decoding: ``drafter`` and ``verify`` (``mlx_dgemma.drafter``), ``fast`` (``decoding.fast``), a grammar from
    ``response_format`` / ``json_schema`` or an ``infill`` template (``decoding.constrain``). ``previews``: a
    :class:`~mlx_dgemma.generation.Preview` event after every denoising step (``drafts`` is its old name).
    """

    system: str | None = None
    use_chat_template: bool = True
    thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    parse_special_tokens: bool = False
    prompt_ids: Sequence[int] | None = None
    images: Sequence[Any] | Any | None = None
    image: Sequence[Any] | Any | None = None
    cache: DiffusionCache | None = None
    prompt_cache: list[Any] | None = None
    seed: int | None = None
    temperature: float | None = None
    max_denoising_steps: int | None = None
    t_max: float | None = None
    t_min: float | None = None
    entropy_bound: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    adaptive_stopping: bool = True
    drafter: Any = "auto"
    verify: VerifyConfig | None = None
    fast: bool | FastConfig = False
    response_format: dict[str, Any] | None = None
    json_schema: Any = None
    infill: str | FillInMiddle | None = None  # a template, or fill-in-the-middle before a suffix
    bounded_grammar: bool = False  # compile the grammar in a bounded slot (the server, off its worker)
    previews: bool = False
    drafts: bool | None = None  # the old name of previews


@dataclass
class GenerationRequest:
    """One request, checked and ready to run: what ``generation.run`` needs and nothing it must work out."""

    ids: list[int]  # the whole prompt; with ``cache``, its first ``cache.offset`` ids are already encoded
    prompt_tokens: int  # the prompt's tokens as the caller counts them (an mlx-lm cache's are not given)
    max_tokens: int  # exact: the answer is cut there
    sampler: SamplerConfig
    eos: tuple[int, ...]  # every id that ends the answer
    seed: int | None = None
    adaptive_stopping: bool = True
    images: multimodal.ImagePrompt | None = None
    cache: DiffusionCache | None = None
    keep_answer: bool = False  # encode the answer's last canvas into ``cache`` (mlx-lm's prompt cache)
    constraint: Constraint | None = None
    proposer: Proposer | None = None
    verify: VerifyConfig | None = None
    fast: FastConfig | None = None
    previews: bool = False


def prepare(
    model: Model, tokenizer: Any, prompt: Prompt | None, max_tokens: int | None = None, **options: Any
) -> GenerationRequest:
    """Check a call's options (:class:`GenerationOptions`) and build its :class:`GenerationRequest`.

    ``prompt`` is taken as mlx-lm takes it (:func:`encode_prompt`). ``max_tokens`` defaults to the checkpoint's
    ``max_new_tokens``, else 256. Autoregressive-only options (``top_p``, ...) raise a ``GenerationError``
    naming the option and what to use instead."""
    opts = _options(options)
    t_max, t_min = schedule_options(model, opts.temperature, opts.t_max, opts.t_min)
    sampler = sampler_config(
        model,
        max_denoising_steps=opts.max_denoising_steps,
        t_max=t_max,
        t_min=t_min,
        entropy_bound=opts.entropy_bound,
        stability_threshold=opts.stability_threshold,
        confidence_threshold=opts.confidence_threshold,
    )
    max_tokens = max_tokens if max_tokens is not None else default_max_tokens(model)
    ids, given, images, cache = _prompt(model, tokenizer, prompt, opts)
    check_context(model, len(ids), max_tokens)
    eos = tuple(sorted(eos_ids(model, tokenizer)))
    a = model.args
    constraint = make_constraint(
        tokenizer,
        eos,
        a.pad_token_id or 0,
        a.vocab_size,
        max_tokens,
        a.canvas_length,
        opts.response_format,
        opts.json_schema,
        opts.infill,
        bounded=opts.bounded_grammar,
    )
    from mlx_dgemma.drafter import make_proposer  # the drafter package imports the model, not the other way

    # An infill's held positions would be overwritten by a draft's start: no drafter then.
    proposer = make_proposer(opts.drafter, model) if opts.infill is None else None
    fast = opts.fast if isinstance(opts.fast, FastConfig) else (FastConfig() if opts.fast else None)
    previews = opts.previews or bool(opts.drafts)
    return GenerationRequest(
        ids,
        given,
        max_tokens,
        sampler,
        eos,
        opts.seed,
        opts.adaptive_stopping,
        images,
        cache,
        opts.prompt_cache is not None,
        constraint,
        proposer,
        opts.verify,
        fast,
        previews,
    )


def _options(options: dict[str, Any]) -> GenerationOptions:
    """The options as :class:`GenerationOptions`; an unknown one is a one-line error saying what to use."""
    known = {f.name for f in fields(GenerationOptions)}
    for name in options:
        if name not in known:
            hint = UNSUPPORTED.get(name, "it is not a DiffusionGemma generation option")
            raise GenerationError(f"{name!r} is not supported: {hint}")
    opts = GenerationOptions(**options)
    seed = opts.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise GenerationError(
            f"seed must be an integer from 0 to 2**64 - 1 (got {seed!r}): pick one in that range"
        )
    if opts.prompt_cache is not None and opts.cache is not None:
        raise GenerationError("give either prompt_cache (mlx-lm's) or cache, not both")
    return opts


def _prompt(
    model: Model, tokenizer: Any, prompt: Prompt | None, opts: GenerationOptions
) -> tuple[list[int], int, multimodal.ImagePrompt | None, DiffusionCache | None]:
    """The prompt's ids (images expanded), how many the caller gave, its images, and the cache it extends."""
    images = as_image_list(opts.images, opts.image)
    image_list: list[Any] = []
    keep: tuple[str, ...] = ()
    if images or multimodal.has_images(prompt):
        placeholder = tokenizer.convert_ids_to_tokens(getattr(model.vision_args, "image_token_id", 0))
        prompt, image_list = multimodal.split_images(prompt, images, placeholder)
        keep = (placeholder,)  # placed in the text for the images: stays special
    if opts.prompt_ids is not None:
        ids = list(opts.prompt_ids)
    else:
        ids = encode_prompt(
            tokenizer,
            prompt,
            opts.system,
            opts.use_chat_template,
            opts.thinking,
            opts.chat_template_kwargs,
            parse_special_tokens=opts.parse_special_tokens,
            keep_special=keep,
        )
    cache = opts.cache
    given = len(ids)
    if opts.prompt_cache is not None:
        cache = as_diffusion_cache(model, opts.prompt_cache)
        ids = [model.args.pad_token_id] * cache.offset + ids  # placeholders: only ids[cache.offset:] are read
    image_prompt = None
    if image_list:
        image_prompt = multimodal.prepare(model, ids, image_list, cache.offset if cache is not None else 0)
        given += len(image_prompt.ids) - len(ids)
        ids = image_prompt.ids
    if not ids or (cache is not None and cache.offset > len(ids)):
        held = cache.offset if cache is not None else 0
        raise GenerationError(
            f"prompt_ids has {len(ids)} tokens but the cache already holds {held}: "
            "give a non-empty prompt that the cache is a prefix of"
        )
    return ids, given, image_prompt, cache


def default_max_tokens(model: Model) -> int:
    """``max_tokens`` when none is given: the checkpoint's ``max_new_tokens``, else ``DEFAULT_MAX_TOKENS``."""
    return (getattr(model, "generation_config", {}) or {}).get("max_new_tokens") or DEFAULT_MAX_TOKENS


def sampler_config(model: Model, **overrides: Any) -> SamplerConfig:
    """The checkpoint's ``generation_config.json`` sampler settings (else the released defaults), overridden
    by any non-``None`` keyword (``max_denoising_steps``, ``t_max``, ``t_min``, ``entropy_bound``, ...)."""
    base = SamplerConfig.from_generation_config(getattr(model, "generation_config", {}) or {})
    known = {f.name for f in fields(SamplerConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise GenerationError(
            f"unknown sampler option {sorted(unknown)[0]!r}: known are {', '.join(sorted(known))}"
        )
    values = {name: getattr(base, name) for name in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SamplerConfig(**values)


def temperature_schedule(model: Model, temperature: float) -> tuple[float, float]:
    """``(t_max, t_min)`` for one temperature T (the API's ``temperature=``, the CLI's ``--temp``, OpenAI's
    ``temperature``): ``t_max = T`` and the checkpoint's ratio ``t_min / t_max`` kept (1/2 in the released config,
    whose 0.8/0.4 is T = 0.8). T = 0 is served as ``MIN_TEMPERATURE``, the nearest the schedule gets to greedy."""
    if not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"temperature must be a finite number >= 0 (got {temperature}): try 0.8")
    base = sampler_config(model)
    t = max(temperature, MIN_TEMPERATURE)
    return t, t * base.t_min / base.t_max


def schedule_options(
    model: Model, temperature: float | None, t_max: float | None, t_min: float | None
) -> tuple[float | None, float | None]:
    """``(t_max, t_min)`` of a call that may give one ``temperature`` instead: mapped by
    :func:`temperature_schedule`; giving both is an error."""
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
    prompt: Prompt | None,
    system: str | None = None,
    use_chat_template: bool = True,
    thinking: bool | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    *,
    parse_special_tokens: bool = False,
    keep_special: Sequence[str] = (),
    generation_prompt: bool = True,
) -> list[int]:
    """Token ids of a prompt, as mlx-lm takes prompts: token ids (a list or ``mx.array``) are used as given; a
    string that already starts with the template's BOS or a turn marker is encoded as is; any other string or a
    list of chat messages goes through the checkpoint's chat template (``chat_template_kwargs`` passed to it).

    Text that goes through the template (messages' content, ``system``, a plain string) is read as text: a
    special token's spelling in it (``<start_of_turn>``, ...) is not that token, so it cannot forge a turn
    (``mlx_dgemma.prompt.special_text``), except the spellings in ``keep_special`` (the image placeholder).
    ``parse_special_tokens=True`` reads them as special tokens, as a pre-templated text means them.
    ``generation_prompt=False`` leaves out the template's generation prompt: the conversation so far, which the
    rendering of its next turn extends (``mlx_dgemma.cli.chat`` keeps its encoder cache there)."""
    ids = _token_ids(prompt)
    if ids is not None:
        return ids
    if isinstance(prompt, str):
        if not prompt.strip():
            raise GenerationError("the prompt is empty: give some text to respond to")
        bos = getattr(tokenizer, "bos_token", None)
        if use_chat_template and prompt.startswith(tuple(m for m in (bos, *TURN_MARKERS) if m)):
            return list(tokenizer.encode(prompt, add_special_tokens=False))
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    elif prompt is None:
        raise GenerationError("no prompt: give a prompt (text, messages or token ids) or prompt_ids")
    else:
        messages = list(cast(Sequence[dict[str, Any]], prompt))  # token ids were taken above
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
    try:
        # Reserved kwargs refused, the template's own code time-limited (mlx_dgemma.prompt.chat_template).
        text = chat_template.render(tokenizer, messages, generation_prompt, kwargs)
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
        parts = [
            {**p, "text": plain.mark(p["text"])}
            if isinstance(p, dict) and isinstance(p.get("text"), str)
            else p
            for p in content
        ]
        return {**message, "content": parts}
    return message


def _token_ids(prompt: Any) -> list[int] | None:
    """``prompt`` as a list of token ids if it is token ids (a list of ints or an ``mx.array``), else None."""
    if isinstance(prompt, mx.array):
        if prompt.ndim == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.ndim != 1 or not mx.issubdtype(prompt.dtype, mx.integer):
            raise GenerationError(
                f"a prompt given as an mx.array must be 1-D token ids (got shape "
                f"{tuple(prompt.shape)}, {prompt.dtype}): pass tokenizer.encode(text)"
            )
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


def as_diffusion_cache(model: Model, prompt_cache: list[Any]) -> DiffusionCache:
    """mlx-lm's prompt cache (the list ``make_prompt_cache`` or ``load_prompt_cache`` returns) as the model's
    cache. The layer caches are shared, not copied, so the caller's list sees what is encoded."""
    if isinstance(prompt_cache, DiffusionCache):
        return prompt_cache
    want = [type(c) for c in model.make_cache()]
    if not isinstance(prompt_cache, list) or [type(c) for c in prompt_cache] != want:
        raise GenerationError(
            f"prompt_cache does not fit this model (it needs {len(want)} layer caches, as "
            "make_prompt_cache(model) makes them): make it, or save it, from this model"
        )
    return DiffusionCache(prompt_cache)


def eos_ids(model: Model, tokenizer: Any) -> set[int]:
    """Every id that ends generation: the checkpoint's ``eos_token_id`` (generation config first) and the
    tokenizer's."""
    gen_eos = (getattr(model, "generation_config", {}) or {}).get("eos_token_id")
    if gen_eos is None:
        gen_eos = model.args.eos_token_id
    eos = {gen_eos} if isinstance(gen_eos, int) else set(gen_eos)
    return eos | set(getattr(tokenizer, "eos_token_ids", None) or [])
