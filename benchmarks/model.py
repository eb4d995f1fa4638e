"""Speed of mlx_dgemma against the transformers reference, on one random checkpoint, side by side.

    python -m benchmarks.model                     # tenth-scale model, 1 canvas x 8 steps (a few minutes)
    python -m benchmarks.model --size tiny         # quick check (seconds)
    python -m benchmarks.model --steps 16 --canvases 2 --keep /tmp/bench-tenth --json results.json
    python -m benchmarks.model --keep /tmp/bench-tenth --profile   # also split our decoder pass into parts
    python -m benchmarks.model --spec '{"text": {...}, "canvas_length": 64, "prompt_len": 50}'

The checkpoint is built with ``tests.reference.make_fixture`` (random weights, saved by the reference in
``save_pretrained`` layout). Each side then runs in its own process (this module with ``--worker``): our
package preloads OpenBLAS, which speeds MLX up but slows torch ~3x, so the reference worker gets an
environment without ``LD_PRELOAD`` and never imports mlx. Both run the same dtype (float32 by default;
bfloat16 has no fast kernels on x86 CPUs) on the same prompt ids, torch with its default thread count.

Measured per side:
  load         checkpoint folder -> model ready (weights materialised)
  prefill      encoder over the prompt into a fresh KV cache (median of --reps, after one warm-up)
  decoder pass one denoising forward over a full canvas with self-conditioning logits (median of --reps,
               after one warm-up), the cache holding the prompt
  generation   end to end from the prompt ids: prefill, then K canvases x N steps (adaptive stopping off,
               EOS disabled, so both sides do exactly K x N decoder passes), committed canvases encoded;
               after a 1-canvas x 1-step warm-up call (the reference's first generate() imports inductor)
  peak RSS     the worker process's peak resident memory (ours also reports MLX's own peak allocation)

The machine should be quiet: other processes on the same cores inflate wall times, torch's most (its
threads wait on each other). The load line and a warning say when it was not.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent  # the repository root: the modules run below are found from it
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"  # what mlx_dgemma preloads on Linux
FIRST_FREE_ID = 4  # ids below are pad / eos / bos (make_fixture.SPECIAL_TOKENS)
SC_LOGITS_STD = 3.0  # self-conditioning logits for the isolated decoder pass, as in make_fixture
BUSY = 0.5  # other runnable tasks (mean over a second) above which the machine is not quiet
NEVER_CONFIDENT = 1e-30  # reference confidence_threshold: a mean entropy this low never happens

TINY_TEXT = {  # tests/conftest.py BASE_TEXT
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 48,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_global_key_value_heads": 1,
    "head_dim": 16,
    "global_head_dim": 32,
    "num_experts": 8,
    "top_k_experts": 2,
    "sliding_window": 16,
    "max_position_embeddings": 4096,
    "use_bidirectional_attention": "vision",
}
SMALL_TEXT = {
    **TINY_TEXT,
    "vocab_size": 8192,
    "hidden_size": 256,
    "intermediate_size": 384,
    "moe_intermediate_size": 96,
    "head_dim": 64,
    "global_head_dim": 128,
    "num_experts": 16,
    "top_k_experts": 4,
    "sliding_window": 64,
}
# About a tenth of the released 26B-A4B in width (hidden 2816 -> 704, same ratios), 12 of its 30 layers.
TENTH_TEXT = {
    "vocab_size": 32768,
    "hidden_size": 704,
    "intermediate_size": 1056,
    "moe_intermediate_size": 192,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_global_key_value_heads": 1,
    "head_dim": 128,
    "global_head_dim": 256,
    "num_experts": 32,
    "top_k_experts": 8,
    "sliding_window": 128,
    "max_position_embeddings": 8192,
    "use_bidirectional_attention": "vision",
}
SIZES = {
    "tiny": {"text": TINY_TEXT, "canvas_length": 32, "prompt_len": 40},
    "small": {"text": SMALL_TEXT, "canvas_length": 128, "prompt_len": 100},
    "tenth": {"text": TENTH_TEXT, "canvas_length": 256, "prompt_len": 200},
}


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def bench_inputs(spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt [1, P], canvas [1, C] (ids clear of the special ones) and self-conditioning logits [1, C, V]."""
    vocab, canvas_len = spec["text"]["vocab_size"], spec["canvas_length"]
    rng = np.random.default_rng(spec["seed"])
    ids = lambda n: rng.integers(FIRST_FREE_ID, vocab - FIRST_FREE_ID, size=(1, n))  # noqa: E731
    prompt, canvas = ids(spec["prompt_len"]), ids(canvas_len)
    sc_logits = (rng.standard_normal((1, canvas_len, vocab)) * SC_LOGITS_STD).astype(np.float32)
    return prompt, canvas, sc_logits


