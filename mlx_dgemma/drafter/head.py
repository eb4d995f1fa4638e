"""The drafter's head over a draft vocabulary shortlist: logits for the tokens it may draft, not all of them.

The drafter shares the target's tied embedding as its LM head; on the 26B model that is a [C=256, H=2816] x
[H, V=262,144] product per proposal, most of the drafter's cost. As FR-Spec and EAGLE-3 do for autoregressive
drafters, a drafter folder may carry a shortlist (``shortlist.safetensors``): the S token ids most frequent in the
answers of its training records (and always the end tokens). Its head is the embedding restricted to those rows,
so it costs S/V of the full one; a token outside it is never drafted (its position is simply not drafted, or
drafted as the best shortlisted token and left to the confidence test: see ``DraftHead.log_rest``). Optionally
(``Shortlist.prompt``, the default) each request adds its prompt's own tokens (names, identifiers the answer
copies).

Build one for an existing drafter folder from its training data:

    python -m mlx_dgemma.drafter.head --drafter DIR --data train.jsonl --size 32768 [--model TARGET]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from mlx_dgemma.errors import DGemmaError, DrafterError
from mlx_dgemma.model.diffusion_gemma import softcap

SHORTLIST_FILE = "shortlist.safetensors"  # in the drafter folder: "ids" int32 [S], most frequent first
SUM_CHUNK = 16_384  # embedding rows summed at a time (the rest's mean row), so no [V, H] fp32 copy is made


@dataclass(frozen=True)
class Shortlist:
    """A drafter's draft vocabulary: ``ids`` int32 [S] (vocabulary ids); ``prompt``: each request also drafts its
    prompt's own tokens; ``estimate_rest``: the confidence counts an estimate of the other tokens' probability."""

    ids: mx.array
    prompt: bool = True  # measured: the prompt's names/identifiers are what a frequency list misses
    estimate_rest: bool = True


# ------------------------------------------------------------------------------------------------------------
# Building a shortlist from token counts


def count_tokens(answers: Iterable[list[int]]) -> Counter[int]:
    """How often each token id occurs in ``answers`` (each a list of ids)."""
    counts: Counter[int] = Counter()
    for answer in answers:
        counts.update(answer)
    return counts


def build_shortlist(
    counts: Mapping[int, int], size: int, vocab_size: int, always: Iterable[int] = ()
) -> mx.array:
    """The ``size`` ids to draft: ``always`` (the end tokens: a canvas's tail is ends, and they must
    win its argmax there), then the most frequent in ``counts`` (ties: the lower id), then the lowest unseen ids."""
    keep = sorted(set(always))
    if not 1 <= size <= vocab_size:
        raise DrafterError(
            f"the shortlist size must be between 1 and the vocabulary ({vocab_size}); got {size}"
        )
    if len(keep) > size:
        raise DrafterError(
            f"a shortlist of {size} cannot hold the {len(keep)} end tokens: give a larger --size"
        )
    bad = [i for i in [*keep, *counts] if not 0 <= i < vocab_size]
    if bad:
        raise DrafterError(f"token id {bad[0]} is outside the vocabulary of {vocab_size}: wrong tokenizer?")
    chosen = set(keep)
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    for i in [*ranked, *range(vocab_size)]:
        if len(keep) == size:
            break
        if i not in chosen:
            keep.append(i)
            chosen.add(i)
    return mx.array(keep, dtype=mx.int32)


def coverage(counts: Mapping[int, int], ids: mx.array | Iterable[int]) -> float:
    """The fraction of the counted tokens that ``ids`` holds (1.0 when nothing was counted)."""
    total = sum(counts.values())
    held = set(cast("list[int]", ids.tolist()) if isinstance(ids, mx.array) else ids)
    return sum(n for i, n in counts.items() if i in held) / total if total else 1.0


def save_shortlist(folder: str | Path, shortlist: Shortlist, info: Mapping[str, str] | None = None) -> Path:
    """Write ``shortlist`` into the drafter ``folder`` (a temporary file renamed into place); ``info``: metadata
    (how it was built, its coverage) kept in the file beside the ids."""
    file = Path(folder).expanduser() / SHORTLIST_FILE
    tmp = file.with_name(f".tmp-{file.name}")  # mx.save_safetensors keeps a .safetensors suffix
    metadata = {
        "prompt": str(shortlist.prompt).lower(),
        "estimate_rest": str(shortlist.estimate_rest).lower(),
        **(info or {}),
    }
    mx.save_safetensors(str(tmp), {"ids": shortlist.ids.astype(mx.int32)}, metadata=metadata)
    os.replace(tmp, file)
    return file


def read_shortlist(folder: str | Path, vocab_size: int) -> Shortlist | None:
    """The shortlist in the drafter ``folder``, or None when it has none; a broken one is a one-line error."""
    file = Path(folder).expanduser() / SHORTLIST_FILE
    if not file.is_file():
        return None
    fix = "rebuild it with python -m mlx_dgemma.drafter.head, or delete it to draft over the whole vocabulary"
    try:
        arrays, metadata = cast(
            "tuple[dict[str, mx.array], dict[str, str]]", mx.load(str(file), return_metadata=True)
        )
    except (OSError, RuntimeError, ValueError) as e:
        raise DrafterError(f"cannot read {file} ({e}): {fix}") from None
    ids = arrays.get("ids")
    if ids is None or ids.ndim != 1 or ids.size == 0 or ids.dtype not in (mx.int32, mx.int64, mx.uint32):
        raise DrafterError(f"{file} holds no 1-D integer 'ids': {fix}")
    values = cast("list[int]", ids.tolist())
    if min(values) < 0 or max(values) >= vocab_size or len(set(values)) != len(values):
        raise DrafterError(f"{file}: its ids must be distinct and in [0, {vocab_size}): {fix}")
    flags = {k: metadata.get(k, d) for k, d in (("prompt", "true"), ("estimate_rest", "true"))}
    if any(v not in ("true", "false") for v in flags.values()):
        raise DrafterError(f"{file}: 'prompt' and 'estimate_rest' must be true or false (got {flags}): {fix}")
    return Shortlist(ids.astype(mx.int32), flags["prompt"] == "true", flags["estimate_rest"] == "true")


# ------------------------------------------------------------------------------------------------------------
# The head


def _rows(embedding: nn.Module, ids: mx.array) -> tuple[mx.array, ...]:
    """The embedding's rows ``ids`` as stored: (weight,) or, quantized, (weight, scales[, biases])."""
    if isinstance(embedding, nn.QuantizedEmbedding):
        biases = embedding.get("biases")
        parts = [embedding["weight"], embedding["scales"]] + ([biases] if biases is not None else [])
        return tuple(p[ids] for p in parts)
    return (embedding.weight[ids],)


