"""``python -m benchmarks.constrain`` (docs/structured-output.md) on the 24-token demo model, two records."""

from __future__ import annotations

import re

from demo.eval import HEADER
from tests.benchmarks.commands import run_module, succeeded
from tests.conftest import DEMO24


def test_constrained_against_free_and_projection_cost():
    args = ["--model", DEMO24, "--n", "2", "--steps", "4", "--fast"]
    stdout = succeeded(run_module("benchmarks.constrain", *args))
    assert stdout.startswith(HEADER), stdout
    rows = [line.split("|")[1].strip() for line in stdout.splitlines()[2:6]]
    assert rows == ["unconstrained", "records schema", "fast", "fast + records schema"], stdout
    paired = re.search(
        r"paired on 2 held-out records: both right (\d), only unconstrained (\d), only constrained (\d)",
        stdout,
    )
    assert paired and sum(map(int, paired.groups())) <= 2, stdout
    assert "fast + schema against the reference + schema: both right" in stdout
    step = re.search(r"\| grammar projection \(host, constrained only\) \| ([\d.]+) \|", stdout)
    assert step and float(step.group(1)) > 0, stdout  # the projection ran, on every constrained step
