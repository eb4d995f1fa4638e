"""The drafter on the demo model's held-out set: no drafter vs prompt lookup vs the bundled drafter.

    python -m demo.eval_drafter [--model PATH] [--drafter PATH] [--n 200] [--seed 0] [--json FILE]
                                [--confidence C ...] [--guard G ...] [--blind] [--unheld] [--split valid]

Settings: no drafter, prompt lookup, the drafter (default verification: a tenth of the draft re-noised, agreeing
drafted tokens held, at the confidence its folder records) and the drafter without re-noising; with
``--confidence``, the drafter drafting only positions it gives at least that probability; with ``--guard``, the
drafter under that stricter verification guard; with ``--blind``, blind verification (``VerifyConfig(blind=True)``:
the target's first pass never sees the draft); with ``--unheld``, verification that re-noises every position the
sampler does not accept (``VerifyConfig(hold=False)``), alone and with each ``--confidence``. Every setting answers
the same held-out records with the same seeds (paired); choose settings on ``--split valid``, report on test.
Reported per setting: exact match (95% Wilson interval), target decoder passes per canvas, tokens per forward,
wall time per canvas; then the paired difference in exact match against no drafter (with its 95% interval), the
drafter's time as a fraction of one target pass (both timed here, same process), and a projection for
google/diffusiongemma-26B-A4B-it from FLOPs and bytes at the measured passes per canvas.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)
from demo import task
from demo.eval import HEADER, EvalResult, evaluate


def paired_difference(a: list[bool], b: list[bool]) -> tuple[float, float, float]:
    """Mean of b - a over paired items and its 95% normal interval."""
    d = [int(y) - int(x) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(n - 1, 1))
    half = 1.96 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def time_pass(model, tokenizer, proposer, prompt: str, reps: int = 30) -> tuple[float, float]:
    """Seconds per target decoder pass and per drafter proposal, on the same cache (the first canvas)."""
    import mlx.core as mx

    from mlx_dgemma.decoding.block_loop import prefill
    from mlx_dgemma.request import encode_prompt

    cache = model.make_cache()
    cache.capture = proposer.capture
    prefill(model, mx.array([encode_prompt(tokenizer, prompt)]), cache)
    canvas = mx.zeros((1, model.args.canvas_length), dtype=mx.int32)

    def clock(fn) -> float:
        mx.eval(fn())
        start = time.perf_counter()
        for _ in range(reps):
            mx.eval(fn())
        return (time.perf_counter() - start) / reps

    def propose():
        proposer.begin([[]])
        return proposer.propose(model, cache).canvas

    return clock(lambda: model.denoise(canvas, cache)), clock(propose)


# The 26B projection's assumptions: an M-series Max (bytes/s, half-precision FLOP/s) and the released shapes.
BANDWIDTH, COMPUTE = 400e9, 30e12
CANVAS, HIDDEN, VOCAB = 256, 2816, 262_144
TARGET_ACTIVE, TARGET_TOTAL = (
    3.8e9,
    25.2e9,
)  # parameters: active per token, all (a 256-token canvas wakes every expert)
DRAFTER_PARAMS = 0.37e9  # 4 layers at hidden 2816 + the fusion of 6 target layers (docs/drafter.md), bf16
SHORTLIST = 32_768  # the draft vocabulary EAGLE-3 uses for autoregressive drafters (mlx_dgemma.drafter.head)
EMBED_BYTES = 0.56  # bytes per embedding weight: the 4.5-bit target's tied embedding, shared as the head
# The drafter's logits in float32 are written once and read by the argmax, the confidence and the top-k.
LOGIT_TRAFFIC = 4 * 4


def target_pass_seconds() -> float:
    """One 26B target pass over a 256-token canvas (a roofline: max of compute and weight streaming)."""
    flops = 2 * TARGET_ACTIVE * CANVAS + 2 * HIDDEN * VOCAB * CANVAS
    return max(flops / COMPUTE, TARGET_TOTAL * EMBED_BYTES / BANDWIDTH)


def drafter_seconds(head_rows: int = VOCAB) -> float:
    """One proposal of the 26B-size drafter whose head covers ``head_rows`` tokens (all of them, or a shortlist):
    its layers over the canvas plus the head's FLOPs; bytes: its bf16 weights, the head's embedding rows and the
    float32 logits' traffic."""
    flops = 2 * DRAFTER_PARAMS * CANVAS + 2 * HIDDEN * head_rows * CANVAS
    data = DRAFTER_PARAMS * 2 + head_rows * HIDDEN * EMBED_BYTES + CANVAS * head_rows * LOGIT_TRAFFIC
    return max(flops / COMPUTE, data / BANDWIDTH)


