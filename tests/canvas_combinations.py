"""Every allowed combination of decoding variants, run through ``stream_generate`` on the demo model.

Shared by ``tests/test_canvas_loop.py`` and by the recording of its golden file: ``python -m
tests.canvas_combinations OUT.json`` writes what the code at hand commits for every combination (the committed
golden, ``tests/fixtures/canvas_combinations.json``, was written by the code before the one canvas loop).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DEMO24 = ROOT / "fixtures" / "demo24"
GOLDEN = ROOT / "fixtures" / "canvas_combinations.json"
PROMPT = "Fill the record: Meet Maya, 34, a pilot living in Oslo. Maya speaks Greek and Hindi."
SCHEMA_FILE = ROOT.parent / "demo" / "record_schema.json"
# The record with its values left as holes: the fixed text spans both 24-token canvases of the answer.
INFILL = '{"name": "{{2}}", "age": {{1}}, "city": "{{2}}", "job": "{{2}}", "languages": ["{{2}}", "{{2}}"]}'

STEPPERS = ("reference", "fast")
DRAFTERS = (
    "none",
    "auto",
    "noise",
    "blind",
)  # auto: the bundled drafter; noise: every draft rejected (guard)
CONSTRAINTS = ("none", "grammar", "infill")


def combinations() -> list[tuple[str, str, str]]:
    """(stepper, drafter, constraint) for every allowed combination: infill turns drafting off, so it runs
    without a drafter only."""
    return [
        (s, d, c)
        for s, d, c in itertools.product(STEPPERS, DRAFTERS, CONSTRAINTS)
        if not (c == "infill" and d != "none")
    ]


# The verification the golden file was recorded with (issue 30 changed the defaults; the new knobs are tested in
# tests/drafter/test_verify_knobs.py): the golden keeps checking that the one loop commits what the old code did.
RECORDED_VERIFY = {"draft_ends": False, "condition": False, "seed_guesses": False, "settle": False}


def options(drafter: str, constraint: str) -> dict[str, Any]:
    from mlx_dgemma.decoding.verify import VerifyConfig

    kw: dict[str, Any] = {"drafter": {"blind": "auto"}.get(drafter, drafter)}
    kw["verify"] = VerifyConfig(blind=drafter == "blind", **RECORDED_VERIFY)
    if constraint == "grammar":
        kw["json_schema"] = schema()
    elif constraint == "infill":
        kw["infill"] = INFILL
    return kw


def schema() -> dict[str, Any]:
    """The record's schema with an age the prompt's 34 breaks, so that the projection has to change the answer."""
    record = json.loads(SCHEMA_FILE.read_text())
    record["properties"]["age"]["maximum"] = 30
    return record


def run(
    model: Any, tokenizer: Any, stepper: str, drafter: str, constraint: str, seed: int = 0
) -> dict[str, Any]:
    """What one combination commits: the token ids of each canvas's commit, and its statistics."""
    from mlx_dgemma.generation import Commit, Done, stream_generate

    events = list(
        stream_generate(
            model, tokenizer, PROMPT, 64, seed=seed, fast=stepper == "fast", **options(drafter, constraint)
        )
    )
    done = events[-1]
    assert isinstance(done, Done)
    s = done.stats
    return {
        "commits": [e.tokens for e in events if isinstance(e, Commit)],
        "text": done.answer,
        "passes": s.decoder_passes,
        "positions": s.decoder_positions,
        "drafted": s.drafted_canvases,
        "restarted": s.restarted_canvases,
    }


def record(out: Path) -> None:
    from mlx_dgemma import load  # noqa: I001 (first: on Linux it loads a fast BLAS before mlx)
    import mlx.core as mx

    model, tokenizer = load(DEMO24, dtype=mx.float32)
    got = {"/".join(combo): run(model, tokenizer, *combo) for combo in combinations()}
    out.write_text(json.dumps(got, indent=1) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]))
