"""``python -m benchmarks.load`` (docs/server.md): concurrent ``openai`` clients against a server it starts."""

from __future__ import annotations

from tests.benchmarks.commands import run_module, succeeded
from tests.conftest import DEMO24


def test_clients_are_all_served():
    args = ["--clients", "2", "--requests", "2", "--max-tokens", "8", "--steps", "2", "--model", DEMO24]
    lines = succeeded(run_module("benchmarks.load", *args)).splitlines()  # exit 1 on any error
    report = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in lines)}
    assert report["clients x requests"].startswith("2 x 2 (max_tokens 8, 2 denoising steps")
    assert (
        report["requests served"] == "4" and report["errors"] == "0" and report["not sent (deadline)"] == "0"
    )
    for key in ("latency p50 / p95", "first chunk p50/p95", "tokens generated"):
        assert "nan" not in report[key], report
    assert "'served': 4" in report["server /health"] and "'failed': 0" in report["server /health"], report
