"""The converter's output files: shard names as mlx-lm writes them, and the processor config of a vision model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dgemma import DEFAULT_MODEL, load_model
from mlx_dgemma.convert import cli as convert_cli
from mlx_dgemma.convert import convert, stream
from mlx_dgemma.model.image_processing import DEFAULT_BUDGET, process_image
from mlx_dgemma.model.loader import load_weights, weight_files
from mlx_dgemma.prompt.multimodal import image_budget

INDEX = "model.safetensors.index.json"


def weight_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def index_of(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def assert_same(a: dict[str, mx.array], b: dict[str, mx.array]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and mx.array_equal(a[key], b[key]).item(), key


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The embedded model (vision tower included, under 5 MB): one shard."""
    return convert(DEFAULT_MODEL, tmp_path_factory.mktemp("layout") / "out", progress=False).path


# -- shard names ------------------------------------------------------------------------------------------------


def test_single_shard_is_model_safetensors_with_index_as_mlx_lm_writes(single, tmp_path):
    from mlx_lm.utils import save_model

    save_model(tmp_path / "mlx-lm", nn.Linear(4, 4))  # mlx-lm's own naming of one shard, index included
    assert weight_names(single) == weight_names(tmp_path / "mlx-lm") == ["model.safetensors"]
    assert (tmp_path / "mlx-lm" / INDEX).is_file() and (single / INDEX).is_file()
    weights = load_weights(single)
    assert set(index_of(single)["weight_map"].values()) == {"model.safetensors"}
    assert set(index_of(single)["weight_map"]) == set(weights)
    assert stream.shard_names(1) == ["model.safetensors"]
    load_model(single)


def test_multi_shard_keeps_numbered_names_and_index(single, tmp_path):
    out = convert(DEFAULT_MODEL, tmp_path / "out", shard_size=1 << 20, progress=False).path
    names = weight_names(out)
    assert len(names) > 1 and names == stream.shard_names(len(names))
    assert names[0] == f"model-00001-of-{len(names):05d}.safetensors" and "model.safetensors" not in names
    index = index_of(out)
    assert sorted(set(index["weight_map"].values())) == names
    assert_same(load_weights(out), load_weights(single))
    load_model(out)


@pytest.mark.parametrize("with_index", [True, False])
def test_old_single_shard_naming_still_loads(single, tmp_path, with_index):
    """Folders converted before: ``model-00001-of-00001.safetensors`` (with its index, or without one)."""
    old = tmp_path / "old"
    shutil.copytree(single, old)
    (old / "model.safetensors").rename(old / "model-00001-of-00001.safetensors")
    index = index_of(old)
    index["weight_map"] = {k: "model-00001-of-00001.safetensors" for k in index["weight_map"]}
    (old / INDEX).write_text(json.dumps(index))
    if not with_index:
        (old / INDEX).unlink()
    assert [f.name for f in weight_files(old)] == ["model-00001-of-00001.safetensors"]
    assert_same(load_weights(old), load_weights(single))
    load_model(old)


def test_new_single_shard_without_index_loads(single, tmp_path):
    """``model.safetensors`` alone (no index), as a hand-copied or mlx-community single-file folder."""
    folder = tmp_path / "bare"
    shutil.copytree(single, folder)
    (folder / INDEX).unlink()
    assert [f.name for f in weight_files(folder)] == ["model.safetensors"]
    load_model(folder)


# -- processor config -------------------------------------------------------------------------------------------


def lmstudio(tmp_path: Path, monkeypatch, *flags: str) -> Path:
    monkeypatch.setenv("LMSTUDIO_HOME", str(tmp_path / "lmstudio"))
    assert convert_cli.main(["--hf-path", str(DEFAULT_MODEL), "--lmstudio", "--publisher", "me", *flags]) == 0
    folders = list((tmp_path / "lmstudio" / "models" / "me").iterdir())
    assert len(folders) == 1
    return folders[0]


def test_lmstudio_vision_export_has_the_processor_config(tmp_path, monkeypatch):
    """The source ships none: one is built from the vision config, and transformers' processor built from it
    gives our pixels (mlx-vlm, LM Studio's MLX engine, reads the same file)."""
    assert not any(
        (DEFAULT_MODEL / n).exists() for n in ("processor_config.json", "preprocessor_config.json")
    )
    target = lmstudio(tmp_path, monkeypatch, "-q")
    assert weight_names(target) == ["model.safetensors"]
    vision = json.loads((target / "config.json").read_text())["vision_config"]
    config = json.loads((target / "processor_config.json").read_text())
    image = config["image_processor"]
    assert config["processor_class"] == "Gemma4Processor" and config["image_seq_length"] == DEFAULT_BUDGET
    assert (image["patch_size"], image["pooling_kernel_size"]) == (
        vision["patch_size"],
        vision["pooling_kernel_size"],
    )
    assert image["max_soft_tokens"] == DEFAULT_BUDGET and image["do_normalize"] is False

    class Loaded:
        source = str(target)

    assert image_budget(Loaded()) == DEFAULT_BUDGET  # our own runtime reads it the same way
    transformers = pytest.importorskip("transformers")
    processor = transformers.AutoImageProcessor.from_pretrained(str(target))
    rgb = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    theirs = processor(rgb, return_tensors="np")
    pixels, positions, tokens = process_image(
        rgb, DEFAULT_BUDGET, vision["patch_size"], vision["pooling_kernel_size"]
    )
    assert np.array_equal(theirs["pixel_values"][0], pixels)
    assert np.array_equal(theirs["image_position_ids"][0], positions)
    assert theirs["num_soft_tokens_per_image"].tolist() == [tokens]


def test_text_only_export_has_no_processor_config(tmp_path, monkeypatch):
    target = lmstudio(tmp_path, monkeypatch, "--drop-vision")
    assert (
        not (target / "processor_config.json").exists() and not (target / "preprocessor_config.json").exists()
    )
    assert json.loads((target / "config.json").read_text())["vision_config"] is None


def test_a_shipped_processor_config_is_copied_not_rebuilt(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(DEFAULT_MODEL, src, ignore=shutil.ignore_patterns("drafter"))
    shipped = '{"image_processor": {"image_processor_type": "Gemma4ImageProcessor", "max_soft_tokens": 70}}\n'
    (src / "preprocessor_config.json").write_text(shipped)
    out = convert(src, tmp_path / "out", progress=False).path
    assert (out / "preprocessor_config.json").read_text() == shipped
    assert not (out / "processor_config.json").exists()
