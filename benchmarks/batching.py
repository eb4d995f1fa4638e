"""Continuous batching against serving one request at a time: throughput, latency, decoder work, the cost of a
batched pass, and a 26B projection.

    python -m benchmarks.batching                  # demo model + tenth-scale checkpoint (~15 minutes on 2 cores)
    python -m benchmarks.batching --quick          # 1, 2, 4 requests, demo model only, short answers (~1 minute)
    python -m benchmarks.batching --skip-tenth --json batching.json   # no tenth scale (building it needs torch)

(a) End to end. N requests (1, 2, 4, 8, 16) arrive at once, each with its own held-out prompt of the demo task
    (``demo.task.split("test")``) and seed (request i: ``--seed`` + i). Served in one ``Batch`` (one decoder pass
    for every running request) against the same requests served one at a time, in arrival order, each latency
    including the wait for those before it. The one-at-a-time side runs once over the largest N and is read at
    each N over its first N requests (they are served before any later one, so they do not depend on it).
    Per side: aggregate committed tokens per second (every answer's committed tokens over the wall time until the
    last answer ends), per-request latency p50/p95 and time to the first committed canvas (from the common
    arrival), requests per decoder pass and decoder positions per pass. Then how many batched answers differ
    from the same request served alone (every commit's tokens and the text): it should be 0. Each setting
    starts with an untimed warm-up (one request alone, two together).
    On the demo model (``mlx_dgemma.DEFAULT_MODEL``; ``--model`` another): reference, fast, drafter and fast +
    drafter (the drafter the model folder bundles, one proposer object shared by every request, as the server
    shares it). On the tenth-scale random checkpoint of ``benchmarks.model`` (canvas 256, vocab 32K; built with
    the torch reference in ``--tenth``; ``--skip-tenth`` leaves it out): reference and fast, no drafter (it has
    none), one canvas of ``--tenth-steps`` denoising steps per request over a random prompt of ``--tenth-prompt``
    ids (a random model's answer is noise; what counts is the work).
(b) One ``Model.denoise_rows`` pass over 1..16 rows, each row its own request (its own cache over its own random
    prompt): full-canvas rows with self-conditioning logits (a reference pass) and fast mode's small passes (16,
    32 and 64 positions a row over stale keys/values, built as tests/api/test_batching.py builds them), each the
    median of ``--reps`` timed calls (``mx.eval``) after a warm-up call.
(c) A roofline projection for google/diffusiongemma-26B-A4B-it on an M-series Max, with ``benchmarks.fast``'s
    pass model and assumptions (printed), at R rows in every pass: the measured decoder positions and committed
    tokens per row-pass of (a) on the demo model, scaled to the 256-token canvas as ``benchmarks.fast`` scales
    them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)
from benchmarks import fast as fast_bench
from benchmarks import model as bench
from demo import task

COUNTS = (1, 2, 4, 8, 16)
QUICK_COUNTS = (1, 2, 4)
SMALL_POSITIONS = (16, 32, 64)  # positions a row in (b)'s fast-mode passes
QUICK_MAX_TOKENS = 48  # --quick: one canvas, a short answer
DEMO_SETTINGS = {  # label: (fast, drafter), labelled as benchmarks.fast labels them
    "reference": (False, "none"),
    "fast": (True, "none"),
    "drafter": (False, "auto"),
    "fast + drafter": (True, "auto"),
}
TENTH_SETTINGS = {
    "reference": (False, "none"),
    "fast": (True, "none"),
}  # the random checkpoint has no drafter

# (c): each request reads its own KV cache, which the pass model of benchmarks.fast (one request) leaves out.
# The released 26B's attention (docs: /work/shared/notes/architecture.md): 25 sliding layers with 8 key/value
# heads of 256, 5 full layers with 2 heads of 512 whose keys are the values; bf16 keys/values.
SLIDING_LAYERS, FULL_LAYERS = 25, 5
KV_BYTES_PER_KEY = (SLIDING_LAYERS * 8 * 256 * 2 + FULL_LAYERS * 2 * 512) * 2
KV_ROW_BYTES = KV_BYTES_PER_KEY * fast_bench.KV_LEN  # one request's cache read by one pass
PROJECTION_SAMPLES = 2000  # random draws of R passes per row count in (c)
FAST_TOPK = 64  # fast mode's top-k self-conditioning and sampler (FastConfig's default), as benchmarks.fast


class IdTokenizer:
    """The random checkpoint has no tokenizer: answers are shown as their ids (enough for ``generation.run``)."""

    eos_token_ids = ()

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


# ---------------------------------------------------------------------------------------------------------
# (a) end to end


@dataclass
class Served:
    """One request as it was served: seconds from the common arrival to its first commit and to its end, every
    commit's tokens, and its final ``Done``."""

    start: float
    first_commit_s: float | None = None
    latency_s: float = 0.0
    commits: list[list[int]] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)  # decoder positions of each of its passes
    done: Any = None

    def on(self, event: Any) -> None:
        from mlx_dgemma.generation import Commit, Done

        if isinstance(event, Exception):  # Batch.step hands a failed request's exception on as its event
            raise event
        now = time.perf_counter() - self.start
        if isinstance(event, Commit):
            self.commits.append(event.tokens)
            if self.first_commit_s is None:
                self.first_commit_s = now
        elif isinstance(event, Done):
            self.done, self.latency_s = event, now

    def same_answer(self, other: Served) -> bool:
        return self.commits == other.commits and self.done.answer == other.done.answer


