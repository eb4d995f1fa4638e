"""``python -m demo.eval_drafter`` (docs/drafter.md) on the 24-token demo model and its drafter, two validation
records, every optional setting on."""

from __future__ import annotations

import json

from demo.eval import HEADER
from tests.benchmarks.commands import run_module, succeeded
from tests.conftest import DEMO24

SETTINGS = [
    "no drafter",
    "prompt lookup",
    "drafter",
    "drafter, no re-noising",
    "drafter, confidence 0.5",
    "drafter, guard 0.5",
    "drafter, blind",
    "drafter, unheld",
    "drafter, confidence 0.5, unheld",
]


def test_every_setting_is_paired_and_projected(tmp_path):
    out = tmp_path / "drafter.json"
    options = ["--confidence", "0.5", "--guard", "0.5", "--blind", "--unheld", "--split", "valid"]
    stdout = succeeded(
        run_module("demo.eval_drafter", "--model", DEMO24, "--n", "2", *options, "--json", out)
    )
    lines = stdout.splitlines()
    assert lines[:2] == HEADER.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2 : 2 + len(SETTINGS)]] == SETTINGS, stdout
    for label in SETTINGS[1:]:  # each paired against no drafter
        assert any(line.startswith(f"{label}: exact match ") for line in lines), (label, stdout)
    assert any(line.startswith("drafter proposal ") for line in lines)
    assert lines[-1].startswith("26B projection (assumed 400 GB/s"), lines[-1]
    figures = json.loads(out.read_text())
    assert (
        list(figures) == [*SETTINGS, "drafter_fraction_of_pass"] and figures["drafter_fraction_of_pass"] > 0
    )
    assert all(figures[label]["n"] == 2 for label in SETTINGS)
