"""Fast decoding against the reference sampler: quality, decoder work, wall time, and a 26B projection.

    python -m benchmarks.fast                      # everything (100 + 60 records: about 15 minutes on 2 cores)
    python -m benchmarks.fast --n 100 --ablation-n 60 --json fast.json
    python -m benchmarks.fast --skip-tenth         # no tenth-scale checkpoint (it needs torch to build)
    python -m benchmarks.fast --n 2 --ablation-n 1 --scale tiny --tenth /tmp/bench-tiny   # a smoke run

(a) The demo model's held-out items (``demo.task.split("test")``, its task), paired: every setting answers the same
    records with the same seeds (seed + i). Settings: reference / fast / drafter / fast + drafter. Per setting:
    exact match (95% Wilson interval) and its paired difference against the reference (95% normal interval),
    decoder passes per canvas, decoder *positions* per committed token, wall time per canvas (generation only:
    prefill and the exactness check excluded), tokens/s, and the exact-argmax agreement: after each committed
    canvas, one exact decoder pass over it (``fast.exact_agreement``, outside the clock).
(b) Ablation on the same records: each technique of ``FastConfig`` alone, then all together.
(c) The tenth-scale random checkpoint ``benchmarks.model`` builds (canvas 256, vocab 32K; ``--scale`` picks
    another of its sizes): the cost of a
    fast pass (sparse self-conditioning, stale K/V, top-k sampler step) at each bucket size against the
    reference's full pass and sampler step; then per canvas at the bucket mix fast mode used in (a).
(d) A roofline projection for google/diffusiongemma-26B-A4B-it on an M-series Max (assumptions printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)
from benchmarks import model as bench
from demo import task
from demo.eval import EvalResult
from demo.eval_drafter import paired_difference


@dataclass
class Run:
    """One setting over the records: what demo.eval counts, plus positions, agreement and the bucket mix."""

    label: str
    result: EvalResult
    positions: int = 0
    agreement: list[float] = field(default_factory=list)
    sizes: dict[int, int] = field(default_factory=dict)  # passes per decoder input size (fast mode)
    canvas: int = 0

    def row(self, ref: Run | None) -> str:
        r = self.result
        low, high = r.interval()
        if ref is None or ref is self:
            diff = "—"
        else:
            mean, lo, hi = paired_difference(ref.result.hits, r.hits)
            diff = f"{mean:+.1%} ({lo:+.1%} to {hi:+.1%})"
        per_canvas = 1000 * r.seconds / r.canvases
        return (
            f"| {self.label} | {r.accuracy:.1%} ({low:.1%}–{high:.1%}) | {diff} | "
            f"{r.decoder_passes / r.canvases:.2f} | {self.positions / max(r.tokens, 1):.2f} | "
            f"{per_canvas:.0f} ms | {r.tokens / r.seconds:.0f} | {statistics.mean(self.agreement):.2%} |"
        )

    def summary(self) -> dict:
        r = self.result
        return {
            **r.summary(),
            "positions_per_token": self.positions / max(r.tokens, 1),
            "tokens_per_s": r.tokens / r.seconds,
            "exact_argmax_agreement": statistics.mean(self.agreement),
            "bucket_passes": self.sizes,
        }


HEADER = (
    "| setting | exact match (95% CI) | vs reference, paired (95% CI) | decoder passes / canvas | "
    "decoder positions / token | wall / canvas | tokens/s | exact-argmax agreement |\n"
    "|---|---|---|---|---|---|---|---|"
)


def run_setting(model, tokenizer, items, label: str, seed: int, fast, drafter: str) -> Run:
    """Generate every item at the loop level, timing generation only; check each commit exactly."""
    import mlx.core as mx

    from mlx_dgemma.decoding.block_loop import CommitEvent, generate_tokens, prefill
    from mlx_dgemma.decoding.fast import FastDenoiser, exact_agreement
    from mlx_dgemma.decoding.verify import DraftSession
    from mlx_dgemma.drafter import make_proposer
    from mlx_dgemma.request import encode_prompt, eos_ids, sampler_config

    eos = sorted(eos_ids(model, tokenizer))
    cfg, C = sampler_config(model), model.args.canvas_length
    max_tokens = task.max_tokens(C)  # as demo.eval
    run = Run(label, EvalResult(label, len(items), 0, 0, 0, 0, 0.0), canvas=C)
    proposer = make_proposer(drafter, model)
    for i, item in enumerate(items):
        ids = encode_prompt(tokenizer, item.prompt)
        cache = model.make_cache()
        cache.capture = getattr(proposer, "capture", ())
        prefill(model, mx.array([ids]), cache)
        session = DraftSession(proposer, [ids]) if proposer is not None else None
        denoiser = FastDenoiser(fast, eos) if fast is not None else None
        events = generate_tokens(
            model, cache, max_tokens, cfg, seed=seed + i, eos_ids=eos, drafts=session, denoiser=denoiser
        )
        tokens: list[int] = []
        passes = 0
        while True:
            start = time.perf_counter()
            event = next(events, None)
            run.result.seconds += time.perf_counter() - start
            if event is None:
                break
            if isinstance(event, CommitEvent):
                run.agreement.append(exact_agreement(model, cache, event.argmax, eos).item())
                tokens += event.tokens[0].tolist()
                passes += int(event.decoder_passes[0].item())
                run.result.canvases += 1
        kept = next((j for j, t in enumerate(tokens) if t in eos), len(tokens))
        hit = tokenizer.decode(tokens[:kept]).strip() == item.answer
        run.result.hits.append(hit)
        run.result.correct += hit
        run.result.decoder_passes += passes
        run.result.tokens += min(kept, max_tokens)
        run.positions += denoiser.positions if denoiser is not None else passes * C
        if denoiser is not None:
            for size, count in denoiser.sizes.items():
                run.sizes[size] = run.sizes.get(size, 0) + count
        print(
            f"\r{label}: {i + 1}/{len(items)}  exact match {run.result.correct / (i + 1):.1%}",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    return run


# ---------------------------------------------------------------------------------------------------------
# (c) the tenth-scale checkpoint


def tenth_costs(folder: Path, reps: int, k: int, scale: str = "tenth") -> dict:
    """Median seconds of the reference's full pass + sampler step, and of a fast pass + step at each bucket."""
    import mlx.core as mx

    from mlx_dgemma import load_model
    from mlx_dgemma.decoding.block_loop import prefill
    from mlx_dgemma.decoding.fast import FastConfig, FastState, dense_soft, fast_step, forward, sparse_soft
    from mlx_dgemma.decoding.sampler import SamplerConfig, denoise_step, init_history

    spec = bench.build_spec(argparse.Namespace(spec=None, size=scale, prompt_len=None))
    bench.ensure_checkpoint(spec, folder)
    model = load_model(folder / "hf", dtype=mx.float32)
    prompt, canvas, sc_logits = (mx.array(a) for a in bench.bench_inputs(spec))
    canvas = canvas.astype(mx.int32)
    cache = model.make_cache()
    prefill(model, prompt, cache)
    C = canvas.shape[1]
    cfg = SamplerConfig(max_denoising_steps=16)

    def clock(fn) -> float:
        return statistics.median(bench.repeat_seconds(lambda: mx.eval(fn()), reps))

    def state(sc, B=1):
        z = canvas
        no = mx.zeros((B, C), dtype=mx.bool_)
        return FastState(
            z, z, no, no, mx.zeros((B, C)), init_history(cfg, B, C), mx.zeros((B,), dtype=mx.bool_), sc
        )

    out: dict = {
        "scale": scale,
        "spec": spec["text"],
        "canvas": C,
        "prompt": spec["prompt_len"],
        "k": k,
        "openblas": bench.openblas_mapped(),
        "other_runnable": bench.other_runnable(),
    }
    bench.progress(f"{scale}: reference pass and sampler step")
    out["ref_pass_s"] = clock(lambda: model.denoise(canvas, cache, sc_logits))
    logits = model.denoise(canvas, cache, sc_logits)
    out["ref_step_s"] = clock(
        lambda: denoise_step(
            logits,
            canvas,
            canvas,
            sc_logits,
            mx.zeros((1,), dtype=mx.bool_),
            init_history(cfg, 1, C),
            8,
            mx.random.key(0),
            cfg,
        )
    )
    every = mx.arange(C, dtype=mx.int32)[None]
    _, stores = forward(model, canvas, cache, dense_soft(model, sc_logits), every, None, C)
    mx.eval(stores)
    top_ids = mx.argpartition(-sc_logits, kth=k - 1, axis=-1)[..., :k].astype(mx.int32)
    top_vals = mx.take_along_axis(sc_logits, top_ids, axis=-1)
    fcfg = FastConfig(topk=k)
    sc = (mx.zeros((1, C, k)), mx.zeros((1, C, k), dtype=mx.int32))
    out["fast"] = {}
    for size in fcfg.sizes(C):
        bench.progress(f"{scale}: fast pass over {size} positions")
        pos = mx.sort(mx.random.permutation(C, key=mx.random.key(size))[:size]).astype(mx.int32)[None]
        tokens = mx.take_along_axis(canvas, pos, axis=1)

        def fast_pass(pos=pos, tokens=tokens):
            soft = sparse_soft(
                model,
                mx.take_along_axis(top_vals, pos[..., None], axis=1),
                mx.take_along_axis(top_ids, pos[..., None], axis=1),
            )
            return forward(model, tokens, cache, soft, pos, stores, C)[0]

        raw = fast_pass()

        def sampler(raw=raw, pos=pos):
            return fast_step(
                raw,
                pos,
                state(sc),
                mx.array(8, dtype=mx.int32),
                mx.random.key(0),
                cfg,
                fcfg,
                model.args.final_logit_softcapping,
                (1,),
                True,
            )

        out["fast"][size] = {"pass_s": clock(fast_pass), "step_s": clock(sampler)}
    return out


