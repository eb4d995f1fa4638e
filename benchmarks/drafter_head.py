"""The drafter's head over a draft vocabulary shortlist (``mlx_dgemma.drafter.head``) against its full head.

    python -m benchmarks.drafter_head                      # the long demo: shortlists of 64-512, 60 valid records
    python -m benchmarks.drafter_head --sizes 128 --n 2 --records 200 --end-to-end 128  # a smoke run

The shortlists hold the most frequent answer tokens of the first ``--records`` training records of the model's task
(``demo.task.split("train")``: the drafter's training records), as ``mlx_dgemma.drafter.head`` builds them, the end
tokens always in. Printed:

1. **Coverage**: per size, the fraction of the counted training answer tokens it holds (the figure that transfers to
   the 262K vocabulary) and of the ``--n`` validation records' answer tokens, alone and with each prompt's tokens.
2. **Proposals**: the validation records answered with the full head (the bundled drafter at its recorded
   confidence); at every proposal each shortlist variant drafts the same canvas from the same cache. Per variant:
   proposals identical to the full head's (drafted mask and drafted tokens, after the ends are taken out as
   verification does), positions drafted by the variant but not the full head (extra) and the reverse (missing),
   and the drafted tokens the target did not commit, against the full head's. Variants: each size, renormalised
   over the shortlist or with an estimate of the rest (``DraftHead.log_rest``), alone or with the prompt's tokens.
3. **End to end**: exact match and target passes per canvas, full head against each ``--end-to-end`` shortlist
   (``SIZE`` or ``SIZE+prompt``; the estimate of the rest), paired seeds (seed + i), on the same records.
4. The proposal's time here (this tiny vocabulary: little to save) and the 26B projection of a proposal's cost
   with the full head and shortlists (``demo.eval_drafter.drafter_seconds``: FLOPs and bytes, not a measurement).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)
from demo import task
from demo.eval import EvalResult, evaluate
from demo.eval_drafter import VOCAB, drafter_seconds, paired_difference, target_pass_seconds, time_pass

PROJECTED = (65_536, 32_768, 16_384)  # shortlist sizes projected at the 26B size (EAGLE-3 uses 32,768)


@dataclass
class Tally:
    """One variant's proposals against the full head's."""

    proposals: int = 0
    identical: int = 0
    positions: int = 0
    differing: int = 0  # drafted mask or drafted token differs
    extra: int = 0  # drafted here, not by the full head
    missing: int = 0  # drafted by the full head, not here
    drafted: int = 0
    wrong: int = 0  # drafted, and not what the target committed
    full_drafted: int = 0
    full_wrong: int = 0

    def row(self, label: str) -> str:
        return (
            f"| {label} | {self.identical / self.proposals:.1%} | {self.differing / self.positions:.2%} | "
            f"{self.extra} | {self.missing} | {self.drafted} ({self.wrong} wrong) | "
            f"{self.full_drafted} ({self.full_wrong} wrong) |"
        )


PROPOSAL_HEADER = (
    "| shortlist variant | proposals identical to the full head's | positions differing | extra drafted | "
    "missing drafted | drafted here (not committed) | drafted by the full head (not committed) |\n"
    "|---|---|---|---|---|---|---|"
)


@dataclass
class Comparing:
    """A proposer that drafts with the full head and, on the same cache, with every variant; it returns the full
    head's proposal (so the run is the full head's) and scores the variants when the canvas is committed."""

    full: Any
    variants: dict[str, Any]
    ends: set[int]
    tallies: dict[str, Tally] = field(default_factory=dict)
    name: str = "drafter"

    @property
    def capture(self) -> tuple[int, ...]:
        """The target layers the drafter reads: the generation captures them for it."""
        return tuple(self.full.capture)

    def begin(self, prompt_ids: list[list[int]]) -> None:
        self.full = copy.copy(self.full)
        self.full.begin(prompt_ids)
        self.variants = {label: copy.copy(p) for label, p in self.variants.items()}
        for p in self.variants.values():
            p.begin(prompt_ids)
        self.pending: list[tuple[str, Any]] = []
        self.pending_full: Any = None

    def propose(self, model: Any, cache: Any) -> Any:
        from mlx_dgemma.decoding.verify import without_ends

        proposal = self.full.propose(model, cache)
        if proposal is None:
            return None
        self.pending_full = without_ends(proposal, self.ends)
        self.pending = [
            (label, without_ends(p.propose(model, cache), self.ends)) for label, p in self.variants.items()
        ]
        return proposal

    def commit(self, tokens: list[list[int]]) -> None:
        import mlx.core as mx

        for p in self.variants.values():
            p.commit(tokens)
        if self.pending_full is None:
            return
        committed = mx.array(tokens, dtype=mx.int32)
        full = self.pending_full
        full_on = full.drafted
        full_wrong = int((full_on & (full.canvas != committed)).sum().item())
        for label, p in self.pending:
            t = self.tallies.setdefault(label, Tally())
            on = p.drafted
            differs = (on != full_on) | (on & (p.canvas != full.canvas))
            n_diff = int(differs.sum().item())
            t.proposals += 1
            t.identical += n_diff == 0
            t.positions += on.size
            t.differing += n_diff
            t.extra += int((on & ~full_on).sum().item())
            t.missing += int((full_on & ~on).sum().item())
            t.drafted += int(on.sum().item())
            t.wrong += int((on & (p.canvas != committed)).sum().item())
            t.full_drafted += int(full_on.sum().item())
            t.full_wrong += full_wrong
        self.pending_full = None


def count_answers(tokenizer: Any, eos: set[int], items: list[task.Item]) -> tuple[Counter[int], list[Any]]:
    """Answer token counts of ``items`` (as training encodes them) and their encoded examples."""
    from mlx_dgemma.drafter.head import count_tokens
    from mlx_dgemma.train.data import encode_record

    examples = [encode_record(json.loads(item.to_jsonl()), tokenizer, eos) for item in items]
    return count_tokens(e.answer for e in examples), examples


def coverage_table(
    sizes: list[int], shortlists: dict[int, Any], train: Counter[int], valid: list[Any]
) -> str:
    from mlx_dgemma.drafter.head import coverage

    lines = [
        "| shortlist size | of the vocabulary | training answer tokens covered | validation answer tokens covered | "
        "with each prompt's tokens |",
        "|---|---|---|---|---|",
    ]
    for size in sizes:
        held = set(shortlists[size].tolist())
        total = sum(len(e.answer) for e in valid)
        alone = sum(t in held for e in valid for t in e.answer)
        prompt = sum(t in held or t in set(e.prompt) for e in valid for t in e.answer)
        lines.append(
            f"| {size} | {size / VOCAB_SEEN[0]:.1%} | {coverage(train, shortlists[size]):.2%} | "
            f"{alone / total:.2%} | {prompt / total:.2%} |"
        )
    return "\n".join(lines)


VOCAB_SEEN = [0]  # the model's vocabulary size, for the table


def parse_setting(spec: str, sizes: list[int]) -> tuple[int, bool]:
    size, _, extra = spec.partition("+")
    if not size.isdigit() or extra not in ("", "prompt"):
        raise SystemExit(f"error: --end-to-end takes SIZE or SIZE+prompt (got {spec!r})")
    return int(size), extra == "prompt"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="target (default: the embedded demo model)")
    parser.add_argument("--drafter", default="auto", help="drafter folder (default: the model's own)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument(
        "--records", type=int, default=10_000, help="training records counted (default 10000)"
    )
    parser.add_argument("--n", type=int, default=60, help="validation records answered (default 60)")
    parser.add_argument("--end-to-end", nargs="*", default=["128", "128+prompt"], help="SIZE or SIZE+prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    settings = [parse_setting(s, args.sizes) for s in args.end_to_end]

    import mlx.core as mx

    from mlx_dgemma import load
    from mlx_dgemma.drafter import DrafterProposer, make_proposer
    from mlx_dgemma.drafter.head import Shortlist, build_shortlist
    from mlx_dgemma.errors import DGemmaError
    from mlx_dgemma.request import eos_ids

    # This CPU multiplies bf16 ~10x slower than fp32: evaluate in fp32 there (a Mac runs the stored bf16).
    model, tokenizer = load(args.model, mx.float32 if mx.default_device() == mx.cpu else None)
    long = task.is_long(model.args.canvas_length)
    V = VOCAB_SEEN[0] = model.args.vocab_size
    try:
        full = make_proposer(args.drafter, model)
    except DGemmaError as e:
        raise SystemExit(f"error: {e}") from None
    if not isinstance(full, DrafterProposer) or full.shortlist is not None:
        raise SystemExit("error: give a trained drafter folder without a shortlist (--drafter PATH)")
    eos = eos_ids(model, tokenizer)
    ends = eos | {model.args.pad_token_id or 0}
    print(f"counting the answer tokens of {args.records} training records", file=sys.stderr, flush=True)
    train, _ = count_answers(tokenizer, eos, task.split("train", args.records, long))
    items = task.split("valid", args.n, long)
    _, valid = count_answers(tokenizer, eos, items)
    try:
        shortlists = {s: build_shortlist(train, s, V, ends) for s in {*args.sizes, *(s for s, _ in settings)}}
    except DGemmaError as e:
        raise SystemExit(f"error: {e}") from None

    def proposer(size: int, prompt: bool, estimate: bool) -> DrafterProposer:
        return DrafterProposer(
            full.drafter, confidence=full.confidence, shortlist=Shortlist(shortlists[size], prompt, estimate)
        )

    variants = {
        f"{size}{' + prompt' if prompt else ''}, {'rest estimated' if estimate else 'renormalised'}": proposer(
            size, prompt, estimate
        )
        for size in args.sizes
        for prompt in (False, True)
        for estimate in (True, False)
    }
    comparing = Comparing(full, variants, ends | set(model.args.eos_token_id))
    results: dict[str, EvalResult] = {
        "full head": evaluate(model, tokenizer, items, "full head", args.seed, drafter=comparing)
    }
    for size, prompt in settings:
        label = f"shortlist {size}{' + prompt' if prompt else ''}"
        results[label] = evaluate(
            model, tokenizer, items, label, args.seed, drafter=proposer(size, prompt, True)
        )

    print(
        f"## Coverage ({args.records} training records counted; {args.n} validation records; vocabulary {V})\n"
    )
    print(coverage_table(args.sizes, shortlists, train, valid))
    print(
        f"\n## Proposals against the full head's ({args.n} validation records, confidence {full.confidence:g}, "
        f"{next(iter(comparing.tallies.values())).proposals if comparing.tallies else 0} proposals)\n"
    )
    print(PROPOSAL_HEADER)
    for label, tally in comparing.tallies.items():
        print(tally.row(label))
    print(f"\n## End to end ({args.n} validation records, paired seeds)\n")
    print("| head | exact match | target passes / canvas | exact match vs full head, paired (95% CI) |")
    print("|---|---|---|---|")
    base = results["full head"]
    for label, r in results.items():
        mean, low, high = paired_difference(base.hits, r.hits)
        versus = "—" if r is base else f"{mean:+.1%} ({low:+.1%} to {high:+.1%})"
        print(f"| {label} | {r.accuracy:.1%} | {r.decoder_passes / r.canvases:.2f} | {versus} |")

    print("\n## Cost\n")
    timings = {}
    for label, spec in [("full head", full)] + [
        (f"shortlist {s}{' + prompt' if p else ''}", proposer(s, p, True)) for s, p in settings
    ]:
        t_pass, t_draft = time_pass(model, tokenizer, spec, items[0].prompt)
        timings[label] = t_draft / t_pass
        print(
            f"- {label}: proposal {1000 * t_draft:.2f} ms = {t_draft / t_pass:.1%} of a target pass "
            f"({1000 * t_pass:.2f} ms), measured here"
        )
    t_target = target_pass_seconds()
    for rows in (VOCAB, *PROJECTED):
        head = "full head" if rows == VOCAB else f"shortlist of {rows:,}"
        print(
            f"- 26B projection, drafter with its {head}: {1000 * drafter_seconds(rows):.1f} ms a proposal, "
            f"{drafter_seconds(rows) / t_target:.1%} of a target pass ({1000 * t_target:.0f} ms)"
        )
    if args.json:
        figures = {
            "n": args.n,
            "records": args.records,
            "vocab": V,
            "proposals": {label: vars(t) for label, t in comparing.tallies.items()},
            "end_to_end": {label: r.summary() for label, r in results.items()},
            "proposal_fraction_of_pass": timings,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
