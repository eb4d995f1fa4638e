"""Distillation data: the target's own answers to a set of prompts, and the context features it read.

For every prompt the target generates as it would for a user (its sampler, its commit rule) with its encoder
capturing the drafter's ``target_layers``. Each committed canvas becomes one training sample: the features of
everything encoded before it (prompt and earlier canvases: exactly what the drafter will read at inference) and the
target's raw argmax canvas (EOS filling included: the target verifies whole canvases).

``collect_from_data`` is the cheap alternative when the data holds the answers the target was trained on (its
fine-tuning set): the target *encodes* prompt + answer once, teacher-forced, instead of generating; each answer
canvas, EOS-filled as the training objective fills it, is a sample. One encoder pass per record instead of a
generation (tens of decoder passes per canvas): minutes instead of hours for a large target. The drafter then
learns the data's answers, which is what a well-trained target commits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np

from mlx_dgemma.decoding.block_loop import CommitEvent, generate_tokens, prefill
from mlx_dgemma.drafter.checkpoint import DrafterError
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.request import encode_prompt, eos_ids, sampler_config
from mlx_dgemma.train.data import load_jsonl, message_text, num_canvases

SAMPLES_FILE = "samples.safetensors"


@dataclass
class Samples:
    """Every sample's features, concatenated: sample ``i`` is ``features[starts[i] : starts[i] + lengths[i]]``."""

    features: mx.array  # [sum T, F] float16
    starts: np.ndarray
    lengths: np.ndarray
    canvases: mx.array  # [N, C] int32: the target's committed argmax canvases
    prompts: int  # how many prompts they came from

    def __len__(self) -> int:
        return len(self.lengths)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.stem + ".tmp.safetensors")
        mx.save_safetensors(
            str(tmp),
            {
                "features": self.features,
                "canvases": self.canvases,
                "starts": mx.array(self.starts),
                "lengths": mx.array(self.lengths),
            },
            metadata={"prompts": str(self.prompts)},
        )
        tmp.replace(path)

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
    def load(cls, path: Path) -> Samples:
        loaded = mx.load(str(path), return_metadata=True)
        arrays, metadata = cast("tuple[dict[str, mx.array], dict[str, str]]", loaded)  # safetensors
        return cls(
            arrays["features"],
            np.array(arrays["starts"]),
            np.array(arrays["lengths"]),
            arrays["canvases"],
            int(metadata["prompts"]),
        )


def read_prompts(path: str | Path) -> list[Any]:
    """Prompts from JSONL: ``{"prompt": ...}`` or ``{"messages": [...]}`` (a final assistant message is dropped:
    the target writes its own answer). A bad line is a one-line error with its number."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DrafterError(f'prompts not found: {path} (give a JSONL file, one {{"prompt": ...}} a line)')
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if (
                isinstance(record, dict)
                and isinstance(record.get("prompt"), str)
                and record["prompt"].strip()
            ):
                prompts.append(record["prompt"])
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                messages = [m for m in record["messages"] if isinstance(m, dict)]
                if messages and messages[-1].get("role") in ("assistant", "model"):
                    messages = messages[:-1]
                if not messages or not all(message_text(m) is not None for m in messages):
                    raise ValueError("no prompt messages")
                prompts.append(messages)
            else:
                raise ValueError('expected {"prompt": "..."} or {"messages": [...]}')
        except (json.JSONDecodeError, ValueError) as e:
            raise DrafterError(f"{path.name} line {number}: {e}") from None
    if not prompts:
        raise DrafterError(f"{path} has no prompts: write one JSON object a line")
    return prompts


def collect(
    model: Model,
    tokenizer: Any,
    prompts: Sequence[Any],
    capture: Sequence[int],
    context_window: int,
    max_tokens: int = 256,
    seed: int = 0,
    progress: Any = None,
) -> Samples:
    """Generate the target's answers to ``prompts`` and keep a sample per committed canvas."""
    cfg = sampler_config(model)
    eos = sorted(eos_ids(model, tokenizer))
    features, canvases = [], []
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        cache = model.make_cache()
        cache.capture = tuple(capture)
        prefill(model, mx.array([encode_prompt(tokenizer, prompt)], dtype=mx.int32), cache)
        for event in generate_tokens(model, cache, max_tokens, cfg, seed=seed + i, eos_ids=eos):
            if isinstance(event, CommitEvent):
                # The cache holds the prompt and the canvases before this one: the drafter's context for it.
                context = mx.concatenate(cache.features, axis=1)[0, -context_window:].astype(mx.float16)
                mx.eval(context)
                features.append(context)
                assert event.argmax is not None  # generate_tokens always sets it
                canvases.append(event.argmax[0])
        if progress is not None:
            progress(i + 1, len(prompts), len(canvases), time.perf_counter() - start)
    return Samples.stack(features, canvases, len(prompts))


def collect_from_data(
    model: Model,
    tokenizer: Any,
    path: str | Path,
    capture: Sequence[int],
    context_window: int,
    max_tokens: int = 256,
    progress: Any = None,
) -> Samples:
    """A sample per answer canvas of every record in ``path`` (prompt/completion or messages JSONL), teacher-forced."""
    C, fill = model.args.canvas_length, tokenizer.eos_token_id
    examples = load_jsonl(path, tokenizer, eos_ids(model, tokenizer))
    features, canvases = [], []
    start = time.perf_counter()
    for i, ex in enumerate(examples):
        count = min(num_canvases(len(ex.answer), C), -(-max_tokens // C))
        cache = model.make_cache()
        cache.capture = tuple(capture)
        # The encoder is causal: one pass over prompt + the answer before the last canvas gives every canvas's context.
        prefill(model, mx.array([ex.prompt + ex.answer[: (count - 1) * C]], dtype=mx.int32), cache)
        encoded = mx.concatenate(cache.features, axis=1)[0]
        for k in range(count):
            context = encoded[: len(ex.prompt) + k * C][-context_window:].astype(mx.float16)
            mx.eval(context)
            features.append(context)
            canvas = ex.answer[k * C : (k + 1) * C]
            canvases.append(mx.array(canvas + [fill] * (C - len(canvas)), dtype=mx.int32))
        if progress is not None:
            progress(i + 1, len(examples), len(canvases), time.perf_counter() - start)
    return Samples.stack(features, canvases, len(examples))