def serve_batched(model, tokenizer, requests: list) -> tuple[list[Served], int, int]:
    """Every request in one ``Batch`` from the same instant: each one's record, the passes run and the rows
    (requests) they carried."""
    from mlx_dgemma.batching import Batch
    from mlx_dgemma.generation import run_steps

    batch = Batch(model, tokenizer)
    start = time.perf_counter()
    served = {}
    for request in requests:
        one = Served(start)
        served[batch.join(recorded(run_steps(model, tokenizer, request), one.passes))] = one
    while len(batch):
        for request_id, event in batch.step():
            served[request_id].on(event)
    return list(served.values()), batch.passes, batch.rows


def serve_serial(model, tokenizer, requests: list) -> list[Served]:
    """The requests one at a time, in order, all arrived at the first one's start."""
    from mlx_dgemma.decoding.canvas import solo
    from mlx_dgemma.generation import run_steps

    start = time.perf_counter()
    served = []
    for request in requests:
        served.append(Served(start))
        # generation.run(model, tokenizer, request) is solo(model, run_steps(...)): the same, passes recorded
        for event in solo(model, recorded(run_steps(model, tokenizer, request), served[-1].passes)):
            served[-1].on(event)
    return served


def recorded(steps, passes: list[int]):
    """``steps`` (a generator of the canvas loop) as it is, the positions of each decoder pass it asks for
    appended to ``passes``. Its driver sets each ``Pass``'s result on the object itself, so passing it on is
    enough."""
    from mlx_dgemma.decoding.canvas import Pass

    try:
        for item in steps:
            if isinstance(item, Pass):
                passes.append(item.canvas.size)
            yield item
    finally:
        steps.close()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))  # linear interpolation between the closest ranks, numpy's default


def side(served: list[Served], seconds: float, passes: int, rows: int) -> dict:
    """The figures of one side (batched or one at a time) over ``served``."""
    stats = [s.done.stats for s in served]
    tokens = sum(s.generated_tokens for s in stats)
    latency = [s.latency_s for s in served]
    first = [s.first_commit_s for s in served if s.first_commit_s is not None]
    return {
        "requests": len(served),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "first_canvas_p50_s": percentile(first, 50) if first else None,
        "first_canvas_p95_s": percentile(first, 95) if first else None,
        "decoder_passes": passes,
        "requests_per_pass": rows / passes,
        "positions_per_pass": sum(s.decoder_positions for s in stats) / passes,
        "positions_per_row_pass": sum(s.decoder_positions for s in stats) / rows,
        "tokens_per_row_pass": tokens / rows,
    }


