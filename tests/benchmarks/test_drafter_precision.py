"""``python -m benchmarks.drafter_precision`` (docs/drafter.md): the bundled drafter on quantized conversions of
the 24-token demo model, one or two records: its three tables, the JSON, what ``auto`` gives a conversion, and the
line a user gets when a conversion's drafter was trained for another target."""

from __future__ import annotations

import json
import shutil

from benchmarks.drafter_precision import SETTINGS, auto_drafter, precisions
from benchmarks.fast import HEADER
from tests.benchmarks.commands import run_module, succeeded
from tests.benchmarks.test_bench_fast import table_rows
from tests.conftest import DEMO24

COLUMNS = 1 + HEADER.splitlines()[0].count("|") - 1  # the precision, then benchmarks.fast's columns


def test_the_recipes_at_8_bits_are_one_model():
    assert precisions(["mixed", "uniform"], [8, 4]) == [
        ("8-bit", "mixed", 8),
        ("mixed 4-bit", "mixed", 4),
        ("uniform 4-bit", "uniform", 4),
    ]
    assert precisions(["uniform"], [4, 8]) == [("uniform 4-bit", "uniform", 4), ("8-bit", "uniform", 8)]


def test_every_precision_gets_the_drafter(tmp_path):
    out = tmp_path / "precision.json"
    args = ["--model", DEMO24, "--n", "2", "--bits", "8", "4", "--recipes", "mixed", "--json", out]
    stdout = succeeded(run_module("benchmarks.drafter_precision", *args))
    labels = ["unquantized", "8-bit", "mixed 4-bit"]
    kinds = table_rows(stdout, "## Precisions (target demo24, 2 held-out test records, canvas 24)")
    assert [row[0] for row in kinds] == labels, stdout
    assert all(row[2] == "the bundled drafter" for row in kinds), stdout
    rows = table_rows(stdout, "## Settings, each precision against its own reference (2 records")
    assert [(row[0], row[1]) for row in rows] == [(p, s) for p in labels for s in SETTINGS], stdout
    assert all(len(row) == COLUMNS for row in rows), stdout
    effect = table_rows(stdout, "## The drafter's effect at each precision")
    assert [row[0] for row in effect] == labels and all("fewer" in row[2] for row in effect), stdout

    figures = json.loads(out.read_text())
    assert figures["n"] == 2 and list(figures["precisions"]) == labels
    unquantized, eight, four = figures["precisions"].values()
    assert (
        unquantized["bits_per_weight"] is None and 4 < four["bits_per_weight"] < eight["bits_per_weight"] < 16
    )
    for p in figures["precisions"].values():
        assert p["auto_drafter"].endswith("drafter") and p["refusal"] is None, p
        assert 0 <= p["held_out_canvas_agreement"] <= p["held_out_token_agreement"] <= 1, p
        assert list(p["settings"]) == list(SETTINGS), p
        assert all(s["n"] == 2 and s["passes_per_canvas"] >= 1 for s in p["settings"].values()), p


def _foreign_drafter(tmp_path):
    """A copy of the 24-token demo model whose drafter records another target's config hash."""
    folder = tmp_path / "demo24"
    shutil.copytree(DEMO24, folder)
    config_file = folder / "drafter" / "config.json"
    config = json.loads(config_file.read_text())
    config["target"]["config_hash"] = "0" * 16
    config_file.write_text(json.dumps(config))
    return folder


def test_a_drafter_for_another_target_is_named_not_measured(tmp_path):
    from mlx_dgemma import load_model

    folder = _foreign_drafter(tmp_path)
    picked, refusal = auto_drafter(load_model(folder), folder)
    assert picked is None and refusal.startswith(
        f"the drafter in {folder / 'drafter'} was trained for another"
    ), refusal

    args = ["--model", folder, "--n", "1", "--bits", "8", "--recipes", "mixed"]
    stdout = succeeded(run_module("benchmarks.drafter_precision", *args))
    kinds = table_rows(stdout, "## Precisions")
    assert [row[2].split(":")[0] for row in kinds] == ["none", "none"], stdout
    assert "config_hash 0000000000000000" in kinds[1][2], stdout  # the conversion carried the drafter
    rows = table_rows(stdout, "## Settings")
    assert [row[1] for row in rows] == ["reference", "fast"] * 2, stdout
    assert [row[1:] for row in table_rows(stdout, "## The drafter's effect")] == [
        ["no drafter", "—", "no drafter", "—"]
    ] * 2, stdout


def test_a_bad_bit_width_is_one_line():
    result = run_module("benchmarks.drafter_precision", "--model", DEMO24, "--bits", "7")
    assert result.returncode == 2 and result.stderr.startswith("error: unsupported bit width 7"), (
        result.stderr
    )
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
