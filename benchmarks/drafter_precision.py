"""A drafter trained on one precision, serving the others: the bundled drafter on quantized conversions of its target.

    python -m benchmarks.drafter_precision                    # 60 records; unquantized, 8-bit, mixed and uniform 4-bit
    python -m benchmarks.drafter_precision --n 60 --bits 8 4 --json drafter_precision.json
    python -m benchmarks.drafter_precision --model tests/fixtures/demo24 --n 2 --bits 8 --recipes mixed  # a smoke run

The target (default: the embedded demo model) is converted with ``mlx_dgemma.convert`` into a temporary folder per
precision (``--recipes``: ``mixed``, the default recipe, with the experts and self-conditioning at ``--bits`` and
the rest at 8 bits, and ``uniform``, everything at ``--bits``; at 8 bits both are the same model, measured once).
A conversion carries the model's own ``drafter/`` folder, trained against the unquantized target; each precision
is loaded as a user would load it, and its drafter is the one ``--drafter auto`` picks (the folder's, when its
recorded target matches). Per precision, the four settings of ``benchmarks.fast``'s table (a): reference (no
drafter), drafter, fast, fast + drafter, on the held-out test records (``demo.task.split("test")``), paired: every
setting of every precision answers the same records with the same seeds (seed + i).

Printed: (1) each precision: bits per weight, whether ``auto`` gives the drafter (and, when not, the line a user
would get naming the drafter folder), and the drafter's held-out agreement there (first-pass drafts of the test
records' answer canvases, teacher-forced through that precision's features and LM head: the training's held-out
measure); (2) every setting, with ``benchmarks.fast``'s columns, each precision against its own reference; (3) the
drafter's effect per precision: exact match and passes with the drafter against without, alone and in fast mode.
Wall times come from a shared machine: compare passes and exact match across precisions, not times.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)
from benchmarks.fast import HEADER, Run, run_setting
from demo import task
from demo.eval_drafter import paired_difference

SETTINGS = ("reference", "drafter", "fast", "fast + drafter")
UNQUANTIZED = "unquantized"


@dataclass
class Precision:
    """One conversion of the target: how it was quantized, what ``auto`` gave it, and its four runs."""

    label: str
    recipe: str | None = None
    bits: int | None = None
    bits_per_weight: float | None = None
    drafter: str | None = None  # the drafter folder ``auto`` picked, None when it picked none
    refusal: str | None = None  # the one line a user gets naming that drafter folder, when auto picks none
    agreement: tuple[float, float] | None = (
        None  # held-out (whole canvas, token) agreement of first-pass drafts
    )
    runs: dict[str, Run] = field(default_factory=dict)

    def summary(self) -> dict:
        whole, token = self.agreement if self.agreement is not None else (None, None)
        return {
            "recipe": self.recipe,
            "bits": self.bits,
            "bits_per_weight": self.bits_per_weight,
            "auto_drafter": self.drafter,
            "refusal": self.refusal,
            "held_out_canvas_agreement": whole,
            "held_out_token_agreement": token,
            "settings": {label: run.summary() for label, run in self.runs.items()},
        }


def precisions(recipes: list[str], bits: list[int]) -> list[tuple[str, str, int]]:
    """(label, recipe, bits) of each conversion to measure; at 8 bits every recipe is one model (the ``mixed``
    recipe's sensitive modules are 8-bit already), so it is measured once, under the first recipe asked for."""
    out: list[tuple[str, str, int]] = []
    for b in bits:
        for recipe in recipes:
            if b == 8 and any(have == 8 for _, _, have in out):
                continue
            out.append(("8-bit" if b == 8 else f"{recipe} {b}-bit", recipe, b))
    return out


def auto_drafter(model, source: Path) -> tuple[str | None, str | None]:
    """(the folder ``--drafter auto`` picks, None) or (None, the one line a user gets asking for ``source``'s
    drafter by path): ``auto`` itself says nothing when the recorded target does not match."""
    from mlx_dgemma.drafter import DrafterError, bundled_drafter, make_proposer
    from mlx_dgemma.drafter.propose import BUNDLED

    folder = bundled_drafter(model)
    if folder is not None:
        return str(folder), None
    try:
        make_proposer(str(source / BUNDLED), model)
    except DrafterError as e:
        return None, str(e)
    return None, f"auto picked no drafter, though {source / BUNDLED} loads by path"


def agreement(
    model, tokenizer, drafter_folder: str, items: list[task.Item], work: Path
) -> tuple[float, float]:
    """(whole canvas, token) agreement of the drafter's first-pass drafts with the records' answer canvases,
    teacher-forced through ``model`` (its features, embedding and LM head): what training reports on its held-out
    samples, measured with the same code (``DrafterTrainer.accuracy``) on every sample here."""
    import numpy as np

    from mlx_dgemma.drafter import load_drafter
    from mlx_dgemma.drafter.distill import collect_from_data
    from mlx_dgemma.drafter.train import DrafterTrainer
    from mlx_dgemma.train import TrainConfig

    drafter = load_drafter(drafter_folder, model)
    records = work / "records.jsonl"
    records.write_text("".join(item.to_jsonl() + "\n" for item in items))
    a = drafter.args
    samples = collect_from_data(
        model,
        tokenizer,
        records,
        a.target_layers,
        a.context_window,
        task.max_tokens(model.args.canvas_length),
    )
    trainer = DrafterTrainer(drafter, model, samples, TrainConfig(iters=0, save_every=0), work)
    trainer.valid_idx = np.arange(len(samples))  # every sample is held out here: none was trained on
    whole, token = trainer.accuracy()
    return float(whole), float(token)


def measure(precision: Precision, folder: Path, n: int, seed: int, source: Path, work: Path) -> Precision:
    """Load ``folder`` as a user would (fp32 on this CPU), see what ``auto`` gives, and run the four settings on
    the first ``n`` test records of the model's task (the same records, whatever the precision)."""
    import mlx.core as mx

    from mlx_dgemma import load
    from mlx_dgemma.decoding.fast import FastConfig

    # This CPU multiplies bf16 ~10x slower than fp32: evaluate in fp32 there (a Mac runs the stored weights).
    model, tokenizer = load(folder, mx.float32 if mx.default_device() == mx.cpu else None)
    items = task.split("test", n, task.is_long(model.args.canvas_length))
    precision.drafter, precision.refusal = auto_drafter(model, source)
    if precision.drafter is not None:
        precision.agreement = agreement(model, tokenizer, precision.drafter, items, work)
    for label in SETTINGS:
        drafted = "drafter" in label
        if drafted and precision.drafter is None:
            continue  # nothing to measure: the refusal says why
        fast = FastConfig() if label.startswith("fast") else None
        run = run_setting(
            model, tokenizer, items, f"{precision.label}, {label}", seed, fast, "auto" if drafted else "none"
        )
        run.label = label
        precision.runs[label] = run
    return precision


def settings_table(measured: list[Precision]) -> str:
    """Every setting of every precision, with ``benchmarks.fast``'s columns, against that precision's reference."""
    head, rule = HEADER.splitlines()
    lines = ["| precision " + head, "|---" + rule]
    for p in measured:
        ref = p.runs["reference"]
        lines += [f"| {p.label} " + run.row(ref) for run in p.runs.values()]
    return "\n".join(lines)


def precision_table(measured: list[Precision]) -> str:
    """Per precision: size, what ``auto`` gives, the drafter's held-out agreement, and the quantization's own cost."""
    base = measured[0].runs["reference"]
    lines = [
        "| precision | bits / weight | `--drafter auto` | drafter held-out agreement: tokens / canvases | "
        "reference exact match vs unquantized reference, paired (95% CI) |",
        "|---|---|---|---|---|",
    ]
    for p in measured:
        size = f"{p.bits_per_weight:.2f}" if p.bits_per_weight is not None else "as stored"
        auto = "the bundled drafter" if p.drafter is not None else f"none: {p.refusal}"
        agree = f"{p.agreement[1]:.1%} / {p.agreement[0]:.1%}" if p.agreement is not None else "—"
        ref = p.runs["reference"]
        if ref is base:
            cost = "—"
        else:
            mean, low, high = paired_difference(base.result.hits, ref.result.hits)
            cost = f"{mean:+.1%} ({low:+.1%} to {high:+.1%})"
        lines.append(f"| {p.label} | {size} | {auto} | {agree} | {cost} |")
    return "\n".join(lines)


def effect_table(measured: list[Precision]) -> str:
    """The drafter's effect at each precision: with it against without, alone and in fast mode (paired)."""
    lines = [
        "| precision | drafter vs reference: exact match, paired (95% CI) | passes / canvas | "
        "fast + drafter vs fast: exact match, paired (95% CI) | passes / canvas |",
        "|---|---|---|---|---|",
    ]
    for p in measured:
        if p.drafter is None:
            lines.append(f"| {p.label} | no drafter | — | no drafter | — |")
            continue
        cells = []
        for without, with_ in (("reference", "drafter"), ("fast", "fast + drafter")):
            a, b = p.runs[without].result, p.runs[with_].result
            mean, low, high = paired_difference(a.hits, b.hits)
            passes = (a.decoder_passes / a.canvases) / (b.decoder_passes / b.canvases)
            cells += [
                f"{mean:+.1%} ({low:+.1%} to {high:+.1%})",
                f"{b.decoder_passes / b.canvases:.2f} against {a.decoder_passes / a.canvases:.2f} "
                f"({passes:.2f}x fewer)",
            ]
        lines.append(f"| {p.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="target (default: the embedded demo model)")
    parser.add_argument("--n", type=int, default=60, help="held-out test records (default 60)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="bit widths (default 8 4)")
    parser.add_argument(
        "--recipes", nargs="+", default=["mixed", "uniform"], help="convert's recipes (default mixed uniform)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n must be a positive integer")

    from mlx_dgemma import DEFAULT_MODEL
    from mlx_dgemma.convert import Recipe, convert
    from mlx_dgemma.errors import DGemmaError

    source = (args.model or DEFAULT_MODEL).expanduser().absolute()
    if not source.is_dir():
        print(
            f"error: no model folder at {source}: give --model a DiffusionGemma model folder", file=sys.stderr
        )
        return 2
    try:
        plan = precisions(args.recipes, args.bits)
        for _, recipe, b in plan:
            Recipe(recipe, b)  # a bad recipe or bit width: convert's own one-line error, before any work
    except DGemmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    measured = []
    with tempfile.TemporaryDirectory(prefix="drafter-precision-") as tmp:
        work = Path(tmp)
        measured.append(measure(Precision(UNQUANTIZED), source, args.n, args.seed, source, work))
        for label, recipe, b in plan:
            print(f"{label}: converting {source.name} ({recipe} recipe)", file=sys.stderr, flush=True)
            out = convert(
                source,
                work / label.replace(" ", "-"),
                quantize=True,
                q_bits=b,
                q_recipe=recipe,
                progress=False,
            )
            p = Precision(label, recipe, b, out.bits_per_weight)
            measured.append(measure(p, out.path, args.n, args.seed, out.path, work))
    C = measured[0].runs["reference"].canvas
    print(f"## Precisions (target {source.name}, {args.n} held-out test records, canvas {C})\n")
    print(precision_table(measured))
    print(f"\n## Settings, each precision against its own reference ({args.n} records, paired seeds)\n")
    print(settings_table(measured))
    print("\n## The drafter's effect at each precision (paired)\n")
    print(effect_table(measured))
    if args.json:
        figures = {"model": str(source), "n": args.n, "precisions": {p.label: p.summary() for p in measured}}
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