def end_to_end(
    model, tokenizer, prompts: list, label: str, options: dict, counts, seed: int
) -> tuple[list[dict], list[Served]]:
    """(a) for one setting: the one-at-a-time side once over the largest N, then one batch at each N. Returns
    the table's rows and the one-at-a-time records (each request's work alone)."""
    from mlx_dgemma.request import prepare

    def requests(n: int) -> list:  # prepared before the clock starts, as the server prepares on arrival
        return [prepare(model, tokenizer, p, seed=seed + i, **options) for i, p in enumerate(prompts[:n])]

    bench.progress(f"{label}: warm-up")  # untimed: a pass alone and one over rows, each size's first buffers
    serve_serial(model, tokenizer, requests(1))
    serve_batched(model, tokenizer, requests(min(2, max(counts))))
    bench.progress(f"{label}: {max(counts)} requests one at a time")
    serial = serve_serial(model, tokenizer, requests(max(counts)))
    rows = []
    for n in counts:
        bench.progress(f"{label}: {n} requests in one batch")
        batched, passes, carried = serve_batched(model, tokenizer, requests(n))
        alone = serial[:n]
        passes_alone = sum(s.done.stats.decoder_passes for s in alone)  # each pass carried one request
        one = side(alone, alone[-1].latency_s, passes_alone, passes_alone)
        many = side(batched, max(s.latency_s for s in batched), passes, carried)
        rows.append(
            {
                "setting": label,
                "requests": n,
                "batched": many,
                "serial": one,
                "speedup": many["tokens_per_s"] / one["tokens_per_s"],
                "differing": sum(not b.same_answer(s) for b, s in zip(batched, alone)),
            }
        )
    return rows, serial


