"""Distillation data: the target's context features before each answer canvas, and the canvas.

Two ways to get the answers:

* Generation (``collect``, no ``--from-data``): the target answers every prompt as it would for a user (its sampler,
  its commit rule) with its encoder capturing the drafter's ``target_layers``. Each committed canvas becomes a
  sample: the features of everything encoded before it (prompt and earlier canvases: exactly what the drafter will
  read at inference) and the target's raw argmax canvas (EOS filling included: the target verifies whole canvases).
* Teacher forcing (``collect_from_data``, ``--from-data``), the cheap one when the data holds the answers the
  target was trained on (its fine-tuning set): the target *encodes* prompt + answer once instead of generating; each
  answer canvas, EOS-filled as the training objective fills it, is a sample. One encoder pass per record instead of
  a generation (tens of decoder passes per canvas): minutes instead of hours for a large target. The drafter then
  learns the data's answers, which is what a well-trained target commits.

``collect_features`` streams either kind into the on-disk store (``features.py``), a shard at a time, continuing a
store an earlier run left; ``collect`` / ``collect_from_data`` keep the samples in memory (``Samples``: small runs
and tests).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np

from mlx_dgemma.decoding.block_loop import CommitEvent, generate_tokens, prefill, prefill_steps
from mlx_dgemma.drafter.checkpoint import DrafterError, target_identity
from mlx_dgemma.drafter.data import Source, examples, prompts, resolve
from mlx_dgemma.drafter.features import (
    FeatureStore,
    FeatureWriter,
    Record,
    canvas_windows,
    chain,
    needed_positions,
    record_rows,
    to_float16,
)
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.request import eos_ids, sampler_config
from mlx_dgemma.train.data import Example, num_canvases

GB = 1e9


def size(n: float) -> str:
    """Bytes for people: GB from a tenth of one, else MB."""
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 1e6:.1f} MB"


@dataclass
class Samples:
    """Samples in memory: sample ``i`` is ``features[starts[i] : starts[i] + lengths[i]]`` and ``canvases[i]``.

    It reads as a :class:`~mlx_dgemma.drafter.features.FeatureStore` does (``window``, ``targets``), so the trainer
    takes either."""

    features: mx.array  # [sum T, F] float16
    starts: np.ndarray
    lengths: np.ndarray
    canvases: mx.array  # [N, C] int32: the target's committed argmax canvases
    prompts: int  # how many prompts they came from
    _numpy: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def feature_size(self) -> int:
        return int(self.features.shape[-1])

    def window(self, i: int) -> np.ndarray:
        """Sample ``i``'s context features [n, F] float16."""
        if "features" not in self._numpy:
            self._numpy["features"] = np.array(self.features)
        at = int(self.starts[i])
        return self._numpy["features"][at : at + int(self.lengths[i])]

    def targets(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """The target canvases of samples ``idx`` [B, C] int32."""
        if "canvases" not in self._numpy:
            self._numpy["canvases"] = np.array(self.canvases).astype(np.int32)
        return self._numpy["canvases"][np.asarray(idx, dtype=np.int64)]

    @classmethod
    def stack(cls, features: Sequence[mx.array], canvases: Sequence[mx.array], prompts: int) -> Samples:
        """Samples from each one's context features [T_i, F] and canvas [C]."""
        lengths = np.array([f.shape[0] for f in features], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return cls(
            mx.concatenate(list(features), axis=0),
            starts,
            lengths,
            mx.stack(list(canvases)).astype(mx.int32),
            prompts,
        )

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> Samples:
        """Each record's samples, each with its own copy of its window (the store shares them)."""
        features, canvases, count = [], [], 0
        for record in records:
            count += 1
            positions = needed_positions(record.windows)
            for (start, end), canvas in zip(record.windows, record.canvases):
                at = int(np.searchsorted(positions, start))
                features.append(mx.array(record.features[at : at + end - start]))
                canvases.append(mx.array(canvas))
        return cls.stack(features, canvases, count)


def answer_canvases(example: Example, canvas_length: int, max_tokens: int) -> int:
    """Answer canvases a record gives: those of its answer, at most ``max_tokens`` worth."""
    return min(num_canvases(len(example.answer), canvas_length), -(-max_tokens // canvas_length))


def teacher_forced_record(
    model: Model, example: Example, capture: Sequence[int], window: int, max_tokens: int, fill: int
) -> tuple[Record, int]:
    """One record's samples, teacher-forced (and how many feature values were clipped to float16's range).

    The encoder is causal: one pass over prompt + the answer before its last canvas gives every canvas's context.
    Each chunk's captured features are cut to the positions some canvas's window needs as soon as it is encoded,
    so a long prompt costs no more memory than its last ``window`` positions."""
    C = model.args.canvas_length
    count = answer_canvases(example, C, max_tokens)
    windows = canvas_windows(len(example.prompt), count, C, window)
    need = needed_positions(windows)
    ids = example.prompt + example.answer[: (count - 1) * C]
    cache = model.make_cache()
    cache.capture = tuple(capture)
    parts, clipped, at = [], 0, 0
    for _ in prefill_steps(model, mx.array([ids], dtype=mx.int32), cache):
        chunk = cache.features.pop()[0]  # this chunk's [L, F]; nothing else reads the captured features
        keep = need[(need >= at) & (need < at + chunk.shape[0])] - at
        if len(keep):
            part, n = to_float16(chunk[mx.array(keep)].astype(mx.float32))
            parts.append(part)
            clipped += n
        at += chunk.shape[0]
    canvases = np.full((count, C), fill, dtype=np.int32)
    for k in range(count):
        tokens = example.answer[k * C : (k + 1) * C]
        canvases[k, : len(tokens)] = tokens
    F = len(capture) * model.args.hidden_size
    features = np.concatenate(parts) if parts else np.zeros((0, F), dtype=np.float16)
    return Record(features, windows, canvases), clipped


def generated_record(
    model: Model,
    prompt: Sequence[int],
    capture: Sequence[int],
    window: int,
    max_tokens: int,
    seed: int,
    eos: Sequence[int],
) -> tuple[Record, int]:
    """One prompt's samples: the target's committed canvases, each with the context its cache held before it."""
    cache = model.make_cache()
    cache.capture = tuple(capture)
    prefill(model, mx.array([list(prompt)], dtype=mx.int32), cache)
    ends, canvases = [], []
    for event in generate_tokens(
        model, cache, max_tokens, sampler_config(model), seed=seed, eos_ids=list(eos)
    ):
        if isinstance(event, CommitEvent):
            # The cache holds the prompt and the canvases before this one: the drafter's context for it.
            ends.append(sum(f.shape[1] for f in cache.features))
            assert event.argmax is not None  # generate_tokens always sets it
            canvases.append(np.array(event.argmax[0]).astype(np.int32))
    windows = [(max(0, end - window), end) for end in ends]
    if not ends:  # nothing committed (no answer canvas): no samples
        return Record(
            np.zeros((0, len(capture) * model.args.hidden_size), np.float16), [], np.zeros((0, 0))
        ), 0
    encoded = mx.concatenate(cache.features, axis=1)[0]
    features, clipped = to_float16(encoded[mx.array(needed_positions(windows))].astype(mx.float32))
    return Record(features, windows, np.stack(canvases)), clipped


def collect(
    model: Model,
    tokenizer: Any,
    prompts_ids: Sequence[Sequence[int]],
    capture: Sequence[int],
    context_window: int,
    max_tokens: int = 256,
    seed: int = 0,
) -> Samples:
    """Generate the target's answers to the prompts (token ids) and keep a sample per committed canvas, in memory."""
    eos = sorted(eos_ids(model, tokenizer))
    return Samples.from_records(
        generated_record(model, p, capture, context_window, max_tokens, seed + i, eos)[0]
        for i, p in enumerate(prompts_ids)
    )


def collect_from_data(
    model: Model,
    tokenizer: Any,
    path: str | Path,
    capture: Sequence[int],
    context_window: int,
    max_tokens: int = 256,
) -> Samples:
    """A sample per answer canvas of every record in ``path`` (any ``--data``), teacher-forced, in memory."""
    fill = tokenizer.eos_token_id
    found = examples(resolve(path), tokenizer, eos_ids(model, tokenizer))
    return Samples.from_records(
        teacher_forced_record(model, ex, capture, context_window, max_tokens, fill)[0] for _, ex in found
    )


class Progress(Protocol):
    """What collection reports to: ``(stage, done, total, note)`` as it goes, and lines of its own."""

    def __call__(self, stage: str, done: int, total: int, note: str = "") -> None: ...

    def line(self, text: str) -> None: ...


@dataclass
class Plan:
    """What a run will collect, from a scan of its data: per record, its prompt length, its canvases (0: skipped,
    too long for the target) and the running hash of the records' tokens."""

    prompt_lengths: list[int]
    canvases: list[int]
    hashes: list[str]
    exact: bool  # teacher-forced: exact; generation: at most (the target may stop sooner)

    @property
    def records(self) -> int:
        return len(self.canvases)

    def rows(self, canvas_length: int, window: int, first: int = 0) -> int:
        """Feature rows (positions) records ``first..`` store."""
        return sum(
            record_rows(p, c, canvas_length, window)
            for p, c in zip(self.prompt_lengths[first:], self.canvases[first:])
        )


def scan(
    source: Source,
    tokenizer: Any,
    model: Model,
    from_data: bool,
    max_tokens: int,
    max_records: int | None,
    progress: Progress,
) -> Plan:
    """Read and tokenize every record once (nothing is kept but lengths and hashes) to plan the run."""
    C, limit = model.args.canvas_length, model.args.max_position_embeddings
    plan = Plan([], [], [], from_data)
    total = max_records or 0  # 0: unknown until the data ends
    items: Iterator[tuple[int, Any]] = (
        examples(source, tokenizer, eos_ids(model, tokenizer), max_records)
        if from_data
        else prompts(source, tokenizer, max_records)
    )
    previous = ""
    for number, item in items:
        if from_data:
            count, tokens = answer_canvases(item, C, max_tokens), [item.prompt, item.answer]
            prompt_length = len(item.prompt)
        else:
            count, tokens, prompt_length = -(-max_tokens // C), [item], len(item)
        fits = prompt_length + count * C <= limit  # what inference would need for these canvases
        previous = chain(previous, tokens)
        plan.prompt_lengths.append(prompt_length)
        plan.canvases.append(count if fits else 0)
        plan.hashes.append(previous)
        progress("scan", number + 1, total)
    return plan


def collect_features(
    model: Model,
    tokenizer: Any,
    source: Source,
    folder: Path,
    *,
    capture: Sequence[int],
    window: int,
    max_tokens: int,
    from_data: bool,
    max_records: int | None = None,
    seed: int = 0,
    dtype: str = "as stored",
    shard_bytes: int = 1 << 30,
    progress: Progress,
) -> FeatureStore:
    """Collect the samples of ``source`` into the store in ``folder`` (continuing what it holds) and open it.

    Prints the plan first (records, canvases, the features' size on disk), and refuses a run whose features do not
    fit on the folder's disk."""
    a = model.args
    C, F = a.canvas_length, len(capture) * a.hidden_size
    plan = scan(source, tokenizer, model, from_data, max_tokens, max_records, progress)
    settings = {
        "mode": "from-data" if from_data else "generation",
        "target": target_identity(model),
        "dtype": dtype,
        "layers": list(capture),
        "context_window": window,
        "max_tokens": max_tokens,
        "seed": None if from_data else seed,
    }
    writer = FeatureWriter(folder, settings, F, C, shard_bytes)
    try:
        for end, digest in writer.hashes.items():
            if end <= plan.records and plan.hashes[end - 1] != digest:
                raise DrafterError(
                    f"the data's first {end} records are not those the features in {folder} were collected from: "
                    "use the same --data, or remove that folder (or give another --features)"
                )
        report(plan, writer, folder, C, window, F, progress)
        fill, eos = tokenizer.eos_token_id, sorted(eos_ids(model, tokenizer))
        items: Iterator[tuple[int, Any]] = (
            examples(source, tokenizer, eos_ids(model, tokenizer), plan.records, writer.done)
            if from_data
            else prompts(source, tokenizer, plan.records, writer.done)
        )
        for number, item in items:
            record, clipped = None, 0
            if plan.canvases[number]:
                record, clipped = (
                    teacher_forced_record(model, item, capture, window, max_tokens, fill)
                    if from_data
                    else generated_record(model, item, capture, window, max_tokens, seed + number, eos)
                )
            writer.add(number, record, plan.hashes[number], clipped)
            note = f"{writer.samples:,} canvases, {size(writer.bytes)}"
            progress("encode" if from_data else "distil", number + 1, plan.records, note)
        writer.complete()
    finally:
        writer.close()
    store = FeatureStore(folder, plan.records)
    if store.clipped:
        progress.line(f"warning: {store.clipped:,} feature values beyond float16's range were clipped")
    return store


def report(
    plan: Plan, writer: FeatureWriter, folder: Path, C: int, window: int, F: int, progress: Progress
) -> None:
    """The plan in one line, before any encoding; a one-line error when its features would not fit on disk."""
    skipped = plan.canvases.count(0)
    rows = plan.rows(C, window)
    total = rows * F * 2
    bound = "" if plan.exact else "at most "
    progress.line(
        f"features: {plan.records:,} records, {bound}{sum(plan.canvases):,} canvases, {bound}{size(total)} "
        f"({rows:,} positions x {F:,} values x 2 bytes) in {folder}"
        + (f"; {skipped:,} records longer than the target's context skipped" if skipped else "")
    )
    done = min(writer.done, plan.records)
    if done == plan.records:
        progress.line(f"features: all {done:,} records collected already (reused)")
    elif done:
        progress.line(f"features: {done:,} records collected already, continuing with record {done + 1:,}")
    needed = plan.rows(C, window, done) * F * 2
    free = shutil.disk_usage(folder).free
    if plan.exact and needed > free:
        raise DrafterError(
            f"the features need {size(needed)} more, and {folder}'s disk has {size(free)} free: "
            "use fewer records (--max-records), shorter answers (--max-tokens), a smaller --context-window, "
            "or put --features on a larger disk"
        )
