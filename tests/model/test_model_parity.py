"""Our MLX model against transformers 5.23 ``DiffusionGemmaForBlockDiffusion`` on tiny random checkpoints."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_dgemma import load_model
from tests.layouts import write_mlx_community

FP32_TOL = 1e-4  # max |ours - reference| relative to max |reference|


def rel_err(ours: mx.array, ref: np.ndarray) -> float:
    ours = np.array(ours.astype(mx.float32))
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert np.isfinite(ours).all()
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def ids(ref: dict, key: str) -> mx.array:
    return mx.array(ref[key].astype(np.int32))


def cache_errors(cache, ref: dict, prefix: str) -> float:
    worst = 0.0
    for i, layer in enumerate(cache):
        k, v = layer.state[:2]
        n = ref[f"{prefix}_k_{i}"].shape[2]
        worst = max(
            worst,
            rel_err(k[..., :n, :], ref[f"{prefix}_k_{i}"]),
            rel_err(v[..., :n, :], ref[f"{prefix}_v_{i}"]),
        )
        # Sliding layers must keep exactly the positions the reference keeps: the decoder reads all of them.
        stored = layer.stored if hasattr(layer, "stored") else layer.offset
        assert stored == n, f"layer {i} stores {stored} positions, the reference {n}"
    return worst


def run_single(model, ref: dict) -> dict[str, float]:
    """Prefill, two decoder calls, a committed canvas, and a second canvas: the relative error of each."""
    cache = model.make_cache()
    hidden = model.encode(ids(ref, "prompt"), cache)
    errs = {
        "prefill_hidden": rel_err(hidden, ref["prefill_hidden"]),
        "prefill_cache": cache_errors(cache, ref, "prefill"),
    }
    errs["logits_nosc"] = rel_err(model.denoise(ids(ref, "canvas1"), cache), ref["logits_nosc"])
    sc = mx.array(ref["sc_logits"])
    errs["logits_sc"] = rel_err(model.denoise(ids(ref, "canvas1"), cache, sc), ref["logits_sc"])
    model.encode(ids(ref, "commit1"), cache)
    errs["commit_cache"] = cache_errors(cache, ref, "commit")
    sc2 = mx.array(ref["sc_logits2"])
    errs["logits_second"] = rel_err(model.denoise(ids(ref, "canvas2"), cache, sc2), ref["logits_second"])
    return errs


def run_batch(model, ref: dict) -> dict[str, float]:
    """Two left-padded prompts of different lengths, the reference's padding semantics."""
    cache = model.make_cache()
    model.encode(ids(ref, "batch_prompt"), cache, mask=ids(ref, "batch_mask"))
    sc = mx.array(ref["batch_sc_logits"])
    errs = {"logits_batch": rel_err(model.denoise(ids(ref, "batch_canvas"), cache, sc), ref["logits_batch"])}
    model.encode(ids(ref, "batch_commit"), cache)
    errs["logits_batch2"] = rel_err(model.denoise(ids(ref, "batch_canvas2"), cache), ref["logits_batch2"])
    return errs


