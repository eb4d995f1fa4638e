"""One rank of ``tests/test_distributed.py``, started by ``mlx.launch``: load a model split over the ranks,
run it, and write what it computed to ``OUT/rank<r>.npz`` for the test to compare with one process."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx_dgemma  # noqa: F401  (before mlx: the OpenBLAS preload)
import mlx.core as mx  # noqa: I001
import numpy as np

from mlx_dgemma.distributed import launched_group
from mlx_dgemma.generation import generate
from mlx_dgemma.loader import load_model, load_tokenizer
from mlx_dgemma.shard import weight_bytes

PROMPT = "Fill the record: Meet Maya, 34, a pilot living in Oslo."


def logits(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Decoder logits for a fixed canvas, without and with self-conditioning."""
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
    args = p.parse_args()
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
            text = generate(model, tokenizer, PROMPT, 40, seed=3, drafter=drafter)
            results[f"{name}/text_{drafter}"] = np.array(json.dumps(text))
    np.savez(Path(args.out) / f"rank{group.rank()}.npz", **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