# ---------------------------------------------------------------------------------------------------------
# Workers: each measures one side and prints one JSON line on stdout.


def run_ours(hf: Path, spec: dict, cfg: dict) -> dict:
    # mlx_dgemma first: it preloads OpenBLAS before mlx is imported.
    import mlx_dgemma  # noqa: I001
    import mlx.core as mx
    from mlx_dgemma.decoding.block_loop import prefill

    prompt, canvas, sc_logits = (mx.array(a) for a in bench_inputs(spec))
    out = {"mlx": mx.__version__, "openblas": openblas_mapped()}

    def load() -> mlx_dgemma.Model:
        model = mlx_dgemma.load_model(hf, dtype=getattr(mx, cfg["dtype"]))
        mx.eval(model.parameters())
        return model

    progress("ours: load")
    out["load_s"], model = timed(load)
    progress(f"ours: prefill x {cfg['reps']} (+1 warm-up)")
    out.update(repeat_time("prefill", lambda: prefill(model, prompt, model.make_cache()), cfg["reps"]))
    cache = model.make_cache()
    prefill(model, prompt, cache)
    progress(f"ours: decoder pass x {cfg['reps']} (+1 warm-up)")
    out.update(repeat_time("decoder", lambda: mx.eval(model.denoise(canvas, cache, sc_logits)), cfg["reps"]))
    if cfg["profile"]:
        progress("ours: decoder pass by part")
        out["profile"] = profile_ours(model, cache, canvas, sc_logits, cfg["reps"])
    out.update(time_generation("ours", functools.partial(ours_generate, model, prompt), cfg))
    out["mlx_peak_gb"] = mx.get_peak_memory() / 2**30
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def profile_ours(model, cache, canvas, sc_logits, reps: int) -> dict[str, float]:
    """Our decoder pass (and one sampler step) split into parts, each evaluated on its own: median seconds.

    Parts are timed one layer at a time on the real activations; the cache holds one unpadded prompt, so
    every attention mask is None (as ``Model.denoise`` builds it then).
    """
    import mlx.core as mx

    from mlx_dgemma.decoding.sampler import SamplerConfig, denoise_step, init_history

    def seconds(fn, *args) -> float:
        return repeat_time("part", lambda: mx.eval(fn(*args)), reps)["part_s"]

    decoder = model.model.decoder

    def self_conditioning():
        soft = decoder.soft_embed(mx.softmax(sc_logits, axis=-1))
        return decoder.self_conditioning(decoder.embed(canvas), soft)

    parts = {"self-conditioning (softmax, soft embedding, MLP)": seconds(self_conditioning)}
    h = self_conditioning()
    for layer, layer_cache in zip(decoder.layers, cache):
        for name, t in profile_layer(layer, layer_cache, h, seconds).items():
            parts[name] = parts.get(name, 0.0) + t
        h = layer(h, layer_cache, None, write=False, layer_scalar=layer.layer_scalar)
        mx.eval(h)
    logits = model.logits(decoder.norm(h))
    parts["LM head + soft-cap"] = seconds(lambda: model.logits(decoder.norm(h)))
    cfg = SamplerConfig(max_denoising_steps=8)
    state = (canvas, canvas, sc_logits, mx.zeros((1,), dtype=mx.bool_), init_history(cfg, 1, canvas.shape[1]))
    parts["sampler step (outside the pass)"] = seconds(denoise_step, logits, *state, 8, mx.random.key(0), cfg)
    return parts


