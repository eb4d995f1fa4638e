"""``python -m benchmarks.distributed`` (docs/distributed.md) at the tiny size: one rank, then two ranks launched by
``mlx.launch`` on loopback. Several MLX ranks: slow."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.commands import run_module, succeeded

pytestmark = pytest.mark.slow


def test_tiny_run_measures_one_and_two_ranks(tmp_path):
    out = tmp_path / "distributed.json"
    args = ["--size", "tiny", "--reps", "1", "--dir", tmp_path / "ckpt", "--json", out]
    stdout = succeeded(run_module("benchmarks.distributed", *args))
    for start in ("model: tiny scale", "weights per rank:", "decoder pass (canvas 32", "exchanged per pass:"):
        assert any(line.startswith(start) for line in stdout.splitlines()), (start, stdout)
    # The projection's formula for the bytes a pass reduces is checked against the bytes counted here.
    assert "(the formula above gives 1.000x the bytes counted at this scale)" in stdout, stdout
    results = json.loads(out.read_text())
    one, two = results["ranks"]["1"], results["ranks"]["2"]
    assert one["collectives_per_pass"] == 0 and two["collectives_per_pass"] > 0
    assert two["weight_bytes"] < one["weight_bytes"]  # each rank holds part of the weights
    assert results["experts"]["pairs"] > results["experts"]["expert_parallel_pairs_on_rank0"] >= 0
