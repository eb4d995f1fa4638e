"""``python -m demo.train`` (docs/demo-model.md) at a tiny size: stage 2 alone from the 24-token demo model, and
(slow: the skeleton is built by the reference, torch) both stages from scratch."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from demo.train import GENERATION, STAGE2_CONFIG
from tests.benchmarks.commands import run_module, succeeded
from tests.conftest import DEMO24

TINY = ["--iters", "1", "--train-size", "32", "--valid-size", "4", "--test-n", "1"]


def check_model(out, stage1: str) -> None:
    """The written model: stage 2's canvas and window, the shipped sampler settings, the card, the HF keys."""
    config = json.loads((out / "config.json").read_text())
    assert config["canvas_length"] == STAGE2_CONFIG["canvas_length"]
    assert config["text_config"]["sliding_window"] == STAGE2_CONFIG["sliding_window"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["sampler_config"]["entropy_bound"] == GENERATION["entropy_bound"]
    assert generation["max_denoising_steps"] == GENERATION["max_denoising_steps"]
    card = (out / "README.md").read_text()
    assert f"- Curriculum: {stage1}" in card and "first 1 test items" in card, card
    with (
        safe_open(out / "model.safetensors", "np") as ours,
        safe_open(DEMO24 / "model.safetensors", "np") as demo,
    ):
        assert set(ours.keys()) == set(demo.keys())  # the released layout's names, vision weights kept


def test_stage2_from_a_model(tmp_path):
    out = tmp_path / "out"
    args = ["--init", DEMO24, "--out", out, "--work", tmp_path / "work", *TINY]
    stdout = succeeded(run_module("demo.train", *args))
    assert f"stage 1 skipped: started from {DEMO24}" in stdout and "held-out exact match (1, bf16)" in stdout
    check_model(out, f"stage 1 skipped: started from {DEMO24}")


@pytest.mark.slow
def test_both_stages_from_a_skeleton(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    stdout = succeeded(run_module("demo.train", "--out", out, "--work", work, "--stage1-iters", "1", *TINY))
    assert json.loads((work / "skeleton" / "config.json").read_text())["canvas_length"] == 24
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"]) >= 1024
    stage1 = "stage 1: 1 steps of 32, one person, 24-token canvases"
    assert stage1 in stdout, stdout
    check_model(out, stage1)
