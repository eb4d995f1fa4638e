"""One rank of ``tests/test_distributed.py``, started by ``mlx.launch``: load a model split over the ranks,
run it, and write what it computed to ``OUT/rank<r>.npz`` for the test to compare with one process."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np

from mlx_dgemma.generation import generate
from mlx_dgemma.model.loader import load_model, load_tokenizer
from mlx_dgemma.model.shard import weight_bytes

# mlx_dgemma before mlx.core (imported in the functions): its OpenBLAS preload must come first.
from mlx_dgemma.runtime.distributed import DistributedError, launched_group

PROMPT = "Fill the record: Meet Maya, 34, a pilot living in Oslo."
PIXELS: list[str] = []  # sha256 of each served image's pixel arrays, on this rank


def image_request() -> dict:
    """A chat request with one image (seeded noise as a PNG data: URL): the pixels must reach every rank."""
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(png, "PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    content = [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "What is in the image?"},
    ]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 24, "seed": 3}


def logits(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Decoder logits for a fixed canvas, without and with self-conditioning."""
    import mlx.core as mx

    cache = model.make_cache()
    model.encode(mx.array([ids]), cache)
    canvas = mx.array([[(7 * i + 3) % model.args.vocab_size for i in range(model.args.canvas_length)]])
    first = model.denoise(canvas, cache)
    second = model.denoise(canvas, cache, first)
    return np.array(first), np.array(second)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", required=True, help="name=folder pairs")
    p.add_argument("--out", required=True)
    p.add_argument("--mismatch", help="a folder per rank ({rank} in it), which must not load together")
    p.add_argument("--server", help="serve this folder from rank 0")
    p.add_argument("--cli", help="run mlx_dgemma.generate on this folder")
    args = p.parse_args()
    import mlx.core as mx

    group = launched_group()
    assert group is not None and group.size() > 1, "run me under mlx.launch with several ranks"
    results: dict[str, np.ndarray] = {}
    for spec in args.models:
        name, folder = spec.split("=", 1)
        model = load_model(folder, mx.float32, group)
        results[f"{name}/weight_bytes"] = np.array(weight_bytes(model))
        tokenizer = load_tokenizer(folder)
        ids = list(tokenizer.encode(PROMPT))
        results[f"{name}/logits"], results[f"{name}/logits_sc"] = logits(model, ids)
        for drafter in ("none", "auto"):
            text = generate(model, tokenizer, PROMPT, max_tokens=40, seed=3, drafter=drafter)
            results[f"{name}/text_{drafter}"] = np.array(json.dumps(text))
    if args.mismatch:  # each rank loads its own folder: they must refuse to work together
        try:
            load_model(args.mismatch.format(rank=group.rank()), mx.float32, group)
            results["mismatch"] = np.array("loaded")
        except DistributedError as e:
            results["mismatch"] = np.array(str(e))
    if args.server:
        results["server"] = np.array(json.dumps(serve(args.server, group.rank())))
        results["pixels"] = np.array(json.dumps(PIXELS))
    np.savez(Path(args.out) / f"rank{group.rank()}.npz", **results)
    if args.cli:  # last: the CLI silences standard output on ranks other than 0
        from mlx_dgemma.cli.generate import main as generate_main

        generate_main(["--model", args.cli, "--prompt", PROMPT, "--max-tokens", "40", "--seed", "3"])
    return 0


def serve(folder: str, rank: int) -> list[str]:
    """Rank 0 serves three requests over HTTP and stops; the others follow until it does. The last request has an
    image; its answer is kept as ``"<status> <body>"``: sharded sums make an untrained vision tower's text differ
    from one process's, so the test compares the pixels each rank read instead."""
    from mlx_dgemma.server import BackgroundServer, create_app

    app = create_app(folder)
    worker, serve_plan = app.state.worker, app.state.worker._serve

    def record_pixels(job):  # what this rank's generation reads: rank 0's processed image, or what reached it
        if job.plan.image_prompt is not None:
            arrays = job.plan.image_prompt.pixel_values, job.plan.image_prompt.image_position_ids
            PIXELS.append(
                hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()
            )
        serve_plan(job)

    worker._serve = record_pixels
    if rank != 0:
        worker.join()
        return []
    import httpx

    answers = []
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40, "seed": 3}
    with BackgroundServer(app) as server:
        for stream in (False, True):
            r = httpx.post(f"{server.url}/chat/completions", json={**body, "stream": stream}, timeout=600)
            if stream:
                chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
                answers.append(
                    "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
                )
            else:
                assert r.status_code == 200, f"{r.status_code} {r.text}"
                answers.append(r.json()["choices"][0]["message"]["content"])
        r = httpx.post(f"{server.url}/chat/completions", json=image_request(), timeout=600)
        answers.append(f"{r.status_code} {r.text}")
    return answers


if __name__ == "__main__":
    sys.exit(main())
