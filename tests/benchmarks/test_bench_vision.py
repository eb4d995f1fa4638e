"""``python -m benchmarks.vision`` (docs/images.md): image prefill, ours against the reference, at the tiny size.
It builds a checkpoint with the reference and runs torch: slow."""

from __future__ import annotations

import re

import pytest

from tests.benchmarks.commands import run_module, succeeded

pytestmark = pytest.mark.slow


def test_tiny_run_prints_both_prefill_times(tmp_path):
    args = ["--size", "tiny", "--reps", "1", "--budget", "70", "--keep", tmp_path]
    lines = succeeded(run_module("benchmarks.vision", *args)).splitlines()
    setting = re.match(r"tiny, one 640x480 image at 70 soft tokens, (\d+)-token prompt, float32", lines[0])
    assert setting, lines
    assert 32 < int(setting.group(1)) <= 32 + 70  # 30 text tokens and 2 image markers around the soft tokens
    times = re.match(r"image prefill: ours ([\d.]+) s, reference ([\d.]+) s \(torch \d+ threads\)", lines[1])
    assert times and float(times.group(1)) > 0 and float(times.group(2)) > 0, lines
    assert (tmp_path / "hf" / "config.json").is_file()  # --keep keeps the checkpoint
