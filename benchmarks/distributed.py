"""What splitting DiffusionGemma over ranks buys and costs: weight memory per rank, decoder-pass time with
1 and 2 ranks, bytes exchanged per pass, and a projection for the released model on two Macs.

    python -m benchmarks.distributed                     # tenth-scale random model (built once in --dir)
    python -m benchmarks.distributed --size tiny         # seconds
    python -m benchmarks.distributed --json out.json

The checkpoint is random (MLX-initialised, float32, our parameter names), written once to ``--dir``. The
script measures one process, then launches itself on two ranks (``mlx.launch --backend ring -n 2`` over
loopback) and measures each rank. On one machine both ranks share its cores and memory bandwidth, so the
two-rank pass time here shows the cost of the split (collectives, smaller matmuls), not the gain that two
machines bring; the projection at the end estimates that from the measured bytes.

Also measured (``--experts``): one layer's routed experts per rank, split by width (what shard.py does)
against expert-parallel (each rank half of the experts at full width), on the same routed tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.model import ROOT, repeat_seconds
from mlx_dgemma.model.config import ModelArgs
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.model.loader import DEFAULT_MODEL, load_model
from mlx_dgemma.model.shard import weight_bytes
from mlx_dgemma.runtime.distributed import launched_group

TEXT = {
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "global_head_dim": 64,
        "num_experts": 8,
        "top_k_experts": 2,
        "sliding_window": 64,
    },
    # benchmarks.model's tenth scale: hidden 2816 -> 704 with the released ratios, 12 of 30 layers.
    "tenth": {
        "vocab_size": 32768,
        "hidden_size": 704,
        "intermediate_size": 1056,
        "moe_intermediate_size": 192,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "global_head_dim": 256,
        "num_experts": 32,
        "top_k_experts": 8,
        "sliding_window": 128,
    },
}
CANVAS, PROMPT = {"tiny": 32, "tenth": 256}, {"tiny": 40, "tenth": 200}
# The released 26B-A4B (notes/architecture.md): 25 sliding + 5 global layers, hidden 2816, canvas 256.
RELEASED = {"sliding": 25, "full": 5, "hidden": 2816, "canvas": 256, "bytes_per_value": 2}


def make_checkpoint(size: str, folder: Path) -> Path:
    """A random checkpoint of ``size`` in ``folder`` (kept: building the tenth-scale one takes a while)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import mlx.core as mx
    from mlx.utils import tree_flatten

    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    text = {**config["text_config"], **TEXT[size], "max_position_embeddings": 8192}
    n = text["num_hidden_layers"]
    text["layer_types"] = [
        "full_attention" if i % 6 == 5 or i == n - 1 else "sliding_attention" for i in range(n)
    ]
    config.update(text_config=text, canvas_length=CANVAS[size])
    model = Model(ModelArgs.from_config(config))
    for layer in model.layers:  # keep attention logits tame (scale 1.0): see notes/architecture.md
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight = mx.full(norm.weight.shape, layer.self_attn.head_dim**-0.25)
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return folder


class Counter:
    """Counts the collectives of the sharded layers and the bytes they reduce (patched over all_sum)."""

    def __init__(self):
        import mlx.core as mx

        self.calls, self.bytes, self._all_sum = 0, 0, mx.distributed.all_sum
        mx.distributed.all_sum = self

    def __call__(self, x, **kwargs):
        self.calls += 1
        self.bytes += x.nbytes
        return self._all_sum(x, **kwargs)