def projection(passes_none: float, passes_drafted: float, shortlist: int = SHORTLIST) -> str:
    """Per-canvas cost of the 26B target with and without a drafter (its full head, and a ``shortlist``-token
    head), from FLOPs and bytes: a projection (assumptions stated), not a measurement."""
    t_target = target_pass_seconds()
    none = passes_none * t_target
    parts = []
    for label, rows in (("full head", VOCAB), (f"shortlist of {shortlist:,}", shortlist)):
        t_drafter = drafter_seconds(rows)
        drafted = passes_drafted * t_target + t_drafter
        parts.append(
            f"drafter with its {label} {1000 * t_drafter:.1f} ms ({t_drafter / t_target:.1%} of a pass), "
            f"{1000 * drafted:.0f} ms a canvas ({none / drafted:.2f}x)"
        )
    return (
        f"26B projection (assumed {BANDWIDTH / 1e9:.0f} GB/s, {COMPUTE / 1e12:.0f} TFLOP/s, 4.5-bit target, "
        f"bf16 drafter): target pass {1000 * t_target:.0f} ms; per canvas {1000 * none:.0f} ms without a "
        f"drafter; at the measured passes: " + "; ".join(parts)
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="target (default: the embedded demo model)")
    parser.add_argument("--drafter", default="auto", help="drafter folder (default: the model's own)")
    parser.add_argument("--n", type=int, default=200, help="held-out records (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--confidence", type=float, nargs="*", default=[], help="also: confident drafts only")
    parser.add_argument("--guard", type=float, nargs="*", default=[], help="also: these verification guards")
    parser.add_argument("--blind", action="store_true", help="also: blind verification")
    parser.add_argument(
        "--unheld",
        action="store_true",
        help="also: unheld verification, VerifyConfig(hold=False) (with each --confidence too)",
    )
    parser.add_argument(
        "--split",
        choices=["valid", "test"],
        default="test",
        help="records to answer (default test; choose settings on valid)",
    )
    args = parser.parse_args()

    import mlx.core as mx

    from mlx_dgemma import load
    from mlx_dgemma.drafter import DrafterProposer, make_proposer

    # This CPU multiplies bf16 ~10x slower than fp32: evaluate in fp32 there (a Mac runs the stored bf16).
    model, tokenizer = load(args.model, mx.float32 if mx.default_device() == mx.cpu else None)
    items = task.split(args.split, args.n, task.is_long(model.args.canvas_length))
    drafter = make_proposer(args.drafter, model)
    if drafter is None:
        raise SystemExit("error: no drafter for this model: give --drafter PATH")
    from mlx_dgemma.decoding.verify import VerifyConfig
    from mlx_dgemma.errors import DGemmaError

    settings = {
        "no drafter": ("none", None),
        "prompt lookup": ("lookup", None),
        "drafter": (drafter, None),
        "drafter, no re-noising": (drafter, VerifyConfig(renoise=0.0)),
    }
    if args.confidence and not isinstance(drafter, DrafterProposer):
        raise SystemExit(f"error: --confidence needs a trained drafter (got {args.drafter!r})")
    try:
        for c in args.confidence:
            settings[f"drafter, confidence {c:g}"] = (DrafterProposer(drafter.drafter, confidence=c), None)
        for g in args.guard:
            settings[f"drafter, guard {g:g}"] = (drafter, VerifyConfig(guard=g))
        if args.blind:
            settings["drafter, blind"] = (drafter, VerifyConfig(blind=True))
        if args.unheld:
            settings["drafter, unheld"] = (drafter, VerifyConfig(hold=False))
            for c in args.confidence:
                settings[f"drafter, confidence {c:g}, unheld"] = (
                    DrafterProposer(drafter.drafter, confidence=c),
                    VerifyConfig(hold=False),
                )
    except DGemmaError as e:
        raise SystemExit(f"error: {e}") from None
    results: dict[str, EvalResult] = {}
    hits: dict[str, list[bool]] = {}
    for label, (spec, verify) in settings.items():
        results[label] = evaluate(model, tokenizer, items, label, args.seed, drafter=spec, verify=verify)
        hits[label] = results[label].hits
    print(HEADER)
    for result in results.values():
        print(result.row())
    base = results["no drafter"]
    for label in list(settings)[1:]:
        mean, low, high = paired_difference(hits["no drafter"], hits[label])
        ratio = (base.decoder_passes / base.canvases) / (
            results[label].decoder_passes / results[label].canvases
        )
        speed = (base.seconds / base.canvases) / (results[label].seconds / results[label].canvases)
        print(
            f"{label}: exact match {mean:+.1%} vs no drafter (95% CI {low:+.1%} to {high:+.1%}); "
            f"{ratio:.2f}x fewer target passes, {speed:.2f}x wall time"
        )
    t_pass, t_draft = time_pass(model, tokenizer, drafter, items[0].prompt)
    print(
        f"drafter proposal {1000 * t_draft:.2f} ms = {t_draft / t_pass:.0%} of a target decoder pass "
        f"({1000 * t_pass:.2f} ms), measured here"
    )
    d = results["drafter"]
    print(projection(base.decoder_passes / base.canvases, d.decoder_passes / d.canvases))
    if args.json:
        figures: dict = {label: r.summary() for label, r in results.items()}
        figures["drafter_fraction_of_pass"] = t_draft / t_pass
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
