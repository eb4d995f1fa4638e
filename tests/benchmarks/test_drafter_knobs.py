"""benchmarks.drafter_knobs at a tiny size: every setting is a valid verification, and the table prints."""

from __future__ import annotations

from benchmarks import drafter_knobs
from mlx_dgemma.decoding.verify import VerifyConfig


def test_every_setting_is_a_verification_and_all_is_the_default():
    table = drafter_knobs.settings()
    for spec in table.values():
        VerifyConfig(**spec.get("verify", {}))
    assert table["all"]["verify"] == {} and VerifyConfig() == VerifyConfig(**table["+ settle"]["verify"])
    assert not any(table["knobs off"]["verify"].values())


def test_the_knobs_table_runs(capsys):
    assert drafter_knobs.main(["--n", "1", "--only", "none", "all"]) == 0
    out = capsys.readouterr().out
    assert "| all |" in out and "| none |" in out and "passes / canvas" in out
