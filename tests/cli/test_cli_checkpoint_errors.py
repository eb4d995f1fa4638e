"""A damaged checkpoint folder is a one-line error naming the file and the fix, from the API and the CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from mlx_dgemma import CheckpointError, load
from mlx_dgemma.cli.generate import main
from mlx_dgemma.model.config import ModelArgs
from tests.conftest import DEMO24


@pytest.fixture
def folder(tmp_path):
    out = tmp_path / "model"
    shutil.copytree(DEMO24, out, ignore=shutil.ignore_patterns("drafter"))
    return out


def set_text_config(folder, **values):
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(values)
    (folder / "config.json").write_text(json.dumps(config))


def one_line_cli_error(folder, capsys) -> str:
    rc = main(["--model", str(folder), "--prompt", "hi", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error:") and "Traceback" not in err
    return err


@pytest.mark.parametrize("content", ["[1, 2]", '"config"', "3"])
def test_a_config_that_is_not_an_object(folder, capsys, content):
    (folder / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"config\.json holds a JSON"):
        load(folder)
    assert "config.json" in one_line_cli_error(folder, capsys)


@pytest.mark.parametrize(
    ("name", "value", "want"),
    [
        ("hidden_size", -64, "positive integer"),
        ("hidden_size", 0, "positive integer"),
        ("num_hidden_layers", 0, "positive integer"),
        ("vocab_size", 1.5, "positive integer"),
        ("num_experts", "8", "positive integer"),
        ("rms_norm_eps", -1e-6, "positive number"),
        ("top_k_experts", 99, "at most num_experts"),
        ("num_key_value_heads", 3, "divisor"),
        ("layer_types", ["sliding_attention", "full_attention"], "one entry per layer"),
        ("sliding_window", True, "positive integer"),
    ],
)
def test_impossible_numbers_in_the_config(folder, capsys, name, value, want):
    set_text_config(folder, **{name: value})
    with pytest.raises(CheckpointError) as info:
        load(folder)
    message = str(info.value)
    assert "config.json" in message and name in message and want in message and "\n" not in message
    assert name in one_line_cli_error(folder, capsys)


def test_the_released_defaults_pass_the_checks():
    ModelArgs().check()


def test_a_broken_chat_template(folder, capsys):
    (folder / "chat_template.jinja").write_text("{% for message in %}{{ message }}{% endfor %}")
    with pytest.raises(CheckpointError) as info:
        load(folder)
    message = str(info.value)
    assert "chat_template.jinja" in message and "line 1" in message and "original checkpoint" in message
    assert "chat_template.jinja" in one_line_cli_error(folder, capsys)


def test_a_generation_config_that_is_not_an_object(folder):
    (folder / "generation_config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"generation_config\.json holds a JSON list"):
        load(folder)
