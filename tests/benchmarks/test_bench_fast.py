"""``python -m benchmarks.fast`` (docs/benchmarks.md, README): fast decoding and the drafter on the 24-token demo
model with two records; (c) at the tiny size needs a checkpoint built by the reference (torch): slow."""

from __future__ import annotations

import json

import pytest

from benchmarks.fast import HEADER
from mlx_dgemma.decoding.fast import FastConfig
from tests.benchmarks.commands import run_module, succeeded
from tests.conftest import DEMO24

SETTINGS = ["reference", "fast", "drafter", "fast + drafter"]
ABLATION = 7  # the reference, five techniques alone or in pairs, all together
COLUMNS = HEADER.splitlines()[0].count("|") - 1


def table_rows(stdout: str, section: str) -> list[list[str]]:
    """The Markdown rows (cells) of the table that follows ``section``'s title."""
    lines = stdout[stdout.index(section) :].splitlines()[1:]
    start = next(i for i, line in enumerate(lines) if line.startswith("|---"))
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_demo_ablation_and_projection(tmp_path):
    out = tmp_path / "fast.json"
    args = ["--model", DEMO24, "--n", "2", "--ablation-n", "1", "--skip-tenth", "--json", out]
    stdout = succeeded(run_module("benchmarks.fast", *args))
    demo = table_rows(stdout, "## (a) Demo model, 2 held-out records")
    assert [row[0] for row in demo] == SETTINGS and all(len(row) == COLUMNS for row in demo), stdout
    ablation = table_rows(stdout, "## (b) Ablation, 1 records")
    assert len(ablation) == ABLATION and ablation[-1][0] == "all (fast)", stdout
    assert "## (c)" not in stdout and "## (d) Projection for the 26B model" in stdout
    assert len(table_rows(stdout, "| pass counts | setting |")) == 2 * len(SETTINGS)  # demo and ~14 passes
    figures = json.loads(out.read_text())
    assert (
        list(figures["demo"]) == SETTINGS
        and figures["tenth"] is None
        and len(figures["ablation"]) == ABLATION
    )
    for summary in figures["demo"].values():
        assert (
            summary["n"] == 2 and 0 <= summary["exact_argmax_agreement"] <= 1 and summary["tokens_per_s"] > 0
        )
    assert figures["demo"]["fast"]["bucket_passes"] and not figures["demo"]["reference"]["bucket_passes"]


@pytest.mark.slow
def test_pass_costs_on_a_reference_checkpoint(tmp_path):
    args = [
        "--model",
        DEMO24,
        "--n",
        "1",
        "--ablation-n",
        "1",
        "--scale",
        "tiny",
        "--tenth",
        tmp_path,
        "--reps",
        "1",
    ]
    stdout = succeeded(run_module("benchmarks.fast", *args))
    costs = table_rows(stdout, "## (c) Tiny-scale random checkpoint (canvas 32, prompt 40, vocab 512")
    assert costs[0][0].startswith("reference, 32 positions") and costs[0][-1] == "1.00", stdout
    assert len(costs) == 1 + len(FastConfig().sizes(32)), stdout  # one row per bucket size
    assert "At the measured pass counts and bucket mix (demo, scaled to 32 positions)" in stdout