def profile_layer(layer, layer_cache, h, seconds) -> dict[str, float]:
    """One decoder layer's parts (see ``DecoderLayer.__call__``), norms included with the part they feed."""
    x = layer.input_layernorm(h)
    attention = seconds(lambda: layer.self_attn(x, layer_cache, None, False))
    h = h + layer.post_attention_layernorm(layer.self_attn(x, layer_cache, None, False))
    dense = seconds(lambda: layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(h))))
    router = seconds(layer.router, h)
    idx, weights = layer.router(h)
    experts_in = layer.pre_feedforward_layernorm_2(h)
    experts = seconds(lambda: layer.post_feedforward_layernorm_2(layer.experts(experts_in, idx, weights)))
    return {
        "attention (norms, projections, RoPE, SDPA)": attention,
        "dense MLP": dense,
        "router": router,
        "routed experts (gather_mm)": experts,
    }


def ours_generate(model, prompt, canvases: int, steps: int) -> tuple[int, int]:
    """Prefill, then ``canvases`` x ``steps``, adaptive stopping and EOS off: (tokens, decoder passes)."""
    import mlx_dgemma
    from mlx_dgemma.decoding.block_loop import CommitEvent, generate_tokens, prefill

    cache = model.make_cache()
    prefill(model, prompt, cache)
    sampler = mlx_dgemma.SamplerConfig(max_denoising_steps=steps)
    events = generate_tokens(
        model,
        cache,
        max_tokens=canvases * model.args.canvas_length,
        cfg=sampler,
        seed=0,
        adaptive_stopping=False,
        eos_ids=[-1],
    )
    commits = [event for event in events if isinstance(event, CommitEvent)]
    return sum(c.tokens.shape[1] for c in commits), sum(int(c.decoder_passes.sum()) for c in commits)


