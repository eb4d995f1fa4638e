"""The drafter's verification knobs one by one (``VerifyConfig``), on the long demo's held-out records, paired.

    python -m benchmarks.drafter_knobs --split valid --n 60          # choose on valid
    python -m benchmarks.drafter_knobs --split test --n 150 --only none all "fast + all"

Settings: no drafter; the drafter with every knob of issue 30 off (the verification before it); each knob added in
turn (``condition``: the draft's distribution self-conditions the first pass; ``draft_ends``; ``seed_guesses``: the
drafter's unsure guesses seed the stability history; ``settle``: sure, reproduced positions spend no entropy
budget), which ends at today's default; the default without each knob; fast mode with and without the drafter.
Per setting: exact match (95% Wilson interval), paired difference against no drafter, target passes per canvas.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)
from demo import task
from demo.eval import EvalResult, evaluate
from demo.eval_drafter import paired_difference

KNOBS = ("condition", "draft_ends", "seed_guesses", "settle")


def settings() -> dict[str, dict[str, Any]]:
    """Label -> ``stream_generate`` options (``"drafter"`` marks the bundled drafter; verify as a dict)."""
    off = dict.fromkeys(KNOBS, False)
    out: dict[str, dict[str, Any]] = {"none": {"drafter": "none"}, "knobs off": {"verify": off}}
    on: dict[str, bool] = dict(off)
    for knob in KNOBS:
        on = {**on, knob: True}
        out["+ " + knob] = {"verify": dict(on)}
    out["all"] = {"verify": {}}
    for knob in KNOBS:
        out[f"all but {knob}"] = {"verify": {knob: False}}
    out["fast"] = {"drafter": "none", "fast": True}
    out["fast + knobs off"] = {"verify": off, "fast": True}
    out["fast + all"] = {"verify": {}, "fast": True}
    return out


def run(model: Any, tokenizer: Any, items: list, label: str, spec: dict[str, Any], seed: int) -> EvalResult:
    """One setting over ``items`` (``demo.eval.evaluate``), the bundled drafter unless the setting says none."""
    from mlx_dgemma.decoding.verify import VerifyConfig

    options = {k: v for k, v in spec.items() if k != "verify"}
    if "verify" in spec:
        options["verify"] = VerifyConfig(**spec["verify"])
    options.setdefault("drafter", "auto")
    return evaluate(model, tokenizer, items, label, seed, show=sys.stderr.isatty(), **options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.drafter_knobs", description=__doc__)
    p.add_argument("--model", default=None, help="target (default: the embedded demo model)")
    p.add_argument("--split", choices=["valid", "test"], default="valid")
    p.add_argument("--n", type=int, default=60, help="held-out records (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=None, help="run only these settings (labels as printed)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be a positive integer")
    table = settings()
    chosen = args.only or list(table)
    unknown = [c for c in chosen if c not in table]
    if unknown:
        p.error(f"unknown setting {unknown[0]!r}: choose from {', '.join(table)}")

    import mlx.core as mx

    from mlx_dgemma import load

    model, tokenizer = load(args.model, mx.float32 if mx.default_device() == mx.cpu else None)
    items = task.split(args.split, args.n, task.is_long(model.args.canvas_length))
    base = run(model, tokenizer, items, "none", table["none"], args.seed)
    print(f"{args.split}, {len(items)} records, paired seeds\n")
    print(
        "| setting | exact match (95% CI) | vs no drafter, paired (95% CI) | passes / canvas | vs no drafter |"
    )
    print("|---|---|---|---|---|")
    for label in chosen:
        r = base if label == "none" else run(model, tokenizer, items, label, table[label], args.seed)
        low, high = r.interval()
        mean, lo, hi = paired_difference(base.hits, r.hits)
        per = r.decoder_passes / r.canvases
        ratio = (base.decoder_passes / base.canvases) / per
        print(
            f"| {label} | {r.accuracy:.1%} ({low:.1%}–{high:.1%}) | {mean:+.1%} ({lo:+.1%} to {hi:+.1%}) | "
            f"{per:.2f} | {ratio:.2f}x |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
