"""``python -m demo.train_drafter --from-data`` (docs/drafter.md) on a copy of the 24-token demo model: a one-layer
drafter, two steps."""

from __future__ import annotations

import json
import shutil

from demo import task
from tests.benchmarks.commands import run_module, succeeded
from tests.conftest import DEMO24


def test_distils_a_drafter_into_the_model_folder(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(DEMO24, model, ignore=shutil.ignore_patterns("drafter"))
    args = [
        "--model",
        model,
        "--prompts",
        "8",
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--layers",
        "1",
        "--from-data",
    ]
    stdout = succeeded(run_module("demo.train_drafter", *args, "--work", tmp_path / "work"))
    assert f"drafter for {model}: {model / 'drafter'}" in stdout, stdout
    config = json.loads((model / "drafter" / "config.json").read_text())
    assert config["drafter"]["num_layers"] == 1 and config["drafter"]["canvas_length"] == 24
    assert config["training"]["steps"] == 2 and config["training"]["prompts"] == 8
    assert (model / "drafter" / "drafter.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "work" / "prompts.jsonl").read_text().splitlines()]
    assert records == [{"prompt": it.prompt, "completion": it.answer} for it in task.split("train", 8)]
