"""Structured output on the demo model: exact match under its record schema vs unconstrained (paired, held-out),
and what the per-step projection costs next to a decoder pass.

    python -m benchmarks.constrain [--model DIR] [--n 100] [--steps 16] [--seed 0] [--fast]

Both settings answer the same held-out test items (``demo.task.split("test")``, of the task the model was trained
for) with the same seeds; the constrained one uses ``demo/record_schema.json`` (one person), or a list of such
records (several). The projection (``mlx_dgemma.decoding.constrain``) is timed on its own: it runs on the host once
per denoising step, after the step's argmax is read back. ``--fast`` adds both settings in fast mode
(``fast.project`` projects fast mode's step; same items and seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)
from demo import task
from demo.eval import HEADER, evaluate


class ProjectionTimer:
    """Wraps ``GrammarConstraint.project`` to add up its wall time and count its calls (denoising steps)."""

    def __init__(self):
        from mlx_dgemma.decoding.constrain import GrammarConstraint

        self.cls, self.original, self.seconds, self.calls = (
            GrammarConstraint,
            GrammarConstraint.project,
            0.0,
            0,
        )

        def timed(constraint, *args):
            start = time.perf_counter()
            try:
                return self.original(constraint, *args)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        GrammarConstraint.project = timed

    def close(self) -> None:
        self.cls.project = self.original


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100, help="held-out records (default 100)")
    parser.add_argument("--steps", type=int, default=16, help="max denoising steps (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    parser.add_argument("--fast", action="store_true", help="also both settings with fast=True")
    args = parser.parse_args()

    import mlx.core as mx

    from mlx_dgemma import load

    model, tokenizer = load(args.model, mx.float32 if mx.default_device() == mx.cpu else None)
    items = task.split("test", args.n, task.is_long(model.args.canvas_length))
    record = json.loads(task.RECORD_SCHEMA.read_text())
    record.pop("$comment")
    schema = {"anyOf": [record, {"type": "array", "items": record, "minItems": 2}]}
    opts = {"max_denoising_steps": args.steps, "drafter": "none"}
    free = evaluate(model, tokenizer, items, "unconstrained", args.seed, **opts)
    timer = ProjectionTimer()
    bound = evaluate(model, tokenizer, items, "records schema", args.seed, json_schema=schema, **opts)
    timer.close()
    rows = [free, bound]
    if args.fast:
        rows += [
            evaluate(model, tokenizer, items, "fast", args.seed, fast=True, **opts),
            evaluate(
                model,
                tokenizer,
                items,
                "fast + records schema",
                args.seed,
                fast=True,
                json_schema=schema,
                **opts,
            ),
        ]
    print(HEADER)
    for row in rows:
        print(row.row())
    both = sum(a and b for a, b in zip(free.hits, bound.hits))
    only_free = sum(a and not b for a, b in zip(free.hits, bound.hits))
    only_bound = sum(b and not a for a, b in zip(free.hits, bound.hits))
    print(
        f"\npaired on {args.n} held-out records: both right {both}, only unconstrained {only_free}, "
        f"only constrained {only_bound}"
    )
    if args.fast:
        fast_bound = rows[3]
        print(
            f"fast + schema against the reference + schema: both right "
            f"{sum(a and b for a, b in zip(bound.hits, fast_bound.hits))}, only reference "
            f"{sum(a and not b for a, b in zip(bound.hits, fast_bound.hits))}, only fast "
            f"{sum(b and not a for a, b in zip(bound.hits, fast_bound.hits))}"
        )
    pass_ms = 1000 * free.seconds / free.decoder_passes
    step_ms = 1000 * timer.seconds / max(timer.calls, 1)
    print(
        f"\n| per denoising step | ms |\n|---|---|\n| decoder pass + sampler (unconstrained) | {pass_ms:.2f} |\n"
        f"| grammar projection (host, constrained only) | {step_ms:.3f} |\n"
        f"| projection / pass | {step_ms / pass_ms:.1%} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
