"""How much each quantization recipe changes the model: KL divergence and top-1 agreement of the decoder's
logits, quantized vs unquantized, per recipe and bit width.

    python -m benchmarks.quant_report                          # a small checkpoint written by the reference
    python -m benchmarks.quant_report --model PATH --bits 4 8  # any unquantized DiffusionGemma checkpoint

Each setting is converted with ``mlx_dgemma.convert`` into a temporary folder and loaded with
``mlx_dgemma.load_model``; both models denoise the same random canvases after the same random prompts, twice
(the first step without self-conditioning, the second conditioned on each model's own first-step logits, as
the sampler does). KL is KL(unquantized || quantized) in nats per canvas position.

The default checkpoint is well conditioned on purpose: random weights amplify any perturbation layer after
layer (deep random fixtures turn a 1e-3 weight error into O(1) logit changes), which says nothing about a
trained model. It is written by the reference (``tests.reference.make_fixture``, transformers), with
every quantized width a multiple of 64 so that every module is quantized.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx_dgemma  # noqa: F401 (first: on Linux it loads a fast BLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np

from benchmarks.model import write_with_reference
from mlx_dgemma import load_model
from mlx_dgemma.convert import RECIPES, SUPPORTED_BITS, convert

REPORT_SPEC = {
    "text": {
        "vocab_size": 512,
        "hidden_size": 128,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_global_key_value_heads": 1,
        "head_dim": 32,
        "global_head_dim": 64,
        "num_experts": 8,
        "top_k_experts": 2,
        "sliding_window": 32,
        "max_position_embeddings": 4096,
        "use_bidirectional_attention": "vision",
    },
    "canvas_length": 16,
    "seed": 7,
    "prompt_len": 48,
    "batch_prompt_lens": [48, 30],
}


@dataclass(frozen=True)
class Row:
    """One recipe at one bit width."""

    recipe: str
    bits: int
    bits_per_weight: float
    kl_mean: float
    kl_max: float
    top1: float


def write_reference_checkpoint(folder: Path, spec: dict | None = None) -> Path:
    """Write the report's checkpoint with the reference (needs torch and transformers); returns its folder."""
    write_with_reference("make_fixture", spec or REPORT_SPEC, folder, "--scenarios", "none")
    return folder / "hf_released"


def decoder_logits(model, prompts: mx.array, canvases: mx.array) -> mx.array:
    """Logits of two denoising steps over ``canvases`` after ``prompts``: without, then with self-conditioning."""
    cache = model.make_cache()
    model.encode(prompts, cache)
    first = model.denoise(canvases, cache)
    second = model.denoise(canvases, cache, self_conditioning_logits=first)
    return mx.concatenate([first, second], axis=1)


def compare(reference: mx.array, logits: mx.array) -> tuple[float, float, float]:
    """(mean KL, max KL, top-1 agreement) of ``logits`` against ``reference``, over every position."""
    log_p = reference - mx.logsumexp(reference, axis=-1, keepdims=True)
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    top1 = (reference.argmax(axis=-1) == logits.argmax(axis=-1)).astype(mx.float32).mean()
    return float(kl.mean()), float(kl.max()), float(top1)


def random_inputs(
    vocab: int, batch: int, prompt_len: int, canvas_len: int, seed: int
) -> tuple[mx.array, mx.array]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab - 4, size=(batch, prompt_len + canvas_len))
    return mx.array(ids[:, :prompt_len], dtype=mx.int32), mx.array(ids[:, prompt_len:], dtype=mx.int32)


def measure(
    source: Path,
    recipes: tuple[str, ...] = RECIPES,
    bits: tuple[int, ...] = SUPPORTED_BITS,
    group_size: int = 64,
    batch: int = 8,
    prompt_len: int = 48,
    canvas_len: int = 16,
    seed: int = 0,
) -> list[Row]:
    """One :class:`Row` per recipe and bit width, against the unquantized ``source`` run in float32."""
    base = load_model(source, dtype=mx.float32)
    prompts, canvases = random_inputs(base.args.vocab_size, batch, prompt_len, canvas_len, seed)
    reference = decoder_logits(base, prompts, canvases)
    mx.eval(reference)
    del base
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-report-") as tmp:
        for recipe in recipes:
            for b in bits:
                out = Path(tmp) / f"{recipe}-{b}"
                result = convert(
                    source,
                    out,
                    quantize=True,
                    q_bits=b,
                    q_group_size=group_size,
                    q_recipe=recipe,
                    drop_vision=True,
                    progress=False,
                )
                logits = decoder_logits(load_model(out, dtype=mx.float32), prompts, canvases)
                rows.append(Row(recipe, b, result.bits_per_weight, *compare(reference, logits)))
    return rows


def format_table(rows: list[Row]) -> str:
    """A plain-text table, one line per row."""
    lines = [f"{'recipe':<8} {'bits':>4} {'bits/weight':>11} {'KL mean':>10} {'KL max':>10} {'top-1':>7}"]
    for r in rows:
        lines.append(
            f"{r.recipe:<8} {r.bits:>4} {r.bits_per_weight:>11.2f} {r.kl_mean:>10.2e} {r.kl_max:>10.2e} "
            f"{r.top1:>7.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="unquantized checkpoint (default: write the report's own)")
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--bits", nargs="+", type=int, default=list(SUPPORTED_BITS))
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="prompts (and canvases) per measurement")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--canvas-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="quant-report-ckpt-") as tmp:
        source = args.model or write_reference_checkpoint(Path(tmp))
        rows = measure(
            source,
            tuple(args.recipes),
            tuple(args.bits),
            args.group_size,
            args.batch,
            args.prompt_len,
            args.canvas_len,
            args.seed,
        )
    print(
        f"checkpoint: {args.model or 'reference-written report checkpoint (REPORT_SPEC)'}; "
        f"{args.batch} x {args.canvas_len} positions x 2 denoising steps"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
