"""Text generation: a request → block loop → streamed, typed events, in mlx-lm's shape.

``stream_generate`` yields a :class:`Commit` with the new final text of each committed canvas, one :class:`Done`
with the statistics and, when asked (``previews=True``), a :class:`Preview` after every denoising step (the
current argmax canvas in ``canvas_text``). Every event has the fields of mlx-lm's ``GenerationResponse``, and
``.text`` is only ever newly committed text, so mlx-lm's ``text += r.text`` collects the answer once.
``generate`` returns the text. Both are ``run(model, tokenizer, prepare(...))``: ``request.prepare`` checks and
builds the request, ``run`` decodes it.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx

from mlx_dgemma.decoding.block_loop import CommitEvent, StepEvent, generate_steps, prefill, prefill_steps
from mlx_dgemma.decoding.canvas import Pass, Pause, Steps, solo
from mlx_dgemma.decoding.fast import FastDenoiser
from mlx_dgemma.decoding.verify import DraftSession
from mlx_dgemma.errors import GenerationError
from mlx_dgemma.model.cache import DiffusionCache
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.prompt import multimodal
from mlx_dgemma.request import GenerationRequest, Prompt, prepare
from mlx_dgemma.runtime.memory import wired_limit


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
    fast: bool = (
        False  # fast decoding (mlx_dgemma.decoding.fast), a labelled departure from the reference sampler
    )
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
class Preview(Response):
    """The canvas being denoised after one step (only with ``previews=True``). ``text`` is always ``""``
    (nothing is committed by a preview); the canvas as text is ``canvas_text``."""

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
    decoder_passes: int = 0  # the passes this canvas cost


@dataclass
class Done(Response):
    """The end of an answer: ``text`` is ``""`` (every piece came in a :class:`Commit`), ``answer`` the whole
    answer, ``finish_reason`` ``"stop"`` (an end-of-turn token) or ``"length"`` (``max_tokens`` reached) and
    ``stats`` the diffusion statistics."""

    text: str
    stats: GenerationStats
    answer: str = ""


class _Text:
    """Incremental detokenization: text of all kept tokens, released only when it is stable."""

    def __init__(self, tokenizer: Any):
        self.tokenizer, self.sent = tokenizer, ""
        self.tokens: list[int] = []

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
    model: Model, tokenizer: Any, prompt: Prompt | None, max_tokens: int | None = None, **options: Any
) -> Generator[Preview | Commit | Done, None, None]:
    """Generate a response, yielding commits, a final ``Done`` and, with ``previews=True``, a ``Preview`` per
    denoising step (see the module docstring). The options are :class:`~mlx_dgemma.request.GenerationOptions`.

    ``prompt`` is taken as mlx-lm takes it: token ids as given, a templated string as is, else text or chat
    messages through the chat template. ``max_tokens`` is exact (default: the checkpoint's ``max_new_tokens``,
    else 256). Sampler options default to the checkpoint's ``generation_config.json``; ``temperature`` T sets the
    schedule as the CLI's ``--temp`` and the server's ``temperature`` do. Autoregressive-only options
    (``top_p``, ``repetition_penalty``, ...) raise a ``GenerationError`` naming the option.

    ``prompt_cache`` works as mlx-lm's: a cache from ``mlx_lm.models.cache.make_prompt_cache(model)``; the prompt
    is encoded after what it holds, and it is left holding the prompt and the answer (through its end-of-turn
    token), ready for the next turn. ``prompt_ids`` are the whole conversation's ids (``prompt`` may be ``None``);
    ``cache`` already holds the first ``cache.offset`` of them and is left holding every canvas encoded after.

    ``drafter`` proposes canvases for the model to verify (``"auto"``: the model folder's own; ``"none"``,
    ``"lookup"``, a folder or a proposer; ``verify`` sets how); the commit rule stays the model's. ``fast``:
    fast decoding, a labelled departure from the reference sampler. ``images`` / ``image``: read by the vision
    tower (chat messages may carry image parts instead). ``response_format`` / ``json_schema``: every committed
    token follows the grammar; ``infill``: a template whose ``{{N}}`` holes the model fills.
    """
    yield from run(model, tokenizer, prepare(model, tokenizer, prompt, max_tokens, **options))


def run(model: Model, tokenizer: Any, request: GenerationRequest) -> Iterator[Preview | Commit | Done]:
    """Decode a prepared request (:func:`~mlx_dgemma.request.prepare`) alone: the events of :func:`run_steps`,
    each decoder pass computed at once."""
    return solo(model, run_steps(model, tokenizer, request))


def run_steps(model: Model, tokenizer: Any, request: GenerationRequest) -> Steps:
    """Decode a prepared request as a generator of the canvas loop (``decoding.canvas``): encode the rest of its
    prompt, then denoise and commit canvases until an end token or ``max_tokens``. Yields the events, and the
    decoder ``Pass``es and ``Pause``s its driver handles (``canvas.solo``, or ``mlx_dgemma.batching``)."""
    cache = request.cache if request.cache is not None else model.make_cache()
    session = None
    if request.proposer is not None:
        if cache.offset == 0:
            cache.capture = getattr(
                request.proposer, "capture", ()
            )  # the drafter reads these layers' features
        session = DraftSession(request.proposer, [request.ids], request.verify, list(request.eos))
    mx.reset_peak_memory()
    start = time.perf_counter()
    encoded = len(request.ids) - cache.offset
    if request.images is not None:
        multimodal.prefill(model, request.images, cache)
    elif encoded:
        yield from prefill_steps(model, mx.array([request.ids[cache.offset :]], dtype=mx.int32), cache)
    prompt_time = time.perf_counter() - start
    meter = _Meter(request.prompt_tokens, encoded / max(prompt_time, 1e-9), start + prompt_time)
    denoiser = FastDenoiser(request.fast, request.eos) if request.fast is not None else None
    steps = generate_steps(
        model,
        cache,
        request.max_tokens,
        request.sampler,
        seed=request.seed,
        adaptive_stopping=request.adaptive_stopping,
        eos_ids=list(request.eos),
        drafts=session,
        denoiser=denoiser,
        constraint=request.constraint,
    )
    answer = _Answer(tokenizer, set(request.eos), request.max_tokens, meter)
    with wired_limit(model):
        try:
            while answer.reason != "stop":
                item = next(steps, None)
                if item is None:
                    break
                if isinstance(item, (Pass, Pause)):
                    yield item  # for the driver: it computes a Pass before resuming this
                    continue
                out = answer.on(item, request.previews)
                if out is not None:
                    yield out
        finally:
            steps.close()
    if request.keep_answer:
        # Hold the whole answer, as mlx-lm's cache does: the last canvas is never encoded by the loop.
        _encode_tail(model, cache, answer.tail)
    elapsed = time.perf_counter() - start
    yield answer.done(model, request, session, denoiser, elapsed - prompt_time)


class _Answer:
    """The answer so far, from the block loop's events: its text, the canvases and passes it took."""

    def __init__(self, tokenizer: Any, eos: set[int], max_tokens: int, meter: _Meter):
        self.tokenizer, self.eos, self.max_tokens, self.meter = tokenizer, eos, max_tokens, meter
        self.text = _Text(tokenizer)
        self.tail: list[int] = []  # the last canvas's kept tokens and the end-of-turn token that ended it
        self.canvases = self.passes = 0
        self.reason = "length"

    def on(self, event: StepEvent | CommitEvent, previews: bool) -> Preview | Commit | None:
        """The API's event for one of the block loop's (``None`` for a step not shown)."""
        room = self.max_tokens - len(self.text.tokens)
        if isinstance(event, StepEvent):
            if not previews:
                return None
            canvas, _ = _keep(cast(list[int], event.argmax[0].tolist()), self.eos, room)
            return Preview(
                "",
                event.canvas_index,
                event.step,
                self.tokenizer.decode(canvas),
                **self.meter.fields(self.text),
            )
        self.canvases += 1
        passes = cast(int, event.decoder_passes[0].item())  # int32
        self.passes += passes
        committed = cast(list[int], event.tokens[0].tolist())  # int32 [C]
        new, stopped = _keep(committed, self.eos, room)
        self.tail = committed[: len(new) + 1] if stopped else new
        if stopped:
            self.reason = "stop"
        piece = self.text.add(new)
        return Commit(
            piece,
            new,
            event.canvas_index,
            passes,
            **self.meter.fields(self.text),
            from_draft=event.drafted and not event.restarted,
        )

    def done(
        self,
        model: Model,
        request: GenerationRequest,
        session: DraftSession | None,
        denoiser: FastDenoiser | None,
        generation_time: float,
    ) -> Done:
        kept = len(self.text.tokens)
        stats = GenerationStats(
            prompt_tokens=request.prompt_tokens,
            generated_tokens=kept,
            canvases=self.canvases,
            decoder_passes=self.passes,
            tokens_per_forward=kept / max(self.passes, 1),
            prompt_tps=self.meter.prompt_tps,
            generation_tps=kept / max(generation_time, 1e-9),
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            drafter=request.proposer.name if request.proposer is not None else "none",
            drafted_canvases=session.drafted if session is not None else 0,
            restarted_canvases=session.restarted if session is not None else 0,
            fast=denoiser is not None,
            decoder_positions=denoiser.positions if denoiser else self.passes * model.args.canvas_length,
            exact_agreement=sum(denoiser.exact) / len(denoiser.exact)
            if denoiser and denoiser.exact
            else None,
        )
        return Done("", stats, self.text.sent, **self.meter.fields(self.text), finish_reason=self.reason)


class _Meter:
    """The mlx-lm ``GenerationResponse`` figures of an answer so far."""

    def __init__(self, prompt_tokens: int, prompt_tps: float, generation_start: float):
        self.prompt_tokens, self.prompt_tps, self.generation_start = (
            prompt_tokens,
            prompt_tps,
            generation_start,
        )

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
    if (
        isinstance(verbose, (str, list, tuple)) and "image" not in kwargs
    ):  # mlx-vlm's generate(m, p, prompt, image)
        kwargs["image"], verbose = verbose, False
    if not isinstance(verbose, bool):
        raise GenerationError(
            f"generate's 4th argument is verbose (True/False), as in mlx-lm, not {verbose!r}: "
            "pass max_tokens by keyword"
        )
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
        print(
            f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec"
        )
        print(f"Peak memory: {response.peak_memory:.3f} GB")
    return text


Draft = Preview  # its old name: "draft" now means a drafter's proposal only
