"""Loading: hub cache folders, lazy weights, and one-line errors for every bad checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_dgemma import CheckpointError, load_model
from mlx_dgemma.model.config import ModelArgs


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def error_of(path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_config_forms_agree(base):
    """save_pretrained's per_layer_config and the released global_head_dim form give the same shapes."""
    saved = ModelArgs.from_config(json.loads((base.hf / "config.json").read_text()))
    released = ModelArgs.from_config(json.loads((base.hf_released / "config.json").read_text()))
    assert json.loads((base.hf / "config.json").read_text())["text_config"].get("per_layer_config")
    assert "per_layer_config" not in json.loads((base.hf_released / "config.json").read_text())["text_config"]
    assert saved == released
    assert (saved.global_head_dim, saved.num_global_key_value_heads) == (32, 1)
    assert saved.layer_types[-1] == "full_attention"


def test_missing_folder(tmp_path):
    assert "not found" in error_of(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    assert "no config.json" in error_of(tmp_path)


def test_wrong_model_type(base, tmp_path):
    folder = copy_of(base.hf, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gemma4"
    (folder / "config.json").write_text(json.dumps(config))
    message = error_of(folder)
    assert "'gemma4'" in message and "diffusion_gemma" in message


def test_missing_tensor_is_named(base, tmp_path):
    folder = copy_of(base.hf, tmp_path)
    file = next(folder.glob("*.safetensors"))
    weights = mx.load(str(file))
    victim = next(k for k in sorted(weights) if k.endswith("router.proj.weight"))
    del weights[victim]
    mx.save_safetensors(str(file), weights)
    message = error_of(folder)
    assert "1 missing" in message and victim.replace("encoder.language_model", "decoder") in message


def test_mismatched_shape_is_named(base, tmp_path):
    folder = copy_of(base.hf, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(config))
    message = error_of(folder)
    assert "wrong shape" in message and "experts" in message


def test_truncated_safetensors(base, tmp_path):
    folder = copy_of(base.hf, tmp_path)
    file = next(folder.glob("*.safetensors"))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    message = error_of(folder)
    assert "truncated" in message and file.name in message


def test_garbage_safetensors(base, tmp_path):
    folder = copy_of(base.hf, tmp_path)
    next(folder.glob("*.safetensors")).write_bytes(b"not a safetensors file at all")
    assert "not a valid safetensors" in error_of(folder)


def test_missing_shard(base, tmp_path):
    folder = copy_of(base.hf_released, tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    message = error_of(folder)
    assert "missing" in message and shard.name in message


def test_hub_cache_folder(base, tmp_path, monkeypatch):
    """A repo id resolves through the Hugging Face cache layout, offline."""
    hub = tmp_path / "hub"
    snapshot = hub / "models--someone--tiny-dgemma" / "snapshots" / ("a" * 40)
    shutil.copytree(base.hf, snapshot)
    (hub / "models--someone--tiny-dgemma" / "refs").mkdir()
    (hub / "models--someone--tiny-dgemma" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = load_model("someone/tiny-dgemma", dtype=mx.float32)
    assert model.args.num_hidden_layers == 6
    assert "not in the hub cache" in error_of("someone/absent-model")


def test_weights_are_memory_mapped(tmp_path):
    """Loading reads headers only: resident memory grows far less than the weights' size until they are used."""
    args = ModelArgs(
        vocab_size=65536,
        hidden_size=256,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_global_key_value_heads=1,
        head_dim=64,
        global_head_dim=64,
        num_experts=4,
        top_k_experts=1,
    )
    from mlx.utils import tree_flatten

    from mlx_dgemma import Model

    folder = tmp_path / "big"
    folder.mkdir()
    weights = dict(tree_flatten(Model(args).parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    config = {
        "model_type": "diffusion_gemma",
        "text_config": {
            k: getattr(args, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "moe_intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "num_global_key_value_heads",
                "head_dim",
                "global_head_dim",
                "num_experts",
                "top_k_experts",
            )
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    size = (folder / "model.safetensors").stat().st_size
    del weights

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

    before = rss()
    model = load_model(folder)
    grown = rss() - before
    assert grown < size / 4, f"loading read {grown} bytes of a {size}-byte checkpoint"
    mx.eval(model.parameters())
    assert rss() - before > size / 2  # and the weights do arrive once used