def test_fp32_parity(fixture):
    model = load_model(fixture.hf, dtype=mx.float32)
    errs = {**run_single(model, fixture.ref), **run_batch(model, fixture.ref)}
    print(f"\n{fixture.name} fp32 relative errors: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) < FP32_TOL, errs


@pytest.mark.parametrize("path", ["gather", "per_expert"])
def test_both_expert_paths_match(base, monkeypatch, path):
    """gather_mm (the GPU path) and per-expert matmuls (the CPU default) both match the reference."""
    import mlx_dgemma.model.diffusion_gemma

    monkeypatch.setattr(mlx_dgemma.model.diffusion_gemma, "EXPERT_MATMULS", path)
    model = load_model(base.hf, dtype=mx.float32)
    errs = {**run_single(model, base.ref), **run_batch(model, base.ref)}
    assert max(errs.values()) < FP32_TOL, errs


def test_released_sharded_layout_matches(fixture):
    """The released config form (global_head_dim, no per_layer_config), sharded with an index."""
    assert (fixture.hf_released / "model.safetensors.index.json").exists()
    model = load_model(fixture.hf_released, dtype=mx.float32)
    errs = run_single(model, fixture.ref)
    assert max(errs.values()) < FP32_TOL, errs


def test_mlx_community_layout_matches(base, tmp_path):
    folder = write_mlx_community(base.hf, tmp_path / "mlx")
    model = load_model(folder, dtype=mx.float32)
    errs = {**run_single(model, base.ref), **run_batch(model, base.ref)}
    assert max(errs.values()) < FP32_TOL, errs


def dequantized_copy(folder, out):
    """The same checkpoint with every quantized tensor expanded back to float32, as a plain folder."""
    weights = mx.load(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    q = config.pop("quantization")
    config.pop("quantization_config")
    for key in [k for k in weights if k.endswith(".scales")]:
        module = key[: -len(".scales")]
        bits = q.get(module, q)["bits"]
        weights[f"{module}.weight"] = mx.dequantize(
            weights[f"{module}.weight"],
            weights.pop(key),
            weights.pop(f"{module}.biases"),
            q["group_size"],
            bits,
        )
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_mlx_community_layout(fixture_factory, tmp_path, bits):
    """Quantized folders load into quantized layers (gather_qmm experts, quantized embedding and LM head) that
    compute what their dequantized weights compute. (Quality against the unquantized model is the converter's
    quant report: these random fixtures amplify any perturbation.)"""
    fx = fixture_factory("wide")  # every quantized dimension is a multiple of the group size 64
    folder = write_mlx_community(fx.hf, tmp_path / f"q{bits}", bits=bits)
    model = load_model(folder, dtype=mx.float32)
    layer = model.layers[0]
    assert isinstance(model.model.decoder.embed_tokens, nn.QuantizedEmbedding)
    assert layer.self_attn.q_proj.bits == 8 and layer.router.proj.bits == 8
    assert layer.experts.gate_up_proj.bits == bits and layer.experts.down_proj.bits == bits
    plain = load_model(dequantized_copy(folder, tmp_path / "plain"), dtype=mx.float32)
    ours, expected = run_single(model, fx.ref), run_single(plain, fx.ref)
    assert ours.keys() == expected.keys()
    cache_q, cache_p = model.make_cache(), plain.make_cache()
    for m, c in ((model, cache_q), (plain, cache_p)):
        m.encode(ids(fx.ref, "prompt"), c)
    sc = mx.array(fx.ref["sc_logits"])
    err = rel_err(
        model.denoise(ids(fx.ref, "canvas1"), cache_q, sc),
        np.array(plain.denoise(ids(fx.ref, "canvas1"), cache_p, sc)),
    )
    assert err < 1e-4, err


def test_bf16_within_bound(base):
    """bf16 logits are as close to the fp32 reference as the reference's own bf16 run is (within 1.5x).

    A fixed bound would not say much: these random models amplify rounding ~100x through their layers, so
    the reference itself moves by ~0.2 of the logit scale between fp32 and bf16."""
    model = load_model(base.hf, dtype=mx.bfloat16)
    assert model.layers[0].mlp.gate_proj.weight.dtype == mx.bfloat16
    cache = model.make_cache()
    model.encode(ids(base.ref, "prompt"), cache)
    logits = model.denoise(ids(base.ref, "canvas1"), cache, mx.array(base.ref["sc_logits"]))
    assert logits.dtype == mx.float32
    err = rel_err(logits, base.ref["logits_sc"])
    reference_err = rel_err(mx.array(base.ref["logits_sc_bf16"]), base.ref["logits_sc"])
    print(f"\nbf16 relative error: ours {err:.4f}, reference {reference_err:.4f}")
    assert err < 1.5 * reference_err


def test_denoise_never_writes_the_cache(base):
    model = load_model(base.hf, dtype=mx.float32)
    cache = model.make_cache()
    model.encode(ids(base.ref, "prompt"), cache)
    before = [np.array(a) for a in cache.state_arrays()]
    offsets = [c.offset for c in cache]
    model.denoise(ids(base.ref, "canvas1"), cache, mx.array(base.ref["sc_logits"]))
    after = [np.array(a) for a in cache.state_arrays()]
    assert [c.offset for c in cache] == offsets
    assert len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))


def test_chunked_encode_equals_one_call(base):
    """Encoding a prompt in pieces (as each committed canvas is) gives the same cache and logits."""
    model = load_model(base.hf, dtype=mx.float32)
    prompt = ids(base.ref, "prompt")
    whole, parts = model.make_cache(), model.make_cache()
    model.encode(prompt, whole)
    for start in range(0, prompt.shape[1], 7):
        model.encode(prompt[:, start : start + 7], parts)
    canvas = ids(base.ref, "canvas1")
    a, b = model.denoise(canvas, whole), model.denoise(canvas, parts)
    assert rel_err(b, np.array(a)) < 1e-5
