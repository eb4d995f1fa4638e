"""``python -m benchmarks.model`` (docs/benchmarks.md): ours against the reference at the tiny size, one canvas of one
step, with the per-part profile. It builds a checkpoint with the reference and runs torch: slow."""

from __future__ import annotations

import json

import pytest

from benchmarks import model as bench
from tests.benchmarks.commands import run_module, succeeded

pytestmark = pytest.mark.slow


def test_tiny_run_prints_both_sides_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "--size",
        "tiny",
        "--steps",
        "1",
        "--reps",
        "1",
        "--profile",
        "--keep",
        tmp_path / "ckpt",
        "--json",
        out,
    ]
    lines = succeeded(run_module("benchmarks.model", *args)).splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == ["machine", "versions", "model", "run", "load"], (
        lines
    )
    assert "1 canvas(es) x 1 steps = 1 / 1 decoder passes (ours / ref), 32 tokens" in lines[3], lines[3]
    header = lines.index(next(line for line in lines if line.split()[:2] == ["mlx_dgemma", "reference"]))
    labels = [label for _, label, _, _ in bench.ROWS]
    for label, line in zip(labels, lines[header + 2 :]):
        assert line.startswith(label) and line.rstrip().endswith("x"), (label, line)
    assert any(line.startswith("our decoder pass, by part") for line in lines), lines
    results = json.loads(out.read_text())
    ours, ref = results["ours"], results["reference"]
    assert results["spec"]["canvas_length"] == 32 and results["config"]["steps"] == 1
    assert ours["passes"] == ref["passes"] == 1 and ours["tokens"] == ref["tokens"] == 32
    assert not ref["mlx_imported"]  # the reference worker never imports mlx (its timings would be off)
    assert set(ours["profile"]) >= {"dense MLP", "router", "LM head + soft-cap"}