E2E_HEADER = (
    "| setting | requests | tokens/s batched | tokens/s one at a time | batched / one at a time | "
    "latency p50 (s) b / 1 | latency p95 (s) b / 1 | first canvas p50 (s) b / 1 | "
    "first canvas p95 (s) b / 1 | requests / pass b | positions / pass b / 1 | differing answers |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def e2e_table(rows: list[dict]) -> str:
    def pair(row: dict, key: str, fmt: str = "{:.2f}") -> str:
        return " / ".join(fmt.format(row[s][key]) for s in ("batched", "serial"))

    lines = [E2E_HEADER]
    for r in rows:
        b, s = r["batched"], r["serial"]
        lines.append(
            f"| {r['setting']} | {r['requests']} | {b['tokens_per_s']:.0f} | {s['tokens_per_s']:.0f} | "
            f"{r['speedup']:.2f}x | {pair(r, 'latency_p50_s')} | {pair(r, 'latency_p95_s')} | "
            f"{pair(r, 'first_canvas_p50_s')} | {pair(r, 'first_canvas_p95_s')} | "
            f"{b['requests_per_pass']:.2f} | {pair(r, 'positions_per_pass', '{:.0f}')} | {r['differing']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# (b) one batched pass


def pass_growth(model, counts, reps: int, prompt_len: int) -> list[dict]:
    """Median seconds of one ``Model.denoise_rows`` call over R rows, full-canvas and small (fast) passes."""
    import mlx.core as mx

    from mlx_dgemma.decoding.canvas import Pass
    from mlx_dgemma.model.cache import StaleKV

    C, V = model.args.canvas_length, model.args.vocab_size
    n = max(counts)

    def ids(shape, i: int) -> mx.array:
        return mx.random.randint(
            bench.FIRST_FREE_ID, V - bench.FIRST_FREE_ID, shape, key=mx.random.key(i)
        ).astype(mx.int32)

    caches = []
    for i in range(n):  # each row its own request: its own prompt in its own cache
        cache = model.make_cache()
        model.encode(ids((1, prompt_len), i), cache)
        caches.append(cache)
    canvases = [ids((1, C), 1000 + i) for i in range(n)]
    sc_logits = [
        bench.SC_LOGITS_STD * mx.random.normal((1, C, V), key=mx.random.key(2000 + i)) for i in range(n)
    ]

    def full(i: int, _: int) -> Pass:
        return Pass(canvases[i], caches[i], sc_logits[i])

    def small(i: int, size: int) -> Pass:
        pos = mx.sort(mx.random.permutation(C, key=mx.random.key(3000 + i))[:size]).astype(mx.int32)[None]
        tokens = mx.take_along_axis(canvases[i], pos, axis=1)
        return Pass(tokens, caches[i], positions=pos, stale=StaleKV(C), capped=False)

    kinds = [("full", C, full)] + [(f"{p} positions", p, small) for p in SMALL_POSITIONS if p < C]
    out = []
    for kind, size, make in kinds:
        for rows in counts:
            bench.progress(f"denoise_rows: {rows} x {kind}")
            passes = [make(i, size) for i in range(rows)]
            times = bench.repeat_seconds(lambda passes=passes: mx.eval(model.denoise_rows(passes)), reps)
            out.append(
                {
                    "kind": kind,
                    "positions_per_row": size,
                    "rows": rows,
                    "positions": rows * size,
                    "pass_s": statistics.median(times),
                    "times": times,
                }
            )
    for r in out:  # against one row of the same kind: the time ratio and the rows/s gain over one at a time
        one = next(x for x in out if x["kind"] == r["kind"] and x["rows"] == 1)["pass_s"]
        r["vs_one_row"] = r["pass_s"] / one
        r["gain"] = r["rows"] / r["vs_one_row"]
    return out


def growth_table(growth: list[dict], columns: str = "ms / pass | ms / row | rows/s gain", cells=None) -> str:
    """One row per batch size, ``columns`` for each pass kind (``cells(r)`` writes them for one measurement)."""

    def measured(r: dict) -> str:
        return f"{1000 * r['pass_s']:.0f} | {1000 * r['pass_s'] / r['rows']:.0f} | {r['gain']:.2f}x"

    cells = cells or measured
    kinds = list(dict.fromkeys(r["kind"] for r in growth))
    sizes = {r["kind"]: r["positions_per_row"] for r in growth}
    width = columns.count("|") + 1
    head = " | ".join(f"{k} ({sizes[k]} / row): {columns}" for k in kinds)
    lines = [f"| rows | {head} |", "|---|" + "---|" * width * len(kinds)]
    for rows in dict.fromkeys(r["rows"] for r in growth):
        row = [cells(next(x for x in growth if x["kind"] == k and x["rows"] == rows)) for k in kinds]
        lines.append(f"| {rows} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# (c) the 26B projection

# benchmarks.fast's hardware assumptions are its projection()'s defaults: read there, not copied.
_DEFAULTS = inspect.signature(fast_bench.projection).parameters
BANDWIDTHS: tuple[float, ...] = _DEFAULTS["bandwidths"].default
COMPUTE: float = _DEFAULTS["compute"].default


def batched_pass(positions: int, rows: int, fast: bool, bandwidth: float) -> tuple[float, bool]:
    """Seconds of one 26B pass over ``rows`` requests holding ``positions`` in all, and whether compute bounds it:
    the weights their tokens wake stream once (``benchmarks.fast.pass_cost`` over all the positions), each row
    reads its own cache."""
    flops, nbytes = fast_bench.pass_cost(positions, fast, FAST_TOPK if fast else 0)
    compute, memory = flops / COMPUTE, (nbytes + rows * KV_ROW_BYTES) / bandwidth
    return max(compute, memory), compute > memory


def projection(work: dict[str, dict], canvas: int, counts, samples: int = PROJECTION_SAMPLES) -> dict:
    """Aggregate tokens/s of R rows in every pass, each row a request at a random pass of its own: R of a
    setting's measured passes (their positions scaled to the 26B canvas) drawn at random, ``samples`` times."""
    scale = fast_bench.C26 / canvas
    out: dict = {
        "bandwidths_gb_s": [b / 1e9 for b in BANDWIDTHS],
        "compute_tflop_s": COMPUTE / 1e12,
        "kv_row_bytes": KV_ROW_BYTES,
        "samples": samples,
        "settings": {},
    }
    for label, w in work.items():
        positions = np.minimum(np.rint(np.array(w["pass_positions"]) * scale), fast_bench.C26).astype(int)
        tokens = w["tokens_per_row_pass"] * scale
        by_bandwidth = {}
        for bandwidth in BANDWIDTHS:
            rng = np.random.default_rng(0)  # the same draws at each bandwidth
            cells = []
            for rows in counts:
                draws = rng.choice(positions, size=(samples, rows)).sum(axis=1)
                passes = [batched_pass(int(p), rows, w["fast"], bandwidth) for p in draws]
                seconds = statistics.mean(t for t, _ in passes)
                cells.append(
                    {
                        "rows": rows,
                        "pass_ms": 1000 * seconds,
                        "compute_bound_share": statistics.mean(bound for _, bound in passes),
                        "tokens_per_s": rows * tokens / seconds,
                    }
                )
            by_bandwidth[f"{bandwidth / 1e9:.0f}"] = cells
        out["settings"][label] = {
            "positions_per_row_pass": float(positions.mean()),
            "tokens_per_row_pass": tokens,
            "by_gb_s": by_bandwidth,
        }
    return out


def projected_growth(counts) -> list[dict]:
    """(b)'s pass kinds on the 26B roofline at the first bandwidth: R full-canvas rows (dense self-conditioning)
    and R rows of 16, 32 or 64 positions (fast mode's sparse passes)."""
    out = []
    for kind, size, fast in [("full", fast_bench.C26, False)] + [
        (f"{p} positions", p, True) for p in SMALL_POSITIONS
    ]:
        one, _ = batched_pass(size, 1, fast, BANDWIDTHS[0])
        for rows in counts:
            seconds, compute = batched_pass(rows * size, rows, fast, BANDWIDTHS[0])
            out.append(
                {
                    "kind": kind,
                    "positions_per_row": size,
                    "rows": rows,
                    "pass_s": seconds,
                    "compute_bound": compute,
                    "gain": rows * one / seconds,
                }
            )
    return out


def projected_growth_table(growth: list[dict]) -> str:
    def projected(r: dict) -> str:
        bound = "compute" if r["compute_bound"] else "memory"
        return f"{1000 * r['pass_s']:.0f} | {r['gain']:.2f}x | {bound}"

    return growth_table(growth, "ms / pass | rows/s gain | bound", projected)


def projection_text(proj: dict, canvas: int, counts) -> str:
    f = fast_bench
    lines = [
        "PROJECTION, not a measurement. Assumed, as benchmarks.fast's roofline: an M-series Max, "
        f"{proj['compute_tflop_s']:.0f} TFLOP/s fp16, {' / '.join(f'{b:.0f}' for b in proj['bandwidths_gb_s'])} "
        f"GB/s, {f.BITS}-bit weights; the 26B-A4B shapes (hidden {f.H}, {f.LAYERS} layers, {f.EXPERTS} experts "
        f"top-{f.TOP_K} of width 704, {f.DENSE_PARAMS / 1e9:.2f}B dense parameters, vocab {f.V}, canvas {f.C26}), "
        f"uniform routing, {f.KV_LEN} keys per query; a pass costs max(FLOPs / compute, bytes / bandwidth). "
        "Batched: the FLOPs of every row's positions, the weights their tokens wake streamed once for all rows, "
        f"and (added here) each row's own cache read ({KV_ROW_BYTES / 1e6:.0f} MB: bf16 keys/values of "
        f"{SLIDING_LAYERS} sliding layers with 8 heads of 256 and {FULL_LAYERS} full layers with 2 heads of 512, "
        f"{f.KV_LEN} keys). R rows in every pass (a steady load), each row a request at a random pass of its own: "
        f"R of the setting's measured passes drawn at random ({proj['samples']} draws; every decoder pass of the "
        f"requests served alone in (a) on the demo model, its positions scaled from its canvas of {canvas} to "
        f"{f.C26}); committed tokens per row-pass as measured, scaled alike. The drafter's own forward is not "
        "counted (as in benchmarks.fast).",
        "",
        "| setting | GB/s | positions / row-pass | tokens / row-pass | "
        + " | ".join(f"tok/s, {r} row{'s' if r > 1 else ''}" for r in counts)
        + f" | {counts[-1]} rows / 1 row | passes compute-bound, 1 / {counts[-1]} rows |",
        "|---|---|---|---|" + "---|" * (len(counts) + 2),
    ]
    for label, s in proj["settings"].items():
        for gb, rows in s["by_gb_s"].items():
            lines.append(
                f"| {label} | {gb} | {s['positions_per_row_pass']:.0f} | {s['tokens_per_row_pass']:.1f} | "
                + " | ".join(f"{r['tokens_per_s']:.0f}" for r in rows)
                + f" | {rows[-1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x | "
                f"{rows[0]['compute_bound_share']:.0%} / {rows[-1]['compute_bound_share']:.0%} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------


def machine() -> dict:
    import mlx.core as mx

    return {
        "cpu": bench.cpu_model(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.machine()}",
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "openblas": bench.openblas_mapped(),
        "load_average": os.getloadavg(),
    }


def run_model(
    model, tokenizer, prompts, settings, options, counts, args
) -> tuple[list[dict], list[dict], dict]:
    """(a) for every setting, then (b), on one model; and each setting's work per pass alone (for (c))."""
    from mlx_dgemma.drafter import make_proposer

    rows, work = [], {}
    for label, (fast, drafter) in settings.items():
        proposer = make_proposer(drafter, model)  # one for every request, as the server has one
        setting = {**options, "fast": fast, "drafter": proposer if proposer is not None else "none"}
        table, serial = end_to_end(model, tokenizer, prompts, label, setting, counts, args.seed)
        rows += table
        positions = [p for s in serial for p in s.passes]
        tokens = sum(s.done.stats.generated_tokens for s in serial)
        work[label] = {
            "fast": fast,
            "pass_positions": positions,
            "tokens_per_row_pass": tokens / len(positions),
        }
    growth = pass_growth(model, counts, args.reps, args.growth_prompt)
    return rows, growth, work


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1, 2, 4 requests, demo model only, short answers"
    )
    parser.add_argument("--model", default=None, help="the demo target (default: the embedded demo model)")
    parser.add_argument(
        "--skip-tenth", action="store_true", help="leave out the tenth-scale random checkpoint"
    )
    parser.add_argument(
        "--tenth", type=Path, default=Path("/tmp/bench-tenth"), help="its folder (built there if missing)"
    )
    parser.add_argument(
        "--tenth-steps", type=int, default=2, help="denoising steps of its canvas (default 2)"
    )
    parser.add_argument(
        "--tenth-prompt", type=int, default=64, help="its random prompts' length (default 64)"
    )
    parser.add_argument(
        "--growth-prompt", type=int, default=64, help="prompt length of (b)'s rows (default 64)"
    )
    parser.add_argument("--reps", type=int, default=3, help="timed calls per pass size in (b) (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="request i has seed + i (default 0)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = parser.parse_args(argv)
    for name in ("tenth_steps", "tenth_prompt", "growth_prompt", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    if args.seed < 0:
        parser.error("--seed must be 0 or more")
    if args.quick:
        args.skip_tenth = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mlx.core as mx

    from mlx_dgemma import load, load_model

    counts = QUICK_COUNTS if args.quick else COUNTS
    # This CPU multiplies bf16 ~10x slower than fp32: evaluate in fp32 there (a Mac runs the stored bf16).
    dtype = mx.float32 if mx.default_device() == mx.cpu else None
    figures: dict = {
        "config": {
            **{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "counts": counts,
        },
        "machine": {**machine(), "other_runnable_before": bench.other_runnable()},
    }
    started = time.perf_counter()

    model, tokenizer = load(args.model, dtype)
    C = model.args.canvas_length
    items = task.split("test", max(counts), task.is_long(C))
    max_tokens = QUICK_MAX_TOKENS if args.quick else task.max_tokens(C)
    demo_rows, demo_growth, work = run_model(
        model, tokenizer, [i.prompt for i in items], DEMO_SETTINGS, {"max_tokens": max_tokens}, counts, args
    )
    figures["demo"] = {"model": str(args.model or "default"), "canvas": C, "max_tokens": max_tokens}
    figures["demo"] |= {"end_to_end": demo_rows, "pass_growth": demo_growth}
    figures["demo"]["passes_alone"] = {  # (c)'s input: how many passes of each size, per setting
        label: {**w, "pass_positions": dict(sorted(Counter(w["pass_positions"]).items()))}
        for label, w in work.items()
    }

    tenth = None
    if not args.skip_tenth:
        spec = bench.build_spec(argparse.Namespace(spec=None, size="tenth", prompt_len=None))
        bench.ensure_checkpoint(spec, args.tenth)
        big = load_model(args.tenth / "hf", dtype=dtype)
        V = big.args.vocab_size
        rng = np.random.default_rng(args.seed)
        prompts = [
            rng.integers(bench.FIRST_FREE_ID, V - bench.FIRST_FREE_ID, args.tenth_prompt).tolist()
            for _ in range(max(counts))
        ]
        options = {"max_tokens": big.args.canvas_length, "max_denoising_steps": args.tenth_steps}
        rows, growth, _ = run_model(big, IdTokenizer(), prompts, TENTH_SETTINGS, options, counts, args)
        tenth = {
            "spec": spec["text"],
            "canvas": big.args.canvas_length,
            "end_to_end": rows,
            "pass_growth": growth,
        }
        tenth |= {"steps": args.tenth_steps, "prompt": args.tenth_prompt}
    figures["tenth"] = tenth

    proj = projection(work, C, COUNTS)
    proj["pass_growth"] = projected_growth(COUNTS)
    figures["projection"] = proj
    compared = sum(r["requests"] for r in demo_rows + (tenth["end_to_end"] if tenth else []))
    differing = sum(r["differing"] for r in demo_rows + (tenth["end_to_end"] if tenth else []))
    figures["compared_answers"], figures["differing_answers"] = compared, differing
    figures["machine"]["other_runnable_after"] = bench.other_runnable()
    figures["seconds"] = time.perf_counter() - started
    print(report(figures, counts))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def report(figures: dict, counts) -> str:
    m, demo, tenth = figures["machine"], figures["demo"], figures["tenth"]
    dtype = "fp32" if m["device"].startswith("Device(cpu") else "the stored dtype"
    out = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m['system']}, mlx {m['mlx']} on {m['device']}, {dtype}, "
        f"OpenBLAS {'yes' if m['openblas'] else 'NO'}; {m['other_runnable_before']:.1f} / "
        f"{m['other_runnable_after']:.1f} other runnable tasks before / after; {figures['seconds']:.0f} s in all",
        "",
        f"## (a) End to end, demo model (canvas {demo['canvas']}, max_tokens {demo['max_tokens']}): "
        f"{', '.join(map(str, counts))} requests at once, batched (b) against one at a time (1)\n",
        e2e_table(demo["end_to_end"]),
        "",
    ]
    if tenth:
        out += [
            f"## (a) End to end, tenth-scale random checkpoint (canvas {tenth['canvas']}, vocab "
            f"{tenth['spec']['vocab_size']}, one canvas of {tenth['steps']} steps, prompts of {tenth['prompt']} "
            "random ids)\n",
            e2e_table(tenth["end_to_end"]),
            "",
        ]
    out += [
        f"Batched answers differing from the same request alone: {figures['differing_answers']} of "
        f"{figures['compared_answers']}",
        "",
        f"## (b) One Model.denoise_rows pass over R rows, demo model (canvas {demo['canvas']}): "
        f"median of {figures['config']['reps']} after a warm-up\n",
        growth_table(demo["pass_growth"]),
        "",
    ]
    if tenth:
        out += [
            f"## (b) One Model.denoise_rows pass over R rows, tenth-scale random checkpoint (canvas "
            f"{tenth['canvas']}, vocab {tenth['spec']['vocab_size']}): median of {figures['config']['reps']} after "
            "a warm-up\n",
            growth_table(tenth["pass_growth"]),
            "",
        ]
    out += [
        "rows/s gain: R rows in one pass against R passes of one row (R x one row's time / the R-row time).",
        "",
        "## (c) Projection for google/diffusiongemma-26B-A4B-it on an M-series Max (not measured)\n",
        projection_text(figures["projection"], demo["canvas"], COUNTS),
        "",
        f"One pass over R rows on that roofline at {BANDWIDTHS[0] / 1e9:.0f} GB/s ((b)'s kinds at the 26B's "
        "canvas; rows/s gain as in (b)):\n",
        projected_growth_table(figures["projection"]["pass_growth"]),
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