def _matmul(embedding: nn.Module, x: mx.array, rows: tuple[mx.array, ...], transpose: bool) -> mx.array:
    """``x @ rows.T`` (``transpose``) or ``x @ rows``, for plain or quantized rows."""
    if isinstance(embedding, nn.QuantizedEmbedding):
        scales, biases = rows[1], rows[2] if len(rows) > 2 else None
        e = embedding
        return mx.quantized_matmul(
            x, rows[0], scales, biases, transpose=transpose, group_size=e.group_size, bits=e.bits, mode=e.mode
        )
    return x @ rows[0].T if transpose else x @ rows[0]


def _row_sum(embedding: nn.Module, rows: tuple[mx.array, ...]) -> mx.array:
    """The sum of ``rows`` in float32 [H], a chunk at a time."""
    total = None
    for start in range(0, rows[0].shape[0], SUM_CHUNK):
        chunk = tuple(r[start : start + SUM_CHUNK] for r in rows)
        dtype = chunk[1].dtype if len(chunk) > 1 else chunk[0].dtype
        part = _matmul(embedding, mx.ones((1, chunk[0].shape[0]), dtype=dtype), chunk, transpose=False)
        total = part.astype(mx.float32) if total is None else total + part.astype(mx.float32)
        mx.eval(total)
    assert total is not None
    return total[0]


