"""``python -m benchmarks.probe_hostile`` (issue 26's rerunnable probe) runs, prints its table and stops by itself.

Only the cheap class D (one server, prompt and header probes) is run here; whether the probes hold is the
probe's own business (its exit status), not this test's.
"""

from __future__ import annotations

import re

from benchmarks import probe_hostile as probe
from tests.benchmarks.commands import run_module


def test_probe_prints_a_table_and_exits():
    result = run_module("benchmarks.probe_hostile", "--only", "D", "--quick")
    assert result.returncode in (0, 1), result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["class", "probe", "expected", "got", "held"], result.stdout
    rows = [line for line in lines[2:] if line.startswith("D ")]
    assert len(rows) >= 10 and all(line.rstrip().endswith(("✓", "✗", "n/a")) for line in rows), result.stdout
    summary = re.search(r"^(\d+) probes, (\d+) held", result.stdout, re.M)
    assert summary and int(summary.group(1)) == len(rows), result.stdout
    assert (result.returncode == 0) == (summary.group(1) == summary.group(2))


def test_markdown_table_and_bad_option():
    rows = [
        probe.Row("A", "a|b", "400", "400 ok", True),
        probe.Row("B", "x", "400", "500", False),
        probe.Row("C", "y", "1 line", "n/a (flag missing)", None),
    ]
    markdown = probe.table(rows, markdown=True).splitlines()
    assert (
        markdown[0] == "| class | probe | expected | got | held |"
        and markdown[2] == "| A | a\\|b | 400 | 400 ok | ✓ |"
    )
    assert markdown[3].endswith("| ✗ |") and markdown[4].endswith("| n/a |")
    plain = probe.table(rows, markdown=False).splitlines()
    assert len({line.index("held") for line in plain[:1]}) == 1 and len(plain) == 5
    bad = run_module("benchmarks.probe_hostile", "--only", "Z")
    assert bad.returncode == 2 and "--only" in bad.stderr and "Traceback" not in bad.stderr