def tenth_table(costs: dict, fast_run: Run, ref_run: Run) -> str:
    C = costs["canvas"]
    full = costs["ref_pass_s"] + costs["ref_step_s"]
    lines = [
        "| decoder input | pass | sampler step | pass + step | vs the reference's full pass + step |",
        "|---|---|---|---|---|",
        f"| reference, {C} positions (dense SC, full-vocabulary sampler) | {1000 * costs['ref_pass_s']:.0f} ms "
        f"| {1000 * costs['ref_step_s']:.0f} ms | {1000 * full:.0f} ms | 1.00 |",
    ]
    for size, c in costs["fast"].items():
        both = c["pass_s"] + c["step_s"]
        lines.append(
            f"| fast, {size} positions (stale K/V, top-{costs['k']} SC and sampler) | "
            f"{1000 * c['pass_s']:.0f} ms | {1000 * c['step_s']:.0f} ms | {1000 * both:.0f} ms | "
            f"{both / full:.2f} |"
        )
    # Per canvas at the bucket mix fast mode used on the demo, mapped onto this canvas by fraction.
    demo_c = fast_run.canvas
    fast_sizes = sorted(costs["fast"])
    per_canvas_fast = 0.0
    for size, count in fast_run.sizes.items():
        mapped = next(s for s in fast_sizes if s >= size * C / demo_c - 1e-9)
        per_canvas_fast += count * (costs["fast"][mapped]["pass_s"] + costs["fast"][mapped]["step_s"])
    per_canvas_fast /= fast_run.result.canvases
    per_canvas_ref = ref_run.result.decoder_passes / ref_run.result.canvases * full
    lines.append(
        f"\nAt the measured pass counts and bucket mix (demo, scaled to {C} positions): reference "
        f"{1000 * per_canvas_ref:.0f} ms per canvas, fast {1000 * per_canvas_fast:.0f} ms "
        f"({per_canvas_ref / per_canvas_fast:.2f}x) on this CPU at {costs['scale']} scale."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# (d) the 26B projection

H, V, LAYERS, C26 = 2816, 262_144, 30, 256
EXPERTS, TOP_K, EXPERT_PARAMS = 128, 8, 3 * 704 * H  # gate, up, down of one expert in one layer
DENSE_PARAMS = 1.65e9  # attention + dense MLP, all layers (from the released shapes: docs/notes)
EMBED_PARAMS = V * H  # the tied embedding / LM head
BITS = 4.5  # 4-bit weights + group scales
KV_LEN = 512  # keys per query: a prompt of ~256 plus the canvas


def pass_cost(positions: int, sparse_sc: bool, topk: int) -> tuple[float, float]:
    """FLOPs and bytes of one 26B decoder pass + sampler step over ``positions`` canvas positions."""
    experts_woken = EXPERTS * (1 - (1 - TOP_K / EXPERTS) ** positions)  # uniform routing, per layer
    flops = 2 * positions * (DENSE_PARAMS + LAYERS * TOP_K * EXPERT_PARAMS + EMBED_PARAMS)
    flops += 2 * 2 * positions * KV_LEN * 16 * 256 * LAYERS  # attention scores and values
    flops += 2 * positions * (topk if sparse_sc else V) * H  # self-conditioning soft embedding
    weight_bytes = (DENSE_PARAMS + LAYERS * experts_woken * EXPERT_PARAMS + EMBED_PARAMS) * BITS / 8
    sc_bytes = positions * topk * H * 2 if sparse_sc else EMBED_PARAMS * BITS / 8
    # Sampler: float32 logits [positions, V] written by the head and read ~8 times by the reference's
    # softmax / entropy / draw / argmax / self-conditioning softmax; twice by a top-k step.
    sampler_bytes = positions * V * 4 * (2 if topk else 8)
    return flops, weight_bytes + sc_bytes + sampler_bytes


STOCK_TOK_S, STOCK_PASSES = (
    24.5,
    14,
)  # published stock MLX speed (mlx-vlm, 4-bit); the released sampler's ~12-16


def roofline(positions: int, sparse_sc: bool, topk: int, bandwidth: float, compute: float) -> float:
    flops, nbytes = pass_cost(positions, sparse_sc, topk)
    return max(flops / compute, nbytes / bandwidth)


def projection(runs: list[Run], bandwidths=(400e9, 546e9), compute=30e12) -> str:
    """Roofline of the 26B model: per pass at each position count, then per canvas at the measured counts."""
    floor_bytes = (LAYERS * EXPERTS * EXPERT_PARAMS) * BITS / 8
    lines = [
        f"Assumed: an M-series Max, {compute / 1e12:.0f} TFLOP/s fp16, "
        f"{' / '.join(f'{b / 1e9:.0f}' for b in bandwidths)} GB/s, {BITS}-bit weights; the 26B-A4B shapes "
        f"(hidden {H}, {LAYERS} layers, {EXPERTS} experts top-{TOP_K} of width 704, vocab {V}, canvas {C26}), "
        f"uniform routing, {KV_LEN} keys per query; a pass costs max(FLOPs / compute, bytes / bandwidth) "
        "(a roofline: no kernel inefficiency, perfect overlap).",
        f"Expert floor: a pass that wakes every expert streams {floor_bytes / 1e9:.1f} GB of expert weights, "
        + ", ".join(f"{1000 * floor_bytes / b:.0f} ms at {b / 1e9:.0f} GB/s" for b in bandwidths)
        + f"; with top-{TOP_K} of {EXPERTS}, 32 positions already wake "
        f"{EXPERTS * (1 - (1 - TOP_K / EXPERTS) ** 32):.0f} experts a layer, 8 positions "
        f"{EXPERTS * (1 - (1 - TOP_K / EXPERTS) ** 8):.0f}.",
        "",
        "| one pass | TFLOP | GB read | experts woken / layer | "
        + " | ".join(f"ms @ {b / 1e9:.0f} GB/s" for b in bandwidths)
        + " |",
        "|---|---|---|---|" + "---|" * len(bandwidths),
    ]
    for label, positions, sparse_sc, topk in [(f"reference, {C26} positions", C26, False, 0)] + [
        (f"fast, {p} positions", p, True, 64) for p in (256, 128, 64, 32)
    ]:
        flops, nbytes = pass_cost(positions, sparse_sc, topk)
        woken = EXPERTS * (1 - (1 - TOP_K / EXPERTS) ** positions)
        ms = " | ".join(f"{1000 * roofline(positions, sparse_sc, topk, b, compute):.0f}" for b in bandwidths)
        lines.append(f"| {label} | {flops / 1e12:.2f} | {nbytes / 1e9:.1f} | {woken:.0f} | {ms} |")
    ref_canvas = STOCK_PASSES * roofline(C26, False, 0, bandwidths[0], compute)
    efficiency = STOCK_TOK_S / (C26 * 0.75 / ref_canvas)
    ref_passes = runs[0].result.decoder_passes / runs[0].result.canvases
    lines += [
        "",
        f"Per canvas (tokens per canvas = the demo's kept fraction x {C26}; positions scaled from the "
        f"demo's canvas of {runs[0].canvas} to {C26}). 'calibrated': the roofline times {efficiency:.0%}, the "
        f"efficiency at which stock MLX reaches {STOCK_TOK_S} tok/s with the reference sampler at "
        f"~{STOCK_PASSES} passes per canvas (3/4 of the canvas kept). Two pass counts: as measured on the "
        f"demo, and at the released sampler's ~{STOCK_PASSES} passes per canvas for the reference, every "
        "setting's passes scaled by the same factor (an extrapolation from the demo's own pass counts).",
        "",
        "| pass counts | setting | passes / canvas | positions / pass | "
        + " | ".join(f"ms / canvas @ {b / 1e9:.0f}" for b in bandwidths)
        + " | tok/s roofline @ 400 | tok/s calibrated @ 400 | expert-floor ceiling tok/s @ 400 |",
        "|---|---|---|---|" + "---|" * (len(bandwidths) + 3),
    ]
    for scenario, scale in (("demo", 1.0), (f"~{STOCK_PASSES} / canvas", STOCK_PASSES / ref_passes)):
        for run in runs:
            r = run.result
            fast = bool(run.sizes)
            mix = (
                {size * C26 / run.canvas: count for size, count in run.sizes.items()}
                if fast
                else {C26: r.decoder_passes}
            )
            per = [
                scale
                * sum(
                    count * roofline(round(p), fast, 64 if fast else 0, b, compute)
                    for p, count in mix.items()
                )
                / r.canvases
                for b in bandwidths
            ]
            tokens = r.tokens / r.canvases * C26 / run.canvas
            passes = scale * r.decoder_passes / r.canvases
            ceiling = tokens / (passes * floor_bytes / bandwidths[0])
            lines.append(
                f"| {scenario} | {run.label} | {passes:.2f} | "
                f"{run.positions / r.decoder_passes * C26 / run.canvas:.0f} | "
                + " | ".join(f"{1000 * t:.0f}" for t in per)
                + f" | {tokens / per[0]:.0f} | {efficiency * tokens / per[0]:.0f} | {ceiling:.0f} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="target (default: the embedded demo model)")
    parser.add_argument("--n", type=int, default=100, help="held-out records for (a) (default 100)")
    parser.add_argument("--ablation-n", type=int, default=60, help="held-out records for (b) (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tenth",
        type=Path,
        default=Path("/tmp/bench-tenth"),
        help="folder of the tenth-scale checkpoint (built there if missing)",
    )
    parser.add_argument(
        "--scale",
        choices=sorted(bench.SIZES),
        default="tenth",
        help="size of (c)'s random checkpoint (default tenth; tiny for a quick check)",
    )
    parser.add_argument("--skip-tenth", action="store_true", help="skip (c)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions in (c) (default 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    for name in ("n", "ablation_n", "reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")

    import mlx.core as mx

    from mlx_dgemma import load
    from mlx_dgemma.decoding.fast import FastConfig

    # This CPU multiplies bf16 ~10x slower than fp32: evaluate in fp32 there (a Mac runs the stored bf16).
    model, tokenizer = load(args.model, mx.float32 if mx.default_device() == mx.cpu else None)
    items = task.split("test", max(args.n, args.ablation_n), task.is_long(model.args.canvas_length))
    settings = {
        "reference": (None, "none"),
        "fast": (FastConfig(), "none"),
        "drafter": (None, "auto"),
        "fast + drafter": (FastConfig(), "auto"),
    }
    runs = {
        label: run_setting(model, tokenizer, items[: args.n], label, args.seed, fast, drafter)
        for label, (fast, drafter) in settings.items()
    }
    ref = runs["reference"]
    print(f"## (a) Demo model, {args.n} held-out records, paired seeds (canvas {ref.canvas})\n")
    print(HEADER)
    for run in runs.values():
        print(run.row(ref))
    for label in ("fast", "fast + drafter", "drafter"):
        r = runs[label]
        pos = (ref.positions / ref.result.tokens) / (r.positions / r.result.tokens)
        wall = (ref.result.seconds / ref.result.tokens) / (r.result.seconds / r.result.tokens)
        passes = (ref.result.decoder_passes / ref.result.canvases) / (
            r.result.decoder_passes / r.result.canvases
        )
        print(
            f"\n{label}: {pos:.2f}x fewer decoder positions per token, {passes:.2f}x fewer passes per canvas, "
            f"{wall:.2f}x wall time per token against the reference",
            end="",
        )
    print("\n")

    off = FastConfig.off
    ablation = {
        "reference": None,
        "top-k sampler (k=64)": off(topk=64),
        "freeze": off(freeze=True),
        "freeze + sparse decoder (stale K/V, buckets)": off(freeze=True, sparse=True),
        "top-k + sparse self-conditioning": off(topk=64, sparse_sc=True),
        "freeze + EOS tail cut": off(freeze=True, eos_cut=True),
        "all (fast)": FastConfig(),
    }
    abl = {
        label: run_setting(model, tokenizer, items[: args.ablation_n], label, args.seed, fast, "none")
        for label, fast in ablation.items()
    }
    print(f"## (b) Ablation, {args.ablation_n} records, no drafter\n")
    print(HEADER)
    for run in abl.values():
        print(run.row(abl["reference"]))
    print()

    costs = None
    if not args.skip_tenth:
        costs = tenth_costs(args.tenth, args.reps, 64, args.scale)
        print(
            f"## (c) {args.scale.capitalize()}-scale random checkpoint (canvas {costs['canvas']}, prompt {costs['prompt']}, "
            f"vocab {costs['spec']['vocab_size']}, fp32, this CPU, OpenBLAS {'yes' if costs['openblas'] else 'NO'}, "
            f"{costs['other_runnable']:.1f} other runnable tasks): a pass + sampler step, median of {args.reps}\n"
        )
        print(tenth_table(costs, runs["fast"], ref))
        print()
    print("## (d) Projection for the 26B model\n")
    print(projection(list(runs.values())))
    if args.json:
        figures = {
            "demo": {k: r.summary() for k, r in runs.items()},
            "ablation": {k: r.summary() for k, r in abl.items()},
            "tenth": costs,
        }
        args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
