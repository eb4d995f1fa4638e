"""Exact-match accuracy of a model on the demo task's held-out test set, with its decoder cost.

    python -m demo.eval [--model PATH] [--n 500] [--steps 48] [--seed 0]

The test records (``demo.task.split("test")``) were never trained on. For each one the command generates an answer
(seed ``seed + i``, the model's sampler defaults unless ``--steps``) and compares it, stripped, with the expected
JSON. It prints exact match (with a 95% Wilson interval), decoder passes per canvas, tokens per forward (answer
tokens per decoder pass) and wall time per canvas, as a Markdown table row; ``--json`` writes the figures too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)
from demo import task


@dataclass
class EvalResult:
    label: str
    n: int
    correct: int
    canvases: int
    decoder_passes: int
    tokens: int
    seconds: float
    hits: list[bool] = field(default_factory=list)  # per item, in order: paired comparisons use it

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    def interval(self) -> tuple[float, float]:
        """95% Wilson score interval of the accuracy."""
        z, n, p = 1.96, self.n, self.accuracy
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return centre - half, centre + half

    def summary(self) -> dict[str, float | int | str]:
        low, high = self.interval()
        return {
            "setting": self.label,
            "n": self.n,
            "exact_match": self.accuracy,
            "ci95": [low, high],
            "passes_per_canvas": self.decoder_passes / self.canvases,
            "tokens_per_forward": self.tokens / self.decoder_passes,
            "ms_per_canvas": 1000 * self.seconds / self.canvases,
        }

    def row(self) -> str:
        low, high = self.interval()
        return (
            f"| {self.label} | {self.accuracy:.1%} ({low:.1%}–{high:.1%}) | "
            f"{self.decoder_passes / self.canvases:.2f} | {self.tokens / self.decoder_passes:.2f} | "
            f"{1000 * self.seconds / self.canvases:.0f} ms |"
        )


HEADER = (
    "| setting | exact match (95% CI) | decoder passes / canvas | tokens / forward | wall time / canvas |\n"
    "|---|---|---|---|---|"
)


def evaluate(
    model, tokenizer, items: list[task.Item], label: str, seed: int = 0, show: bool = True, **generation
) -> EvalResult:
    """Generate an answer for every item; count exact matches and the decoder's work."""
    from mlx_dgemma import Done, stream_generate

    result = EvalResult(label, len(items), 0, 0, 0, 0, 0.0)
    length = task.max_tokens(model.args.canvas_length)
    for i, item in enumerate(items):
        start = time.perf_counter()
        done = None
        for event in stream_generate(
            model, tokenizer, item.prompt, max_tokens=length, seed=seed + i, **generation
        ):
            done = event
        assert isinstance(done, Done)
        result.seconds += time.perf_counter() - start
        result.hits.append(done.answer.strip() == item.answer)
        result.correct += result.hits[-1]
        result.canvases += done.stats.canvases
        result.decoder_passes += done.stats.decoder_passes
        result.tokens += done.stats.generated_tokens
        if show:
            print(
                f"\r{label}: {i + 1}/{len(items)}  exact match {result.correct / (i + 1):.1%}",
                end="",
                file=sys.stderr,
                flush=True,
            )
    if show:
        print(file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="model folder or hub id (default: the embedded demo model)"
    )
    parser.add_argument("--n", type=int, default=500, help="held-out records to evaluate (default 500)")
    parser.add_argument("--steps", type=int, default=None, help="max denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import mlx.core as mx

    from mlx_dgemma import load

    # This CPU multiplies bf16 ~10x slower than fp32: evaluate in fp32 there (a Mac runs the stored bf16).
    model, tokenizer = load(args.model, mx.float32 if mx.default_device() == mx.cpu else None)
    items = task.split("test", args.n, task.is_long(model.args.canvas_length))
    options = {} if args.steps is None else {"max_denoising_steps": args.steps}
    result = evaluate(model, tokenizer, items, "demo model", args.seed, drafter="none", **options)
    print(HEADER)
    print(result.row())
    if args.json:
        args.json.write_text(json.dumps(result.summary(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
