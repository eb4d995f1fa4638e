"""Quality of each quantization recipe (``scripts/quant_report.py``), checked against justified bounds.

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

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "quant_report.py"


def load_script():
    spec = importlib.util.spec_from_file_location("quant_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    return load_script()


@pytest.fixture(scope="module")
def rows(report, tmp_path_factory):
    source = report.write_reference_checkpoint(tmp_path_factory.mktemp("quant-report"))
    measured = report.measure(source, bits=(2, 4, 8))
    print("\n" + report.format_table(measured))
    return {(r.recipe, r.bits): r for r in measured}


def test_8bit_is_nearly_lossless(rows):
    for recipe in ("uniform", "mixed"):
        row = rows[recipe, 8]
        assert row.kl_mean < 1e-3 and row.kl_max < 0.05 and row.top1 >= 0.99, row
    # At 8 bits the two recipes quantize every module the same way: the same model.
    assert rows["mixed", 8].kl_mean == rows["uniform", 8].kl_mean


def test_4bit_bounds(rows):
    mixed, uniform = rows["mixed", 4], rows["uniform", 4]
    assert mixed.kl_mean < 2e-2 and mixed.top1 >= 0.97, mixed  # the default recipe
    assert uniform.kl_mean < 0.15 and uniform.top1 >= 0.95, uniform


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


def test_mixed_beats_uniform_below_8_bits(rows):
    for bits in (2, 4):
        mixed, uniform = rows["mixed", bits], rows["uniform", bits]
        assert mixed.kl_mean < uniform.kl_mean / 2, (mixed, uniform)
        assert mixed.bits_per_weight > uniform.bits_per_weight  # what the 8-bit parts cost


def test_table(report):
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
