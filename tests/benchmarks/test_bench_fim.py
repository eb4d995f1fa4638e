"""``python -m benchmarks.fim`` (docs/server.md, Fill-in-the-middle) on the embedded demo model, two items, one
hole size: the table's rows and columns, every figure in the JSON, each in its range."""

from __future__ import annotations

import json

from benchmarks.fim import FIGURES, HEADER
from tests.benchmarks.commands import run_module, succeeded

ROWS = [
    ("4", "4 (k)", "infill"),
    ("4", "4 (k)", "plain"),
    ("4", "8 (2k)", "infill"),
    ("4", "8 (2k)", "plain"),
]
RATES = ("exact", "starts", "ends", "stop", "echo")
COLUMNS = HEADER.splitlines()[0].count("|") - 1


def test_infill_against_plain_completion(tmp_path):
    out = tmp_path / "fim.json"
    stdout = succeeded(run_module("benchmarks.fim", "--n", "2", "--holes", "4", "--json", out))
    assert stdout.startswith(HEADER), stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()[2:6]]
    assert [tuple(row[:3]) for row in rows] == ROWS and all(len(row) == COLUMNS for row in rows), stdout
    assert "documents: " in stdout and " of 2 items" in stdout, stdout

    results = json.loads(out.read_text())
    assert results["config"]["holes"] == [4] and len(results["items"]) == 2
    cases = sum(len(item["runs"]) for item in results["items"]) // len(ROWS)  # items not skipped
    for row in results["rows"]:
        assert set(FIGURES) <= row.keys() and row["cases"] == cases, row
        if cases:
            assert all(0 <= row[name] <= 1 for name in RATES), row
            assert 0 <= row["mean_tokens"] <= row["budget"] and row["passes"] >= 1, row
    for run in (run for item in results["items"] for run in item["runs"]):
        assert run["reason"] in ("stop", "length") and run["tokens"] <= run["budget"], run
        assert run["reason"] == "stop" or run["tokens"] == run["budget"], run  # a full hole when not ended
