"""``python -m benchmarks.batching --quick`` (docs/batching.md): batched requests against one at a time on the
embedded demo model, one batched pass over 1, 2, 4 rows, and the 26B projection. No timing is asserted."""

from __future__ import annotations

import json

from benchmarks.batching import COUNTS, DEMO_SETTINGS, QUICK_COUNTS, SMALL_POSITIONS, projected_growth
from tests.benchmarks.commands import run_module, succeeded
from tests.benchmarks.test_bench_fast import table_rows

SIDE_FIELDS = {
    "requests",
    "seconds",
    "tokens",
    "tokens_per_s",
    "latency_p50_s",
    "latency_p95_s",
    "first_canvas_p50_s",
    "first_canvas_p95_s",
    "decoder_passes",
    "requests_per_pass",
    "positions_per_pass",
}


def test_quick_run_batches_and_answers_as_alone(tmp_path):
    out = tmp_path / "batching.json"
    stdout = succeeded(run_module("benchmarks.batching", "--quick", "--skip-tenth", "--json", out))
    figures = json.loads(out.read_text())
    assert figures["tenth"] is None and "tenth-scale" not in stdout

    # (a): every setting at 1, 2, 4 requests, in the table and the JSON, each answer as it is alone.
    table = table_rows(stdout, "## (a) End to end, demo model")
    assert [(r[0], int(r[1])) for r in table] == [(s, n) for s in DEMO_SETTINGS for n in QUICK_COUNTS], stdout
    assert all(r[-1] == "0" for r in table), stdout
    rows = figures["demo"]["end_to_end"]
    assert len(rows) == len(table)
    compared = sum(r["requests"] for r in rows)
    assert figures["differing_answers"] == 0 and figures["compared_answers"] == compared
    assert f"Batched answers differing from the same request alone: 0 of {compared}" in stdout
    for r in rows:
        assert set(r["batched"]) >= SIDE_FIELDS and set(r["serial"]) >= SIDE_FIELDS, r
        assert r["differing"] == 0 and r["batched"]["tokens"] == r["serial"]["tokens"] > 0
        assert r["serial"]["requests_per_pass"] == 1 and r["speedup"] > 0
        if r["requests"] > 1:  # the requests really shared passes
            assert r["batched"]["requests_per_pass"] > 1, r
            assert r["batched"]["decoder_passes"] < r["serial"]["decoder_passes"], r

    # The passes recorded one by one are the ones each request's statistics count.
    for label, work in figures["demo"]["passes_alone"].items():
        alone = next(
            r["serial"] for r in rows if r["setting"] == label and r["requests"] == max(QUICK_COUNTS)
        )
        recorded = sum(int(size) * n for size, n in work["pass_positions"].items())
        assert recorded == round(alone["positions_per_pass"] * alone["decoder_passes"]), label

    # (b): 1, 2, 4 rows of each pass kind, timed.
    growth = table_rows(stdout, "## (b) One Model.denoise_rows pass over R rows, demo model")
    assert [int(r[0]) for r in growth] == list(QUICK_COUNTS) and all(
        len(r) == 1 + 3 * (1 + len(SMALL_POSITIONS)) for r in growth
    )
    kinds = {(g["kind"], g["rows"]) for g in figures["demo"]["pass_growth"]}
    assert kinds == {
        (k, n) for k in ["full"] + [f"{p} positions" for p in SMALL_POSITIONS] for n in QUICK_COUNTS
    }
    assert all(g["pass_s"] > 0 and len(g["times"]) == 3 for g in figures["demo"]["pass_growth"])

    # (c): labelled a projection; every setting at both bandwidths, 1..16 rows.
    assert "## (c) Projection" in stdout and "PROJECTION, not a measurement" in stdout
    projected = table_rows(stdout, "| setting | GB/s |")
    assert [r[0] for r in projected] == [s for s in DEMO_SETTINGS for _ in range(2)], stdout
    for setting in figures["projection"]["settings"].values():
        for cells in setting["by_gb_s"].values():
            assert [c["rows"] for c in cells] == list(COUNTS) and all(c["tokens_per_s"] > 0 for c in cells)


def test_projected_pass_streams_the_weights_once_for_every_row():
    """On the roofline a full 26B canvas pass is compute-bound already (no gain from more rows), a pass of 16
    positions is memory-bound (more rows come nearly free until their FLOPs catch up)."""
    growth = {(g["kind"], g["rows"]): g for g in projected_growth(COUNTS)}
    for rows in COUNTS:
        assert abs(growth[("full", rows)]["gain"] - 1) < 1e-9 and growth[("full", rows)]["compute_bound"]
    assert not growth[("16 positions", 1)]["compute_bound"]
    gains = [growth[("16 positions", rows)]["gain"] for rows in COUNTS]
    assert gains == sorted(gains) and gains[-1] > 2
    assert all(growth[(k, r)]["gain"] <= r + 1e-9 for k, r in growth)  # never better than free rows