def pass_times(model, size: str, reps: int, barrier=None) -> dict:
    """Median time of a decoder pass with self-conditioning over a full canvas, the prompt in the cache."""
    import mlx.core as mx

    rng = np.random.default_rng(0)
    vocab = model.args.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(4, vocab, (1, PROMPT[size]))), cache)
    mx.eval(cache.state_arrays())
    canvas = mx.array(rng.integers(4, vocab, (1, CANVAS[size])))
    sc = mx.array(rng.normal(0, 3, (1, CANVAS[size], vocab)).astype(np.float32))
    counter = Counter() if barrier is not None else None
    mx.eval(model.denoise(canvas, cache, sc))  # warm-up, and one pass of collectives counted
    counted = (counter.calls, counter.bytes) if counter else (0, 0)
    times = []
    for _ in range(reps):
        if barrier is not None:
            barrier()
        start = time.perf_counter()
        mx.eval(model.denoise(canvas, cache, sc))
        times.append(time.perf_counter() - start)
    return {
        "pass_s": statistics.median(times),
        "collectives_per_pass": counted[0],
        "bytes_reduced_per_pass": counted[1],
    }


def expert_times(size: str, folder: Path, reps: int) -> dict:
    """One layer's experts on one of two ranks: width-split (all experts, half width) vs expert-parallel."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_dgemma.model.diffusion_gemma import Experts, Router

    args = ModelArgs.from_config(json.loads((folder / "config.json").read_text()))
    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(0, 1, (1, CANVAS[size], args.hidden_size)).astype(np.float32))
    idx, weights = Router(args)(x)
    full = Experts(args)
    mx.eval(full.parameters(), idx, weights)
    e, width = args.num_experts, args.moe_intermediate_size
    split = Experts(args)
    split.intermediate = width // 2
    gu = full.gate_up_proj.weight
    split.gate_up_proj.weight = mx.concatenate(
        [gu[:, : width // 2], gu[:, width : width + width // 2]], axis=1
    )
    split.down_proj.weight = full.down_proj.weight[..., : width // 2]
    mx.eval(split.parameters())

    def expert_parallel():  # rank 0's half of the experts at full width, on the pairs routed to them
        flat = np.array(idx).reshape(-1)
        xs = x.reshape(-1, x.shape[-1])
        outs = []
        for expert in range(e // 2):
            rows = np.flatnonzero(flat == expert) // idx.shape[-1]
            if rows.size:
                seg = xs[mx.array(rows)]
                g = seg @ gu[expert].T
                outs.append((nn.gelu_approx(g[:, :width]) * g[:, width:]) @ full.down_proj.weight[expert].T)
        return mx.concatenate(outs, axis=0)

    def timed(fn):
        return statistics.median(repeat_seconds(lambda: mx.eval(fn()), reps))

    local = int((np.array(idx) < e // 2).sum())
    return {
        "experts_whole_s": timed(lambda: full(x, idx, weights)),
        "experts_width_split_s": timed(lambda: split(x, idx, weights)),
        "experts_expert_parallel_s": timed(expert_parallel),
        "expert_parallel_pairs_on_rank0": local,
        "pairs": int(idx.size),
    }


def rank_main(args: argparse.Namespace) -> None:
    import mlx.core as mx

    group = launched_group()
    model = load_model(args.folder, mx.float32, group)
    mx.eval(model.parameters())  # one process loads lazily: materialise before measuring
    barrier = (lambda: mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=group))) if group else None
    result = {
        "rank": group.rank() if group else 0,
        "weight_bytes": weight_bytes(model),
        "peak_bytes_after_load": mx.get_peak_memory(),
        **pass_times(model, args.size, args.reps, barrier),
    }
    if group is None or group.rank() == 0:
        Path(args.result).write_text(json.dumps(result))


def projection(measured_ratio: float | None) -> list[str]:
    """Bytes each released-model pass exchanges, and the time that takes over Thunderbolt 5."""
    r = RELEASED
    per_sum = r["canvas"] * r["hidden"] * r["bytes_per_value"]
    # per sliding layer: attention + (dense, experts) together = 3 hidden widths; per global layer: 2
    payload = (3 * r["sliding"] + 2 * r["full"]) * per_sum
    calls = 2 * r["sliding"] + r["full"]
    lines = [
        f"released model, canvas {r['canvas']}, bf16 activations: {calls} all-reduces per pass, "
        f"{payload / 1e6:.1f} MB reduced per pass; a 2-rank ring all-reduce sends and receives that much "
        "on each rank"
    ]
    if measured_ratio is not None:
        lines.append(f"(the formula above gives {measured_ratio:.3f}x the bytes counted at this scale)")
    for name, gbps, latency in (
        ("TB5 at 80 Gb/s line rate", 80, 10e-6),
        ("TB5 at 40 Gb/s achieved", 40, 30e-6),
        ("TCP ring over TB at 20 Gb/s", 20, 50e-6),
    ):
        seconds = payload * 8 / (gbps * 1e9) + calls * latency
        lines.append(f"  {name}, {latency * 1e6:.0f} us per collective: {seconds * 1e3:.0f} ms per pass")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(TEXT), default="tenth")
    p.add_argument("--dir", help="where the random checkpoint is kept (default: a folder in the temp dir)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank:
        rank_main(args)
        return 0
    folder = make_checkpoint(args.size, Path(args.dir or Path(tempfile.gettempdir()) / f"dgemma-{args.size}"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = Path(tmp) / f"ranks{n}.json"
            worker = [
                sys.executable,
                "-m",
                "benchmarks.distributed",
                "--rank",
                "--size",
                args.size,
                "--reps",
                str(args.reps),
                "--folder",
                str(folder),
                "--result",
                str(out),
            ]
            if n > 1:  # mlx.launch's own entry point; the ports are free ones on loopback
                launcher = [
                    sys.executable,
                    "-c",
                    "from mlx._distributed_utils.launch import main; main()",
                    "--backend",
                    "ring",
                    "-n",
                    str(n),
                    "-p",
                    str(random.randrange(20000, 60000, 16)),
                    "--python",
                    sys.executable,
                ]
                worker = [*launcher, *worker[1:]]
            subprocess.run(worker, check=True, stdin=subprocess.DEVNULL, cwd=ROOT, timeout=3600)
            results[n] = json.loads(out.read_text())
    experts = expert_times(args.size, folder, args.reps)
    one, two = results[1], results[2]
    print(
        f"model: {args.size} scale, float32, {folder}; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores (timings are only meaningful on a quiet machine)"
    )
    print(
        f"weights per rank: 1 rank {one['weight_bytes'] / 1e6:.1f} MB; 2 ranks {two['weight_bytes'] / 1e6:.1f} MB "
        f"({two['weight_bytes'] / one['weight_bytes']:.0%}); peak during load {two['peak_bytes_after_load'] / 1e6:.1f} MB"
    )
    print(
        f"decoder pass (canvas {CANVAS[args.size]}, self-conditioning, median of {args.reps}): "
        f"1 rank {one['pass_s'] * 1e3:.0f} ms; 2 ranks on this machine {two['pass_s'] * 1e3:.0f} ms"
    )
    print(
        f"exchanged per pass: {two['collectives_per_pass']} all-reduces, {two['bytes_reduced_per_pass'] / 1e6:.2f} MB "
        "reduced (each rank sends and receives as much in a 2-rank ring)"
    )
    print(
        f"experts of one layer, per rank of 2: whole {experts['experts_whole_s'] * 1e3:.1f} ms; width-split "
        f"{experts['experts_width_split_s'] * 1e3:.1f} ms; expert-parallel {experts['experts_expert_parallel_s'] * 1e3:.1f} ms "
        f"({experts['expert_parallel_pairs_on_rank0']} of {experts['pairs']} routed pairs on rank 0); "
        "the bytes exchanged are the same"
    )
    scale = TEXT[args.size]
    n_full = sum(
        1 for i in range(scale["num_hidden_layers"]) if i % 6 == 5 or i == scale["num_hidden_layers"] - 1
    )
    formula = (
        (3 * (scale["num_hidden_layers"] - n_full) + 2 * n_full)
        * CANVAS[args.size]
        * scale["hidden_size"]
        * 4
    )
    for line in projection(formula / max(two["bytes_reduced_per_pass"], 1)):
        print(line)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"size": args.size, "ranks": results, "experts": experts}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
