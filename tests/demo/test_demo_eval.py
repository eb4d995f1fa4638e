"""``python -m demo.eval`` (docs/demo-model.md) on the 24-token demo model, two held-out records."""

from __future__ import annotations

import json

from demo.eval import HEADER
from tests.benchmarks.commands import run_module, succeeded
from tests.conftest import DEMO24


def test_row_and_json_figures(tmp_path):
    out = tmp_path / "eval.json"
    stdout = succeeded(run_module("demo.eval", "--model", DEMO24, "--n", "2", "--steps", "4", "--json", out))
    assert stdout.splitlines()[:2] == HEADER.splitlines() and stdout.splitlines()[2].startswith(
        "| demo model | "
    )
    figures = json.loads(out.read_text())
    assert figures["setting"] == "demo model" and figures["n"] == 2
    low, high = figures["ci95"]
    assert 0 <= low <= figures["exact_match"] <= high <= 1
    assert 1 <= figures["passes_per_canvas"] <= 4  # --steps 4 bounds the passes of every canvas
    assert figures["tokens_per_forward"] > 0 and figures["ms_per_canvas"] > 0
