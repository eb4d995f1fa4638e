"""A model written in the original HF layout (``mlx_dgemma.convert.hf_export``) loads in transformers with our logits:
the 24-token demo model as it is, after a LoRA fine-tune fused into it, and dequantized from a 4-bit folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_dgemma.convert.hf_export import export_hf
from mlx_dgemma.errors import CheckpointError
from mlx_dgemma.model.loader import load_model
from mlx_dgemma.train import LoRAConfig, apply_lora, fuse_lora
from tests.conftest import DEMO24, reference_env
from tests.runtime.test_distributed import quantized_copy

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [[2, 11, 57, 300, 17, 901, 45, 88, 12, 640, 33]]
KINDS = ["plain", "fused_lora", "dequantized_q4"]


def canvas_of(model) -> mx.array:
    return mx.array([[(13 * i + 5) % model.args.vocab_size for i in range(model.args.canvas_length)]])


def ours(model) -> tuple[np.ndarray, np.ndarray]:
    cache = model.make_cache()
    model.encode(mx.array(PROMPT), cache)
    first = model.denoise(canvas_of(model), cache)
    return np.array(first), np.array(model.denoise(canvas_of(model), cache, first))


def fine_tuned(model):
    """A LoRA fine-tune with random (non-zero) adapters, fused."""
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    params = [
        (f"{path}.lora_b", mx.random.normal(m["lora_b"].shape, key=mx.random.key(i)) * 0.05)
        for i, (path, m) in enumerate(model.named_modules())
        if "lora_b" in m
    ]
    assert params
    model.update(tree_unflatten(params))
    return fuse_lora(model, dequantize=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each kind exported in float32, our logits for it, and the reference's from one transformers process."""
    tmp = tmp_path_factory.mktemp("hf_export")
    folders, want = [], {}
    for kind in KINDS:
        base = quantized_copy(tmp / "q4") if kind == "dequantized_q4" else DEMO24
        model = load_model(base, mx.float32)
        if kind == "fused_lora":
            model = fine_tuned(model)
        want[kind] = ours(model)
        folders.append(export_hf(model, base, tmp / kind, dtype=mx.float32))
    canvas = np.array(canvas_of(model), dtype=np.int32)
    np.savez(tmp / "ids.npz", prompt=np.array(PROMPT, dtype=np.int32), canvas=canvas)
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "hf_logits.py"),
            str(tmp / "ids.npz"),
            str(tmp / "ref.npz"),
            *map(str, folders),
        ],
        check=True,
        env=reference_env(),
        capture_output=True,
        timeout=900,
    )
    ref = dict(np.load(tmp / "ref.npz"))
    return {
        kind: (folder, want[kind], (ref[f"{i}/logits"], ref[f"{i}/logits_sc"]))
        for i, (kind, folder) in enumerate(zip(KINDS, folders))
    }


@pytest.mark.parametrize("kind", KINDS)
def test_hf_export_loads_in_transformers_with_our_logits(exported, kind):
    folder, want, got = exported[kind]
    assert not list(folder.glob("*.tmp.*"))
    for w, g in zip(want, got):
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max(), kind


def test_plain_export_is_the_original_checkpoint(exported):
    """Exporting a model unchanged gives back its own tensors, names included."""
    folder, want, _ = exported["plain"]
    original = mx.load(str(DEMO24 / "model.safetensors"))
    written = mx.load(str(folder / "model.safetensors"))
    assert set(written) == set(original)
    assert all(mx.allclose(written[k], original[k].astype(mx.float32)).item() for k in original)
    assert np.allclose(ours(load_model(folder, mx.float32))[0], want[0], atol=1e-6)


def test_export_refuses_to_overwrite_the_base():
    with pytest.raises(CheckpointError, match="base model's folder"):
        export_hf(load_model(DEMO24), DEMO24, DEMO24)


def test_train_fuse_hf_layout_writes_what_export_hf_writes(tmp_path):
    """``mlx_dgemma.train --fuse --hf-layout`` on saved adapters: the same tensors as fusing them and calling
    ``export_hf`` (whose output transformers loads with our logits, above)."""
    import json

    from mlx_dgemma.train.cli import main

    model = load_model(DEMO24, mx.float32)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    params = [
        (f"{path}.lora_b", mx.random.normal(m["lora_b"].shape, key=mx.random.key(i)) * 0.05)
        for i, (path, m) in enumerate(model.named_modules())
        if "lora_b" in m
    ]
    model.update(tree_unflatten(params))
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    mx.save_safetensors(
        str(adapters / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    (adapters / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "alpha": 8.0}})
    )
    want = export_hf(fuse_lora(model, dequantize=True), DEMO24, tmp_path / "api", dtype=mx.float32)
    assert (
        main(
            [
                "--model",
                str(DEMO24),
                "--out",
                str(adapters),
                "--fuse",
                "--hf-layout",
                "--fused-dtype",
                "float32",
                "--fused-out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    a, b = mx.load(str(want / "model.safetensors")), mx.load(str(tmp_path / "cli" / "model.safetensors"))
    assert set(a) == set(b) and all(mx.array_equal(a[k], b[k]).item() for k in a)
