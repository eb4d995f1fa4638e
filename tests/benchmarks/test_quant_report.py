"""Quality of each quantization recipe (``python -m benchmarks.quant_report``), checked against justified bounds.

The checkpoint is the report's own (written by the reference): two layers (one sliding, one full attention),
every quantized width a multiple of 64. Random weights amplify perturbations layer after layer, so deeper
random fixtures measure the fixture's chaos, not the recipe (measured: 8-bit KL 8e-6 / 2e-4 / 5e-2 with 1 / 2 /
4 layers); two layers keep both attention kinds, the experts and self-conditioning, and stay well conditioned.

Why these bounds: affine b-bit quantization rounds each weight to one of 2**b levels per group, an error of
std ~ range / 2**b / sqrt(12); for small perturbations the logit change is linear in it and KL ~ var / 2, so KL
falls ~4x per extra bit (16x per two bits) until rare routing flips (top-k over experts, a discontinuity)
dominate. Measured here (KL mean, nats per position / top-1): 8-bit 3.1e-4 / 1.000, mixed 4-bit 5.0e-3 / 1.000,
uniform 4-bit 4.2e-2 / 0.992, mixed 2-bit 5.2e-2, uniform 2-bit 3.1e-1. The constants below leave ~3x room
for platform differences in the float32 arithmetic; the relations between rows are what a recipe must keep.
"""

from __future__ import annotations

import pytest

from benchmarks import quant_report as report
from tests.benchmarks.commands import run_module, succeeded
from tests.conftest import DEMO24


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """The report on its own checkpoint, written by the reference (torch): the tests that use it are slow."""
    source = report.write_reference_checkpoint(tmp_path_factory.mktemp("quant-report"))
    measured = report.measure(source, bits=(2, 4, 8))
    print("\n" + report.format_table(measured))
    return {(r.recipe, r.bits): r for r in measured}


@pytest.mark.slow
def test_8bit_is_nearly_lossless(rows):
    for recipe in ("uniform", "mixed"):
        row = rows[recipe, 8]
        assert row.kl_mean < 1e-3 and row.kl_max < 0.05 and row.top1 >= 0.99, row
    # At 8 bits the two recipes quantize every module the same way: the same model.
    assert rows["mixed", 8].kl_mean == rows["uniform", 8].kl_mean


@pytest.mark.slow
def test_4bit_bounds(rows):
    mixed, uniform = rows["mixed", 4], rows["uniform", 4]
    assert mixed.kl_mean < 2e-2 and mixed.top1 >= 0.97, mixed  # the default recipe
    assert uniform.kl_mean < 0.15 and uniform.top1 >= 0.95, uniform


@pytest.mark.slow
def test_kl_falls_with_bits(rows):
    for recipe in ("uniform", "mixed"):
        kl = {bits: rows[recipe, bits].kl_mean for bits in (2, 4, 8)}
        assert kl[2] > kl[4] > kl[8], (recipe, kl)
        assert kl[4] > 4 * kl[8], (recipe, kl)  # theory says ~256x; routing flips take some of it
        assert (
            rows[recipe, 2].bits_per_weight
            < rows[recipe, 4].bits_per_weight
            < rows[recipe, 8].bits_per_weight
        )


@pytest.mark.slow
def test_mixed_beats_uniform_below_8_bits(rows):
    for bits in (2, 4):
        mixed, uniform = rows["mixed", bits], rows["uniform", bits]
        assert mixed.kl_mean < uniform.kl_mean / 2, (mixed, uniform)
        assert mixed.bits_per_weight > uniform.bits_per_weight  # what the 8-bit parts cost


def test_table():
    row = report.Row("mixed", 4, 6.67, 5.0e-3, 0.19, 1.0)
    table = report.format_table([row])
    assert table.splitlines()[0].split() == [
        "recipe",
        "bits",
        "bits/weight",
        "KL",
        "mean",
        "KL",
        "max",
        "top-1",
    ]
    assert table.splitlines()[1].split() == ["mixed", "4", "6.67", "5.00e-03", "1.90e-01", "1.000"]


def test_command_prints_the_table():
    """The command on an unquantized checkpoint of ours (no reference process): its header line and one row per
    recipe and bit width asked for."""
    args = ["--model", DEMO24, "--bits", "4", "8", "--recipes", "mixed", "--batch", "1", "--prompt-len", "8"]
    lines = succeeded(run_module("benchmarks.quant_report", *args, "--canvas-len", "24")).splitlines()
    assert lines[0].startswith(f"checkpoint: {DEMO24}; 1 x 24 positions"), lines
    assert lines[1].split() == ["recipe", "bits", "bits/weight", "KL", "mean", "KL", "max", "top-1"], lines
    rows = [line.split() for line in lines[2:]]
    assert [row[:2] for row in rows] == [["mixed", "4"], ["mixed", "8"]], lines
    for row in rows:
        bits_per_weight, kl_mean, kl_max, top1 = map(float, row[2:])
        assert bits_per_weight > int(row[1]) and 0 <= kl_mean <= kl_max and 0 <= top1 <= 1, row