def run_reference(hf: Path, spec: dict, cfg: dict) -> dict:
    import torch
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    prompt, canvas, sc_logits = (torch.from_numpy(a) for a in bench_inputs(spec))
    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }

    progress("reference: load")
    dtype = getattr(torch, cfg["dtype"])
    out["load_s"], model = timed(DiffusionGemmaForBlockDiffusion.from_pretrained, hf, dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None  # as ours (eos_ids=[-1]): every canvas is generated
    with torch.inference_mode():
        progress(f"reference: prefill x {cfg['reps']} (+1 warm-up)")
        out.update(repeat_time("prefill", lambda: reference_encode(model, prompt), cfg["reps"]))
        cache = reference_encode(model, prompt)
        progress(f"reference: decoder pass x {cfg['reps']} (+1 warm-up)")

        def decode():
            return model(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=sc_logits)

        out.update(repeat_time("decoder", decode, cfg["reps"]))
        torch.manual_seed(0)
        out.update(time_generation("reference", functools.partial(reference_generate, model, prompt), cfg))
    out["peak_rss_gb"] = peak_rss_gb()
    out["mlx_imported"] = any(name.split(".")[0] in ("mlx", "mlx_dgemma") for name in sys.modules)
    out["openblas"] = openblas_mapped()
    return out


def reference_encode(model, prompt):
    """The reference's prefill: the encoder over the prompt into a fresh cache, as generate() builds it."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    model.model.encoder(input_ids=prompt, past_key_values=cache, use_cache=True)
    return cache


def reference_generate(model, prompt, canvases: int, steps: int) -> tuple[int, int]:
    """``model.generate`` with adaptive stopping made impossible: stability needs more steps than there are,
    confidence an impossible mean entropy (EOS is off in the model's generation config)."""
    result = model.generate(
        prompt,
        max_new_tokens=canvases * model.config.canvas_length,
        max_denoising_steps=steps,
        stability_threshold=steps + 1,
        confidence_threshold=NEVER_CONFIDENT,
        return_dict_in_generate=True,
    )
    tokens = result.sequences[0, prompt.shape[1] :]
    # tokens_per_forward counts non-pad tokens only (a random model does emit the pad id).
    non_pad = int((tokens != model.generation_config.pad_token_id).sum())
    return len(tokens), round(non_pad / float(result.tokens_per_forward[0]))


def time_generation(side: str, generate, cfg: dict) -> dict:
    """Wall and process CPU time (all threads) of ``generate(canvases, steps)``, and the load around it.

    A 1-canvas x 1-step call comes first: the reference's first generate() imports torch._inductor (~1.5 s).
    """
    progress(f"{side}: generation warm-up (1 canvas x 1 step)")
    generate(1, 1)
    progress(f"{side}: generation, {cfg['canvases']} canvas(es) x {cfg['steps']} steps")
    cpu, load = time.process_time(), os.getloadavg()[0]
    wall, (tokens, passes) = timed(generate, cfg["canvases"], cfg["steps"])
    return {
        "generation_s": wall,
        "generation_cpu_s": time.process_time() - cpu,
        "tokens": tokens,
        "passes": passes,
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def repeat_seconds(fn, reps: int) -> list[float]:
    """Seconds of ``reps`` calls of ``fn``, after one untimed warm-up call (``fn`` must finish its work: wrap
    MLX code in ``mx.eval``). The one timing loop of the benchmarks."""
    fn()
    return [timed(fn)[0] for _ in range(reps)]


def repeat_time(name: str, fn, reps: int) -> dict:
    """``{name}_s``: the median of ``reps`` timed calls after one warm-up; ``{name}_times``: all of them."""
    times = repeat_seconds(fn, reps)
    return {f"{name}_s": statistics.median(times), f"{name}_times": times}


def openblas_mapped() -> bool:
    """Whether Debian's OpenBLAS is loaded in this process."""
    with open("/proc/self/maps") as maps:
        return any("openblas-pthread" in line for line in maps)


def worker(side: str, checkpoint: Path, config: str) -> None:
    cfg = json.loads(config)
    run = run_ours if side == "ours" else run_reference
    print(json.dumps(run(checkpoint / "hf", cfg["spec"], cfg)), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Driver: checkpoint, workers, table.


def build_spec(args: argparse.Namespace) -> dict:
    spec = json.loads(args.spec) if args.spec else dict(SIZES[args.size])
    spec.setdefault("seed", 0)
    if args.prompt_len is not None:
        spec["prompt_len"] = args.prompt_len
    spec.setdefault("batch_prompt_lens", [spec["prompt_len"], max(1, spec["prompt_len"] // 2)])  # required
    return spec


def reference_env() -> dict[str, str]:
    """No OpenBLAS preload for torch (it slows it ~3x)."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def write_with_reference(builder: str, spec: dict, out: Path, *extra: str) -> None:
    """``python -m tests.reference.<builder> --spec SPEC --out OUT``: a random checkpoint written by the
    reference (torch, transformers) in its own process, without the OpenBLAS preload (its stdout dropped)."""
    command = [
        sys.executable,
        "-m",
        f"tests.reference.{builder}",
        "--spec",
        json.dumps(spec),
        "--out",
        str(out),
    ]
    subprocess.run([*command, *extra], check=True, env=reference_env(), cwd=ROOT, stdout=subprocess.DEVNULL)


def ensure_checkpoint(spec: dict, folder: Path) -> None:
    """Builds the checkpoint in ``folder`` unless it already holds one for the same spec."""
    stamp = folder / "bench_spec.json"
    built = (folder / "hf" / "config.json").is_file() and stamp.is_file()
    if built and json.loads(stamp.read_text()) == spec:
        progress(f"reusing checkpoint {folder}")
        return
    progress(f"building checkpoint in {folder}")
    write_with_reference("make_fixture", spec, folder, "--scenarios", "none")
    stamp.write_text(json.dumps(spec))


def run_worker(side: str, folder: Path, cfg: dict) -> dict:
    env = os.environ.copy() if side == "ours" else reference_env()
    command = [sys.executable, "-m", "benchmarks.model", "--worker", side, "--checkpoint", str(folder)]
    command += ["--worker-config", json.dumps(cfg)]
    done = subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def other_runnable(samples: int = 10, interval: float = 0.1) -> float:
    """Mean number of runnable tasks besides this one (``/proc/loadavg``), sampled over about a second."""
    counts = []
    for _ in range(samples):
        with open("/proc/loadavg") as loadavg:
            counts.append(int(loadavg.read().split()[3].split("/")[0]) - 1)
        time.sleep(interval)
    return statistics.mean(counts)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def derived(side: dict, spec: dict) -> dict:
    """Adds rates: prefill tokens/s, generation tokens/s, seconds per decoder step."""
    return {
        **side,
        "prefill_tok_s": spec["prompt_len"] / side["prefill_s"],
        "tokens_per_s": side["tokens"] / side["generation_s"],
        "s_per_step": side["generation_s"] / side["passes"],
    }


ROWS = [  # key, label, format, lower is better
    ("load_s", "load (s)", "{:.2f}", True),
    ("prefill_s", "prefill (s)", "{:.3f}", True),
    ("prefill_tok_s", "prefill (tok/s)", "{:.0f}", False),
    ("decoder_s", "decoder pass (s, median)", "{:.3f}", True),
    ("generation_s", "generation (s, end to end)", "{:.2f}", True),
    ("generation_cpu_s", "generation (CPU s, all threads)", "{:.2f}", True),
    ("tokens_per_s", "generation (tok/s)", "{:.1f}", False),
    ("s_per_step", "generation (s / decoder step)", "{:.3f}", True),
    ("peak_rss_gb", "peak RSS (GB)", "{:.2f}", True),
]


def table(ours: dict, ref: dict) -> str:
    """Rows of both sides, their ratio us/ref, and how many times better ours is (whichever way is better)."""
    header = ("", "mlx_dgemma", "reference", "us/ref", "ours better")
    lines = [header]
    for key, label, fmt, lower_better in ROWS:
        ratio = ours[key] / ref[key]
        better = 1 / ratio if lower_better else ratio
        lines.append((label, fmt.format(ours[key]), fmt.format(ref[key]), f"{ratio:.2f}", f"{better:.2f}x"))
    lines.append(("MLX peak allocation (GB)", f"{ours['mlx_peak_gb']:.2f}", "", "", ""))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    rows = [[row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])] for row in lines]
    rows.insert(1, ["-" * w for w in widths])
    note = "ours better: >1x means mlx_dgemma is ahead on that row (faster or smaller), <1x behind"
    return "\n".join(["  ".join(row) for row in rows] + [note])


def profile_table(ours: dict) -> str:
    parts = ours["profile"]
    in_pass = sum(t for name, t in parts.items() if "sampler" not in name)
    width = max(map(len, parts))
    lines = [f"{'our decoder pass, by part':{width}}  {'s':>6}  {'share':>6}"]
    for name, t in parts.items():
        share = f"{100 * t / in_pass:5.1f}%" if "sampler" not in name else ""
        lines.append(f"{name:{width}}  {t:6.3f}  {share:>6}")
    total = "sum of the parts / whole pass (median)"
    lines.append(f"{total:{width}}  {in_pass:6.3f}  / {ours['decoder_s']:.3f}")
    return "\n".join(lines)


def header(spec: dict, cfg: dict, ours: dict, ref: dict) -> str:
    t = spec["text"]
    return "\n".join(
        [
            f"machine:  {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.system()}",
            f"versions: mlx {ours['mlx']}, torch {ref['torch']} ({ref['torch_threads']} threads), "
            f"transformers {ref['transformers']}; OpenBLAS for MLX: {'yes' if ours['openblas'] else 'NO'}",
            f"model:    vocab {t['vocab_size']}, hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, "
            f"{t['num_experts']} experts top-{t['top_k_experts']} (width {t['moe_intermediate_size']}), "
            f"dense {t['intermediate_size']}, head_dim {t['head_dim']}/{t['global_head_dim']}, {cfg['dtype']}",
            f"run:      prompt {spec['prompt_len']}, canvas {spec['canvas_length']}, "
            f"{cfg['canvases']} canvas(es) x {cfg['steps']} steps = {ours['passes']} / {ref['passes']} "
            "decoder passes (ours / ref), "
            f"{ours['tokens']} tokens; prefill and decoder pass: median of {cfg['reps']}",
            f"load:     {cfg['busy_before']:.1f} / {cfg['busy_after']:.1f} other runnable tasks before / after; "
            f"1-min load average around generation {ours['load_before']:.2f} -> {ours['load_after']:.2f} (ours), "
            f"{ref['load_before']:.2f} -> {ref['load_after']:.2f} (reference)",
        ]
    )


def check(cfg: dict, ours: dict, ref: dict) -> list[str]:
    warnings = []
    if max(cfg["busy_before"], cfg["busy_after"]) > BUSY:
        warnings.append(
            "other processes were running: they share the cores, so wall times are inflated, "
            "torch's the most (see the load line; rerun on a quiet machine)"
        )
    if not os.path.exists(OPENBLAS):
        warnings.append(
            f"{OPENBLAS} is missing: MLX runs on its reference BLAS, ~100x slower matmuls "
            "(apt-get install libopenblas0-pthread)"
        )
    if ref["mlx_imported"] or ref["openblas"]:
        warnings.append("the reference worker had mlx or Debian's OpenBLAS loaded: its timings are off")
    if ours["passes"] != ref["passes"] or ours["tokens"] != ref["tokens"]:
        warnings.append("the two sides did different amounts of work")
    return warnings


def parse_args() -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tenth", help="model preset (default tenth)")
    parser.add_argument("--spec", help="custom make_fixture spec (JSON: text, canvas_length, prompt_len)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per canvas (default 8)")
    parser.add_argument("--canvases", type=int, default=1, help="canvases to generate (default 1)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens (default: the preset's)")
    parser.add_argument("--reps", type=int, default=5, help="timed decoder passes (default 5)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="weights and compute (default float32; bfloat16 is ~10x slower on x86 CPUs)",
    )
    parser.add_argument("--keep", type=Path, help="build (or reuse) the checkpoint in this folder")
    parser.add_argument("--profile", action="store_true", help="also split our decoder pass into its parts")
    parser.add_argument("--json", type=Path, help="also write all measurements here")
    parser.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("steps", "canvases", "reps", "prompt_len"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker, args.checkpoint, args.worker_config)
        return
    spec = build_spec(args)
    cfg = {
        "spec": spec,
        "steps": args.steps,
        "canvases": args.canvases,
        "reps": args.reps,
        "dtype": args.dtype,
        "profile": args.profile,
        "busy_before": other_runnable(),
    }
    with tempfile.TemporaryDirectory(prefix="dgemma-bench-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        ensure_checkpoint(spec, folder)
        ours = derived(run_worker("ours", folder, cfg), spec)
        ref = derived(run_worker("reference", folder, cfg), spec)
    cfg["busy_after"] = other_runnable()
    print(header(spec, cfg, ours, ref))
    print()
    print(table(ours, ref))
    if args.profile:
        print()
        print(profile_table(ours))
    for warning in check(cfg, ours, ref):
        print(f"WARNING: {warning}")
    if args.json:
        results = {"spec": spec, "config": cfg, "ours": ours, "reference": ref}
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
