"""Fill-in-the-middle on the demo task: given the text before and after a gap in its own answer, does the model
write the middle it wrote unprompted, and what would an engine without infill write there?

    python -m benchmarks.fim [--model DIR] [--n 20] [--holes 4,8,16] [--seed 0] [--json PATH]
    python -m benchmarks.fim --n 2 --holes 4          # the smoke test's size (seconds)

The documents are the model's own answers to held-out items (``demo.task.split("test")`` of the task it was
trained for; item ``i`` with seed ``seed + i``, at the task's ``max_tokens``): what it wrote unprompted is what it
"knows", so a perfect infiller writes it back exactly. Each answer is cut once, at the same token for every hole
size: the hole starts at the answer's middle token (``len // 2``), moved earlier when needed so that at least
``MIN_SUFFIX`` (8) tokens follow the largest hole (answers too short for that are skipped and counted). For a hole
of ``k`` tokens starting there:

  prefix  the chat-templated prompt plus the answer before the hole, as text without ``<bos>`` (the raw
          ``prompt`` a completions client sends; the server's tokenizer adds the ``<bos>``)
  middle  the answer's ``k`` tokens at the hole, as text: the expected answer
  suffix  the rest of the answer, as text (its beginning only where hole + suffix would overflow one canvas)

``infill``: ``generate(prefix, max_tokens=budget, infill=FillInMiddle(suffix))``, what ``POST /v1/completions``
with ``suffix`` runs; ``plain``: the same prefix completed without the suffix, what an engine without infill
answers. Each runs with the hole's size as budget (``k``) and with an oversized hole (``2k``); the plain answers
are one run at the largest budget, truncated (the same tokens, see ``truncated``; checked against a run at each
budget on the first document). Same seed for every run of an item; the drafter is off throughout (infill turns it
off, so the others match).

Per row: exact match of the answer with the middle (both stripped), how often the answer starts with the middle
(and, in an oversized hole, more after it), how often it ends with it (text before it, the middle against the
suffix), its mean length in tokens, the decoder passes it took (a plain answer's: its one run's), how often it
ended with an end token (``finish_reason`` ``stop``) and how often it repeats the suffix's first ``ECHO`` (4)
tokens (text the document already has after the gap). The line under the table says how many documents are the
gold record (there the middle is also the gold answer's middle).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import mlx_dgemma  # first: on Linux it loads a fast BLAS before mlx
from benchmarks.model import progress
from demo import task

MIN_SUFFIX = 8  # tokens after the largest hole: enough context for the suffix to say something
ECHO = 4  # the suffix's first tokens: an answer containing them has written past the gap
HEADER = (
    "| hole k | budget | engine | cases | exact match | starts with middle | ends with middle | "
    "mean tokens | decoder passes | stop (end token) | repeats suffix |\n" + "|---" * 11 + "|"
)
FIGURES = ("exact", "starts", "ends", "mean_tokens", "passes", "stop", "echo")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    # 20 items: ~5 minutes on 2 x86 cores, most of it in the oversized holes (they run to the last step).
    parser.add_argument("--n", type=int, default=20, help="held-out items (default 20)")
    parser.add_argument(
        "--holes", default="4,8,16", help="hole sizes in tokens, comma-separated (default 4,8,16)"
    )
    parser.add_argument("--seed", type=int, default=0, help="item i uses seed + i (default 0)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure and answer here")
    args = parser.parse_args()
    args.holes = sorted({int(h) for h in args.holes.split(",")})
    if args.n < 1 or args.holes[0] < 1:
        parser.error("--n and every hole size must be positive")
    return args


def complete(model, tokenizer, prompt, budget: int, seed: int, **options: Any) -> dict[str, Any]:
    """One answer: its text, token ids and finish reason (from ``stream_generate``'s commits and ``Done``)."""
    from mlx_dgemma import Commit, Done, stream_generate

    ids: list[int] = []
    for event in stream_generate(model, tokenizer, prompt, budget, seed=seed, drafter="none", **options):
        if isinstance(event, Commit):
            ids += event.tokens
        elif isinstance(event, Done):
            reason, passes = event.finish_reason, event.stats.decoder_passes
            return {"text": event.answer, "tokens": len(ids), "reason": reason, "ids": ids, "passes": passes}
    raise AssertionError("stream_generate ended without Done")


def truncated(tokenizer, full: dict[str, Any], budget: int) -> dict[str, Any]:
    """The plain answer at ``budget`` from one run at a larger budget: canvases are always denoised whole and
    ``max_tokens`` only truncates (``decoding.block_loop``), so within one canvas the same seed gives the same
    tokens. It ends (``stop``) only if the end token came before ``budget``; checked on the first item."""
    ids = full["ids"][:budget]
    ended = full["reason"] == "stop" and len(full["ids"]) < budget
    reason = "stop" if ended else "length"
    return {**full, "text": tokenizer.decode(ids), "tokens": len(ids), "reason": reason, "ids": ids}


def own_answer(model, tokenizer, item: task.Item, seed: int) -> tuple[list[int], list[int], bool]:
    """The chat template's ids for the item, the model's unprompted answer's tokens, and whether it ended."""
    from mlx_dgemma import Commit, Done, stream_generate

    messages = [{"role": "user", "content": item.prompt}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    budget = task.max_tokens(model.args.canvas_length)
    answer, ended = [], False
    for event in stream_generate(model, tokenizer, messages, budget, seed=seed, drafter="none"):
        if isinstance(event, Commit):
            answer += event.tokens
        elif isinstance(event, Done):
            ended = event.finish_reason == "stop"
    return ids, answer, ended


def hole_start(length: int, largest: int) -> int | None:
    """Where every hole in an answer of ``length`` tokens starts (``None``: too short for the largest)."""
    start = min(length // 2, length - largest - MIN_SUFFIX)
    return start if start >= 0 else None


def text_between(tokenizer, tokens: list[int], a: int, b: int) -> str:
    """The text of ``tokens[a:b]`` as it reads in context: decoding a slice alone may drop a leading space."""
    before = tokenizer.decode(tokens[:a])
    whole = tokenizer.decode(tokens[:b])
    return whole[len(before) :] if whole.startswith(before) else tokenizer.decode(tokens[a:b])


def fitting_suffix(tokenizer, answer: list[int], end: int, room: int) -> tuple[str, bool]:
    """The answer's text from token ``end`` on, cut to its beginning if its tokens exceed ``room`` (the canvas
    beside the hole); and whether it was cut."""
    stop = len(answer)
    while stop > end + 1:
        suffix = text_between(tokenizer, answer, end, stop)
        if len(tokenizer.encode(suffix, add_special_tokens=False)) <= room:
            return suffix, stop < len(answer)
        stop -= 1
    return text_between(tokenizer, answer, end, stop), stop < len(answer)


def document(tokenizer, ids: list[int], answer: list[int], start: int) -> str:
    """The prefix as the raw completion prompt the server gets: template and answer so far, no ``<bos>``."""
    text = tokenizer.decode(ids + answer[:start])
    bos = tokenizer.bos_token or ""
    return text[len(bos) :] if bos and text.startswith(bos) else text


def score(result: dict[str, Any], middle: str, suffix_head: str) -> dict[str, Any]:
    """The per-run figures: exact, starts or ends with the middle, repeats the suffix's head, ended."""
    text, want = result["text"].strip(), middle.strip()
    return {
        **result,
        "exact": text == want,
        "starts": text.startswith(want),
        # Text before the middle, the middle against the suffix: an oversized hole filled from its right end.
        "ends": text.endswith(want),
        "echo": bool(suffix_head) and suffix_head in text,
        "stop": result["reason"] == "stop",
    }


def run_item(model, tokenizer, item: task.Item, seed: int, holes: list[int], check: bool) -> dict[str, Any]:
    """Every run of one item: the document, one plain completion of the prefix, then per hole size and budget
    the infill and the plain answer at that budget (``check``: also run the plain one at each budget)."""
    from mlx_dgemma.decoding.constrain import FillInMiddle

    ids, answer, ended = own_answer(model, tokenizer, item, seed)
    own = tokenizer.decode(answer).strip()
    record = {"seed": seed, "answer_tokens": len(answer), "ended": ended, "gold": own == item.answer}
    start = hole_start(len(answer), holes[-1])
    if not ended or start is None:
        return {**record, "skipped": "no end token" if not ended else "too short", "runs": []}
    prefix = document(tokenizer, ids, answer, start)
    retokenized = tokenizer.encode(prefix) == ids + answer[:start]  # as the server will encode it
    largest = 2 * holes[-1]
    plain = complete(model, tokenizer, prefix, largest, seed, use_chat_template=False)
    runs = []
    for k in holes:
        middle = text_between(tokenizer, answer, start, start + k)
        head = text_between(tokenizer, answer, start + k, start + k + ECHO).strip()
        for budget in (k, 2 * k):
            suffix, clipped = fitting_suffix(tokenizer, answer, start + k, model.args.canvas_length - budget)
            fim = FillInMiddle(suffix)
            infill = complete(model, tokenizer, prefix, budget, seed, use_chat_template=False, infill=fim)
            short = truncated(tokenizer, plain, budget)
            if check and budget < largest:  # the truncation is what a run at this budget answers
                direct = complete(model, tokenizer, prefix, budget, seed, use_chat_template=False)
                assert direct == short, (direct, short)
            for engine, out in (("infill", infill), ("plain", short)):
                case = {"k": k, "budget": budget, "engine": engine, "clipped": clipped, "middle": middle}
                runs.append({**case, **score(out, middle, head)})
    return {**record, "start": start, "prefix_retokenized": retokenized, "runs": runs}


def summarize(items: list[dict[str, Any]], holes: list[int]) -> list[dict[str, Any]]:
    """One row per hole size, budget and engine: the mean of each figure over the cases."""
    rows = []
    for k in holes:
        for budget in (k, 2 * k):
            for engine in ("infill", "plain"):
                cases = [
                    r
                    for item in items
                    for r in item["runs"]
                    if (r["k"], r["budget"], r["engine"]) == (k, budget, engine)
                ]
                row: dict[str, Any] = {"k": k, "budget": budget, "engine": engine, "cases": len(cases)}
                for name in FIGURES:
                    key = "tokens" if name == "mean_tokens" else name
                    row[name] = statistics.fmean(float(r[key]) for r in cases) if cases else float("nan")
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [HEADER]
    for r in rows:
        budget = f"{r['budget']} ({'k' if r['budget'] == r['k'] else '2k'})"
        rates = " | ".join(f"{r[name]:.0%}" for name in ("exact", "starts", "ends"))
        lines.append(
            f"| {r['k']} | {budget} | {r['engine']} | {r['cases']} | {rates} | {r['mean_tokens']:.1f} | "
            f"{r['passes']:.1f} | {r['stop']:.0%} | {r['echo']:.0%} |"
        )
    return "\n".join(lines)


def documents_line(items: list[dict[str, Any]]) -> str:
    used = [item for item in items if not item.get("skipped")]
    lengths = [item["answer_tokens"] for item in used] or [0]
    starts = [item["start"] for item in used] or [0]
    same = sum(item["prefix_retokenized"] for item in used)
    clipped = sum(r["clipped"] for item in used for r in item["runs"])
    return (
        f"documents: {len(used)} of {len(items)} items ({len(items) - len(used)} skipped); "
        f"{sum(item['gold'] for item in used)} are the gold record; answers of {min(lengths)}-{max(lengths)} "
        f"tokens (median {statistics.median(lengths):g}), holes start at token {statistics.median(starts):g} "
        f"(median); prefix re-encodes to the same tokens in {same}; suffixes cut to fit the canvas: "
        f"{clipped} runs"
    )


def main() -> int:
    args = parse_args()
    import mlx.core as mx

    from mlx_dgemma import load

    # This CPU multiplies bf16 ~10x slower than fp32: run in fp32 there (a Mac runs the stored bf16).
    model, tokenizer = load(args.model, mx.float32 if mx.default_device() == mx.cpu else None)
    if 2 * args.holes[-1] >= model.args.canvas_length:
        sys.exit(f"the oversized hole (2 x {args.holes[-1]}) must leave room for a suffix in the canvas")
    items = task.split("test", args.n, task.is_long(model.args.canvas_length))
    results = []
    for i, item in enumerate(items):
        progress(f"item {i + 1}/{len(items)}")
        checked = not any(r.get("runs") for r in results)  # the first document
        results.append(run_item(model, tokenizer, item, args.seed + i, args.holes, checked))
    rows = summarize(results, args.holes)
    print(table(rows))
    print()
    print(documents_line(results))
    if args.json:
        config = {"model": str(args.model or mlx_dgemma.DEFAULT_MODEL), "n": args.n, "holes": args.holes}
        config.update(seed=args.seed, min_suffix=MIN_SUFFIX, echo_tokens=ECHO)
        out = {"config": config, "rows": rows, "items": results}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
