"""``python -m benchmarks.stress_server`` (docs/server.md) at a small size: two clients, four slow connections.

Every probe must hold except those that bound a time (the /health answer times, the exit after SIGTERM): those
depend on the machine's load, which a test may not."""

from __future__ import annotations

from tests.benchmarks.commands import run_module
from tests.conftest import DEMO24

TIMED = ("/health slowest", "SIGTERM")


def test_probes_print_a_table_and_hold():
    result = run_module(
        "benchmarks.stress_server", "--model", DEMO24, "--clients", 2, "--requests", 1, "--slow", 4
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    lines = result.stdout.splitlines()
    start = lines.index("| probe | expected | got | pass |")
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in lines[start + 2 :]
        if line.startswith("|")
    ]
    assert len(rows) >= 20 and all(row[3] in ("yes", "NO") for row in rows), result.stdout
    assert (result.returncode == 0) == all(row[3] == "yes" for row in rows)
    failed = [row for row in rows if row[3] == "NO" and not row[0].startswith(TIMED)]
    assert not failed, failed
    assert lines[-1].startswith("at 2 clients: 2 requests served"), lines[-1]
