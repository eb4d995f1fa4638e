"""``python -m benchmarks.drafter_head`` (docs/drafter.md): the drafter's shortlist head against its full head on
the long demo model, two records and a shortlist of 128: its tables, the JSON, and a bad setting in one line."""

from __future__ import annotations

import json

from tests.benchmarks.commands import run_module, succeeded
from tests.benchmarks.test_bench_fast import table_rows


def test_shortlist_against_the_full_head(tmp_path):
    out = tmp_path / "head.json"
    args = ["--sizes", "128", "--n", "2", "--records", "200", "--end-to-end", "128+prompt", "--json", out]
    stdout = succeeded(run_module("benchmarks.drafter_head", *args))
    coverage = table_rows(stdout, "## Coverage (200 training records counted")
    assert [row[0] for row in coverage] == ["128"], stdout
    assert all(0 < float(cell.rstrip("%")) <= 100 for cell in coverage[0][2:]), stdout
    variants = table_rows(stdout, "## Proposals against the full head's")
    assert [row[0] for row in variants] == [
        "128, rest estimated",
        "128, renormalised",
        "128 + prompt, rest estimated",
        "128 + prompt, renormalised",
    ], stdout
    rows = table_rows(stdout, "## End to end (2 validation records")
    assert [row[0] for row in rows] == ["full head", "shortlist 128 + prompt"], stdout
    assert "26B projection, drafter with its shortlist of 32,768" in stdout

    figures = json.loads(out.read_text())
    assert figures["n"] == 2 and figures["vocab"] == 1024
    for tally in figures["proposals"].values():
        assert 0 <= tally["identical"] <= tally["proposals"] >= 1, tally
        assert tally["wrong"] <= tally["drafted"] <= tally["positions"], tally
    assert all(s["n"] == 2 and s["passes_per_canvas"] >= 1 for s in figures["end_to_end"].values())
    assert set(figures["proposal_fraction_of_pass"]) == {"full head", "shortlist 128 + prompt"}


def test_a_bad_setting_is_one_line():
    result = run_module("benchmarks.drafter_head", "--end-to-end", "128+vocab")
    assert result.returncode == 1 and result.stderr.startswith(
        "error: --end-to-end takes SIZE or SIZE+prompt"
    )
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
