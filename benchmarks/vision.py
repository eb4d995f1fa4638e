"""Image prefill, ours against the transformers reference, on a random checkpoint with a vision tower.

    python -m benchmarks.vision                      # tenth-scale text model + a reduced vision tower
    python -m benchmarks.vision --size tiny          # quick check
    python -m benchmarks.vision --keep /tmp/bench-vision --reps 5 --budget 280

The checkpoint is built by ``tests.reference.make_vision_fixture`` (random weights). Each side runs in its
own process (this module with ``--worker``; the reference without the OpenBLAS preload, as in
``benchmarks.model``), float32, on the same image and prompt: the image goes through each side's own image
processor (identical output), then the vision tower and the encoder over the prompt with the image's soft
tokens, into a fresh cache. Reported: median seconds of --reps runs after one warm-up, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.model import ROOT, TENTH_TEXT, TINY_TEXT, reference_env, repeat_seconds, write_with_reference

# A reduced Gemma 4 vision tower (the released one is ~27 layers of width 1152): 4 layers of width 384.
TENTH_VISION = {
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "head_dim": 64,
    "position_embedding_size": 10240,
}
SIZES = {
    "tiny": {
        "text": {k: v for k, v in TINY_TEXT.items() if k != "use_bidirectional_attention"},
        "vision": {},
    },
    "tenth": {
        "text": {k: v for k, v in TENTH_TEXT.items() if k != "use_bidirectional_attention"},
        "vision": TENTH_VISION,
    },
}


def inputs(budget: int, vocab: int, image_token: int, boi: int, eoi: int, counts: int) -> np.ndarray:
    """20 text tokens, the image's expanded placeholders, 10 text tokens."""
    rng = np.random.default_rng(0)
    text = lambda n: rng.integers(4, vocab - 4, size=n).tolist()  # noqa: E731
    return np.array([text(20) + [boi] + [image_token] * counts + [eoi] + text(10)])


def image() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8)


def median_time(fn, reps: int) -> float:
    return statistics.median(repeat_seconds(fn, reps))


def run_ours(hf: Path, budget: int, reps: int) -> dict:
    import mlx_dgemma  # noqa: I001  (preloads OpenBLAS before mlx)
    import mlx.core as mx
    from mlx_dgemma.model.image_processing import process_images

    model = mlx_dgemma.load_model(hf, dtype=mx.float32)
    v, vocab = model.vision_args, model.args.vocab_size

    def once():
        p = process_images([image()], budget, v.patch_size, v.pooling_kernel_size)
        ids = mx.array(
            inputs(
                budget,
                vocab,
                v.image_token_id,
                v.boi_token_id,
                v.eoi_token_id,
                p.num_soft_tokens_per_image[0],
            )
        )
        cache = model.make_cache()
        model.encode(
            ids,
            cache,
            pixel_values=mx.array(p.pixel_values),
            image_position_ids=mx.array(p.image_position_ids),
            mm_token_type_ids=(ids == v.image_token_id).astype(mx.int32),
        )
        mx.eval(cache.state_arrays())
        return ids.shape[1]

    return {"prefill_s": median_time(once, reps), "prompt_tokens": once()}


def run_reference(hf: Path, budget: int, reps: int) -> dict:
    import torch
    from PIL import Image
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.cache_utils import DynamicCache
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    model = DiffusionGemmaForBlockDiffusion.from_pretrained(hf, dtype=torch.float32).eval()
    c = model.config
    proc = Gemma4ImageProcessorPil(max_soft_tokens=budget)

    @torch.no_grad()
    def once():
        p = proc(images=[Image.fromarray(image())], return_tensors="pt")
        ids = torch.from_numpy(
            inputs(
                budget,
                c.text_config.vocab_size,
                c.image_token_id,
                c.boi_token_id,
                c.eoi_token_id,
                int(p["num_soft_tokens_per_image"][0]),
            )
        )
        cache = DynamicCache(config=c.get_text_config(decoder=True))
        position_ids = torch.arange(ids.shape[1])[None]
        mapping = model.model.encoder.create_masks_for_generate(
            config=c,
            inputs_embeds=torch.empty((1, ids.shape[1], 0)),
            attention_mask=torch.ones_like(ids).bool(),
            past_key_values=cache,
            position_ids=position_ids,
            mm_token_type_ids=(ids == c.image_token_id).long(),
        )
        model.model.encoder(
            input_ids=ids,
            pixel_values=p["pixel_values"],
            image_position_ids=p["image_position_ids"],
            attention_mask=mapping,
            past_key_values=cache,
            position_ids=position_ids,
            use_cache=True,
        )
        return ids.shape[1]

    return {
        "prefill_s": median_time(once, reps),
        "prompt_tokens": once(),
        "torch_threads": torch.get_num_threads(),
    }


def worker(side: str, hf: Path, budget: int, reps: int) -> dict:
    env = reference_env() if side == "reference" else dict(os.environ)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.vision",
        "--worker",
        side,
        "--hf",
        str(hf),
        "--budget",
        str(budget),
        "--reps",
        str(reps),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tenth")
    p.add_argument("--budget", type=int, default=280, help="soft tokens per image (70, 140, 280, 560, 1120)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--keep", type=Path, help="build (or reuse) the checkpoint here")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--hf", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run = run_ours if args.worker == "ours" else run_reference
        print(json.dumps(run(args.hf, args.budget, args.reps)))
        return
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-vision-"))
    if not (folder / "hf" / "config.json").exists():
        spec = {**SIZES[args.size], "seed": 0, "canvas_length": 32, "checkpoint_only": True}
        write_with_reference("make_vision_fixture", spec, folder)
    ours, ref = (
        worker("ours", folder / "hf", args.budget, args.reps),
        worker("reference", folder / "hf", args.budget, args.reps),
    )
    load = os.getloadavg()[0]
    print(
        f"{args.size}, one 640x480 image at {args.budget} soft tokens, {ours['prompt_tokens']}-token prompt, "
        f"float32, load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"image prefill: ours {ours['prefill_s']:.3f} s, reference {ref['prefill_s']:.3f} s "
        f"(torch {ref['torch_threads']} threads): ratio {ref['prefill_s'] / ours['prefill_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