class DraftHead:
    """The tied LM head over a few vocabulary ids: ``logits(h)`` [..., S] (float32, soft-capped as the target's),
    ``ids`` maps their index back to vocabulary ids, ``log_rest(h)`` estimates the other ids' log-mass."""

    def __init__(
        self,
        embedding: nn.Module,
        cap: float | None,
        ids: mx.array,
        estimate_rest: bool = True,
        total: mx.array | None = None,
    ):
        self.embedding, self.cap, self.estimate_rest = embedding, cap, estimate_rest
        self.ids = ids.astype(mx.int32)
        self.blocks = [_rows(embedding, self.ids)]
        self.vocab_size = int(embedding["weight"].shape[0])
        # The rest's mean row, for the estimate: (all rows' sum - these rows' sum) / rest (one pass at load).
        self.total = total if total is not None or not estimate_rest else self._all_rows_sum()
        self.held_sum = _row_sum(embedding, self.blocks[0]) if estimate_rest else None
        mx.eval(self.blocks)

    @classmethod
    def for_model(cls, model: Any, shortlist: Shortlist) -> DraftHead:
        return cls(
            model.model.decoder.embed_tokens,
            model.args.final_logit_softcapping,
            shortlist.ids,
            shortlist.estimate_rest,
        )

    def _all_rows_sum(self) -> mx.array:
        e = self.embedding
        parts = ("weight", "scales", "biases") if isinstance(e, nn.QuantizedEmbedding) else ("weight",)
        return _row_sum(e, tuple(e[p] for p in parts if e.get(p) is not None))

    def extended(self, extra: Iterable[int]) -> DraftHead:
        """This head plus the ``extra`` ids it lacks (a request's prompt tokens): their rows are gathered here,
        the shortlist's are shared, not copied."""
        have = set(cast("list[int]", self.ids.tolist()))
        new = sorted({i for i in extra if 0 <= i < self.vocab_size} - have)
        if not new:
            return self
        head = object.__new__(DraftHead)
        head.__dict__.update(self.__dict__)
        added = mx.array(new, dtype=mx.int32)
        head.blocks = [*self.blocks, _rows(self.embedding, added)]
        head.ids = mx.concatenate([self.ids, added])
        if self.held_sum is not None:
            head.held_sum = self.held_sum + _row_sum(self.embedding, head.blocks[-1])
        return head

    def logits(self, h: mx.array) -> mx.array:
        """Soft-capped float32 logits [..., S] over ``ids`` (the full head's, at those columns)."""
        parts = [_matmul(self.embedding, h, rows, transpose=True) for rows in self.blocks]
        raw = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)).astype(mx.float32)
        return softcap(raw, self.cap) if self.cap else raw

    def log_rest(self, h: mx.array) -> mx.array | None:
        """An estimate of log sum(exp(logit)) over the ids outside the head [...], or None (no estimate, or no
        rest). Jensen: rest · exp(mean logit) ≤ the rest's mass (before the soft-cap), so it is a floor: the
        confidence it gives lies between the shortlist's renormalised one and the full head's."""
        rest = self.vocab_size - self.ids.size
        if not self.estimate_rest or rest == 0 or self.total is None or self.held_sum is None:
            return None
        mean = (self.total - self.held_sum) / rest
        raw = (h.astype(mx.float32) @ mean[:, None])[..., 0]
        return (softcap(raw, self.cap) if self.cap else raw) + math.log(rest)


# ------------------------------------------------------------------------------------------------------------
# Command line: a shortlist for an existing drafter folder


def build_for_folder(
    drafter: Path, model: Any, tokenizer: Any, data: str, size: int, prompt: bool, limit: int | None = None
) -> tuple[Shortlist, float, int]:
    """Count the answer tokens of ``data``'s records (as training encodes them), build and save the shortlist of
    ``size`` in the ``drafter`` folder; (the shortlist, its coverage of the counted tokens, records read)."""
    from mlx_dgemma.drafter.data import examples, resolve
    from mlx_dgemma.request import eos_ids

    ends = eos_ids(model, tokenizer) | {model.args.pad_token_id or 0}
    counts: Counter[int] = Counter()
    records = 0
    for records, (_, example) in enumerate(
        examples(resolve(data), tokenizer, eos_ids(model, tokenizer), limit), 1
    ):
        counts.update(example.answer)
        if records % 1000 == 0:
            print(f"counted {records} records", file=sys.stderr, flush=True)
    if not records:
        raise DrafterError(f"{data} has no records: give the drafter's training data")
    ids = build_shortlist(counts, size, model.args.vocab_size, ends)
    share = coverage(counts, ids)
    shortlist = Shortlist(ids, prompt=prompt)
    info = {"records": str(records), "answer_tokens": str(sum(counts.values())), "coverage": f"{share:.6f}"}
    save_shortlist(drafter, shortlist, info)
    return shortlist, share, records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--drafter", type=Path, required=True, help="the drafter folder to give a shortlist")
    parser.add_argument("--data", required=True, help="its training records (file, folder or Hub dataset)")
    parser.add_argument("--size", type=int, required=True, help="tokens in the shortlist (e.g. 32768)")
    parser.add_argument("--model", default=None, help="its target (default: the folder above --drafter)")
    parser.add_argument(
        "--no-prompt-tokens",
        dest="prompt_tokens",
        action="store_false",
        help="requests draft the shortlist only (default: each also drafts its prompt's own tokens)",
    )
    parser.add_argument("--limit", type=int, default=None, help="count at most this many records")
    args = parser.parse_args(argv)

    from mlx_dgemma import load
    from mlx_dgemma.drafter.checkpoint import matches, read_config

    try:
        read_config(args.drafter)
        target = args.model or args.drafter.expanduser().resolve().parent
        if args.model is None and not (Path(target) / "config.json").is_file():
            raise DrafterError(f"{args.drafter} is not inside a model folder: give its target with --model")
        model, tokenizer = load(target)
        if not matches(args.drafter, model):
            raise DrafterError(f"the drafter in {args.drafter} was trained for another target than {target}")
        shortlist, share, records = build_for_folder(
            args.drafter, model, tokenizer, args.data, args.size, args.prompt_tokens, args.limit
        )
    except DGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.drafter / SHORTLIST_FILE}: {shortlist.ids.size} of {model.args.vocab_size} tokens, "
        f"{share:.2%} of the answer tokens of {records} records"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
