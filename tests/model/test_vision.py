"""Image input against transformers 5.23 on tiny random checkpoints WITH a vision tower.

The reference (``tests/reference/make_vision_fixture.py``) runs in its own process, as for the text fixtures.
Two checkpoints: ``vision`` sets ``use_bidirectional_attention: "vision"`` (tokens of one image attend both
ways; blocks of 45-64 tokens, longer than the 16-token sliding window) with clipped linears and standardized
soft tokens; ``causal`` is causal throughout, plain linears. Each prompt has two images, then a committed canvas
and a second turn with a third image.
"""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_dgemma import GenerationError, load_model
from mlx_dgemma.model.image_processing import expand_image_tokens, process_images
from mlx_dgemma.model.vision import prefill_with_images
from tests.conftest import BASE_TEXT, DEMO24, ROOT, run_reference
from tests.model.test_model_parity import FP32_TOL, rel_err

MAKE = ROOT / "reference" / "make_vision_fixture.py"
TEXT = {k: v for k, v in BASE_TEXT.items() if k != "use_bidirectional_attention"}
SPECS = {
    "vision": {
        "text": TEXT,
        "bidirectional": "vision",
        "clipped": True,
        "standardize": True,
        "processor": True,
        "seed": 3,
        "canvas_length": 8,
    },
    "causal": {"text": TEXT, "bidirectional": None, "seed": 4, "canvas_length": 8},
}
# (height, width, mode, budget) of the processor cases, as the fixture builder draws them.
PROCESSOR_CASES = [
    (120, 200, "RGB", 70),
    (400, 90, "RGB", 140),
    (20, 600, "RGB", 70),
    (333, 333, "RGBA", 280),
    (64, 48, "L", 560),
    (50, 50, "RGB", 1120),
    (768, 1024, "RGB", 280),
    (48, 48, "RGB", 70),
]
_BUILT: dict[str, tuple] = {}


@pytest.fixture(scope="session")
def vision_factory(tmp_path_factory):
    def get(name: str):
        if name not in _BUILT:
            out = tmp_path_factory.mktemp(f"vision-{name}")
            run_reference(MAKE, SPECS[name], out)
            _BUILT[name] = (out, dict(np.load(out / "reference.npz")))
        return _BUILT[name]

    return get


@pytest.fixture(scope="session", params=sorted(SPECS))
def vfx(request, vision_factory):
    return (request.param, *vision_factory(request.param))


def a(ref: dict, key: str) -> mx.array:
    x = ref[key]
    return mx.array(x.astype(np.int32) if x.dtype.kind in "iu" else x)


def cache_err(cache, ref: dict, prefix: str) -> float:
    worst = 0.0
    for i, layer in enumerate(cache):
        k, v = layer.state[:2]
        n = ref[f"{prefix}_k_{i}"].shape[2]
        assert k.shape[2] >= n
        worst = max(
            worst,
            rel_err(k[..., :n, :], ref[f"{prefix}_k_{i}"]),
            rel_err(v[..., :n, :], ref[f"{prefix}_v_{i}"]),
        )
    return worst


def image_types(ids: mx.array, model) -> mx.array:
    return (ids == model.vision_args.image_token_id).astype(mx.int32)


def run_turns(model, ref: dict, types: bool = True, whole_sequence_types: bool = False) -> dict[str, float]:
    """Image prompt → cache, logits; commit; second turn with an image → cache, logits (relative errors)."""
    cache = model.make_cache()
    prompt = a(ref, "prompt")
    model.encode(
        prompt,
        cache,
        pixel_values=a(ref, "pixels1"),
        image_position_ids=a(ref, "positions1"),
        mm_token_type_ids=image_types(prompt, model) if types else None,
    )
    errs = {"prefill_cache": cache_err(cache, ref, "prefill")}
    errs["logits1"] = rel_err(model.denoise(a(ref, "canvas1"), cache, a(ref, "sc_logits1")), ref["logits1"])
    model.encode(a(ref, "commit1"), cache)
    turn2 = a(ref, "turn2")
    t2 = mx.concatenate([prompt, a(ref, "commit1"), turn2], axis=1) if whole_sequence_types else turn2
    model.encode(
        turn2,
        cache,
        pixel_values=a(ref, "pixels2"),
        image_position_ids=a(ref, "positions2"),
        mm_token_type_ids=image_types(t2, model) if types else None,
    )
    errs["turn2_cache"] = cache_err(cache, ref, "turn2")
    errs["logits2"] = rel_err(model.denoise(a(ref, "canvas2"), cache, a(ref, "sc_logits2")), ref["logits2"])
    return errs


def test_image_features_match(vfx):
    name, folder, ref = vfx
    model = load_model(folder / "hf", dtype=mx.float32)
    assert model.vision_args is not None and model.vision_args.use_clipped_linears == (name == "vision")
    for turn in ("1", "2"):
        feats = model.get_image_features(a(ref, f"pixels{turn}"), a(ref, f"positions{turn}"))
        assert rel_err(feats, ref[f"features{turn}"]) < FP32_TOL


def test_our_processor_gives_the_reference_pixels(vfx):
    """The scenario images through our processor: the pixels the reference's processor gave the model."""
    _, _, ref = vfx
    out = process_images([ref["images_0"], ref["images_1"]], budget=70)
    assert np.array_equal(out.pixel_values, ref["pixels1"])
    assert np.array_equal(out.image_position_ids, ref["positions1"])
    assert (
        sum(out.num_soft_tokens_per_image) == ref["features1"].shape[0] == int((ref["prompt"] == 511).sum())
    )


def test_cache_and_logits_after_image_prompts_match(vfx):
    name, folder, ref = vfx
    model = load_model(folder / "hf", dtype=mx.float32)
    errs = run_turns(model, ref)
    print(f"\n{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) < FP32_TOL, errs
    # The reference's own indexing: mm_token_type_ids of the whole sequence in the second turn.
    assert max(run_turns(model, ref, whole_sequence_types=True).values()) < FP32_TOL


def test_bidirectional_mask_is_what_matches(vision_factory):
    """Without the block overlay (no mm_token_type_ids), the bidirectional checkpoint no longer matches:
    the parity above does test the mask."""
    folder, ref = vision_factory("vision")
    model = load_model(folder / "hf", dtype=mx.float32)
    assert run_turns(model, ref, types=False)["logits1"] > 100 * FP32_TOL


@pytest.mark.parametrize("chunk", [7, 50])
def test_chunked_prefill_keeps_image_blocks_whole(vision_factory, chunk):
    folder, ref = vision_factory("vision")
    model = load_model(folder / "hf", dtype=mx.float32)
    prompt = a(ref, "prompt")
    whole = model.make_cache()
    model.encode(
        prompt,
        whole,
        pixel_values=a(ref, "pixels1"),
        image_position_ids=a(ref, "positions1"),
        mm_token_type_ids=image_types(prompt, model),
    )
    parts = model.make_cache()
    prefill_with_images(
        model, prompt, parts, a(ref, "pixels1"), a(ref, "positions1"), image_types(prompt, model), chunk=chunk
    )
    canvas, sc = a(ref, "canvas1"), a(ref, "sc_logits1")
    assert rel_err(model.denoise(canvas, parts, sc), np.array(model.denoise(canvas, whole, sc))) < 1e-5


@pytest.mark.parametrize("case", range(len(PROCESSOR_CASES)))
def test_processor_identical_to_reference(vision_factory, case):
    from PIL import Image

    _, ref = vision_factory("vision")
    _, _, mode, budget = PROCESSOR_CASES[case]
    image = ref[f"processor_image_{case}"]
    out = process_images([Image.fromarray(image, mode)], budget=budget)
    assert np.array_equal(out.pixel_values, ref[f"processor_pixels_{case}"])
    assert np.array_equal(out.image_position_ids, ref[f"processor_positions_{case}"])
    assert out.num_soft_tokens_per_image == ref[f"processor_tokens_{case}"].tolist()


def test_expand_image_tokens():
    img, boi, eoi = 9, 7, 8
    assert expand_image_tokens([1, img, 2, boi, img, eoi, 3], [2, 1], img, boi, eoi) == [
        1,
        boi,
        img,
        img,
        eoi,
        2,
        boi,
        img,
        eoi,
        3,
    ]
    with pytest.raises(GenerationError, match="2 image placeholders for 1 images"):
        expand_image_tokens([img, img], [3], img, boi, eoi)


def test_placeholder_count_mismatch_is_one_line(vision_factory):
    folder, ref = vision_factory("causal")
    model = load_model(folder / "hf", dtype=mx.float32)
    prompt = a(ref, "prompt")[:, :-10]  # drops placeholders of the second image
    with pytest.raises(GenerationError, match="image placeholder tokens but the images give"):
        model.encode(
            prompt,
            model.make_cache(),
            pixel_values=a(ref, "pixels1"),
            image_position_ids=a(ref, "positions1"),
        )


def collapse(ids: list[int], img: int, boi: int, eoi: int) -> list[int]:
    """The processor's input: one <|image|> per image (undo the expansion)."""
    out, inside = [], False
    for t in ids:
        if t == boi:
            inside = True
            out.append(img)
        elif t == eoi:
            inside = False
        elif not inside:
            out.append(t)
    return out


class StubTokenizer:
    """Just what stream_generate needs from a tokenizer, for a checkpoint that has none."""

    eos_token_ids = (1,)

    def decode(self, ids):
        return " ".join(map(str, ids))

    def convert_ids_to_tokens(self, i):
        return f"<{i}>"


def test_generate_with_images_prefills_as_the_reference(vision_factory):
    """prompt ids with one placeholder per image + images → the reference's expanded prompt and prefill cache."""
    from mlx_dgemma import stream_generate
    from mlx_dgemma.prompt import multimodal

    folder, ref = vision_factory("vision")
    (folder / "hf" / "processor_config.json").write_text(
        json.dumps({"image_processor": {"max_soft_tokens": 70}})
    )
    model = load_model(folder / "hf", dtype=mx.float32)
    v = model.vision_args
    raw = collapse(ref["prompt"][0].tolist(), v.image_token_id, v.boi_token_id, v.eoi_token_id)
    images = [ref["images_0"], ref["images_1"]]
    prepared = multimodal.prepare(model, raw, images)
    assert prepared.ids == ref["prompt"][0].tolist()
    cache = model.make_cache()
    multimodal.prefill(model, prepared, cache)
    assert cache_err(cache, ref, "prefill") < FP32_TOL
    events = list(
        stream_generate(
            model,
            StubTokenizer(),
            None,
            8,
            prompt_ids=raw,
            images=images,
            drafter="none",
            max_denoising_steps=2,
        )
    )
    assert events[-1].stats.prompt_tokens == ref["prompt"].shape[1]


def test_generate_with_images_on_the_demo_model():
    """The embedded demo model carries a (tiny, untrained) vision tower: images go through the whole path."""
    from mlx_dgemma import generate, load

    model, tokenizer = load(DEMO24)
    image = np.full((32, 40, 3), 128, np.uint8)
    text = generate(model, tokenizer, "Describe the image.", max_tokens=8, images=[image], drafter="none")
    parts = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}],
        }
    ]
    assert isinstance(text, str) and isinstance(
        generate(model, tokenizer, parts, max_tokens=8, drafter="none"), str
    )
    with pytest.raises(GenerationError, match="patches along one side"):
        generate(model, tokenizer, "Describe.", max_tokens=8, images=[np.zeros((4, 400, 3), np.uint8)])


def test_images_for_a_text_only_checkpoint_is_one_line(tmp_path):
    """A checkpoint without the tower (a --drop-vision conversion) refuses images in one line."""
    import shutil

    from mlx_dgemma import generate, load
    from mlx_dgemma.model.vision import VISION_PREFIXES

    folder = tmp_path / "text-only"
    shutil.copytree(DEMO24, folder, ignore=shutil.ignore_patterns("drafter", "model.safetensors"))
    weights = mx.load(str(DEMO24 / "model.safetensors"))
    mx.save_safetensors(
        str(folder / "model.safetensors"),
        {k: v for k, v in weights.items() if not k.startswith(VISION_PREFIXES)},
    )
    model, tokenizer = load(folder)
    assert model.vision_args is None
    with pytest.raises(GenerationError, match="no vision tower"):
        generate(model, tokenizer, "Describe it.", max_tokens=8, images=[np.zeros((32, 32, 3), np.uint8)])


def test_bad_images_are_one_line(tmp_path):
    from mlx_dgemma.model.image_processing import to_rgb_array

    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(GenerationError, match=r"cannot read .* as an image"):
        to_rgb_array(bad)
    with pytest.raises(GenerationError, match="image not found"):
        to_rgb_array(tmp_path / "missing.png")
    with pytest.raises(GenerationError, match="uint8"):
        to_rgb_array(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize("quantize", [False, True])
def test_converter_round_trips_the_tower(vision_factory, tmp_path, quantize):
    """HF → mlx_dgemma.convert (tower kept by default, unquantized) → load: the image scenarios still match."""
    from mlx_dgemma.convert import convert

    folder, ref = vision_factory("vision")
    out = convert(folder / "hf", tmp_path / "mlx", quantize=quantize, progress=False).path
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["use_clipped_linears"] is True
    model = load_model(out, dtype=mx.float32)
    tower = model.model.encoder.vision_tower
    assert type(tower.encoder.layers[0].self_attn.q_proj.linear).__name__ == "Linear"  # never quantized
    feats = model.get_image_features(a(ref, "pixels1"), a(ref, "positions1"))
    assert rel_err(feats, ref["features1"]) < FP32_TOL
    if not quantize:
        assert max(run_turns(model, ref).values()) < FP32_TOL
    dropped = convert(folder / "hf", tmp_path / "text", drop_vision=True, progress=False).path
    assert json.loads((dropped / "config.json").read_text())["vision_config"] is None
    assert load_model(dropped).vision_args is None


def test_fused_checkpoint_config_matches_its_weights(vision_factory, tmp_path):
    """save_fused (train --fuse, convert --adapter-path) writes the tower and its config, or neither."""
    from mlx_dgemma.model.vision import VISION_PREFIXES
    from mlx_dgemma.train.lora import save_fused

    folder, ref = vision_factory("causal")
    out = save_fused(load_model(folder / "hf", dtype=mx.float32), folder / "hf", tmp_path / "fused")
    assert json.loads((out / "config.json").read_text())["vision_config"] is not None
    assert max(run_turns(load_model(out, dtype=mx.float32), ref).values()) < FP32_TOL
    # A folder whose config names a tower its weights lack loads text-only; fusing it drops the vision_config.
    weights = mx.load(str(out / "model.safetensors"))
    mx.save_safetensors(
        str(out / "model.safetensors"),
        {k: v for k, v in weights.items() if not k.startswith(VISION_PREFIXES)},
    )
    model = load_model(out)
    assert model.vision_args is None
    bare = save_fused(model, out, tmp_path / "bare")
    assert json.loads((bare / "config.json").read_text())["vision_config"] is None


def test_cli_image_flag(tmp_path):
    """--image PATH (repeatable) on the demo model; a bad image is one error line, exit code 2."""
    from PIL import Image

    for i, size in enumerate([(40, 32), (24, 48)]):
        Image.fromarray(np.full((*size[::-1], 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "mlx_dgemma", "generate", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    ok = cli(
        "--prompt",
        "Compare the images.",
        "--image",
        str(tmp_path / "0.png"),
        "--image",
        str(tmp_path / "1.png"),
        "--max-tokens",
        "8",
        "--steps",
        "2",
        "--drafter",
        "none",
        "--verbose",
    )
    assert ok.returncode == 0, ok.stderr
    prompt_tokens = int(ok.stderr.split("Prompt: ")[1].split()[0])
    assert prompt_tokens > 2 * 100  # both images' soft tokens are in the prompt
    (tmp_path / "bad.png").write_text("no")
    bad = cli("--prompt", "hi", "--image", str(tmp_path / "bad.png"))
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and bad.stderr.strip().count("\n") == 0


def test_quantized_embedder_of_a_community_folder_loads(vision_factory, tmp_path):
    """mlx-vlm's predicate may quantize ``embed_vision`` (it only skips ``vision_tower``): such a folder loads
    into a quantized projection that computes what its dequantized weights compute."""
    from mlx_dgemma.convert import convert

    folder, ref = vision_factory("causal")
    out = convert(folder / "hf", tmp_path / "mlx", progress=False).path
    (file,) = out.glob("*.safetensors")
    weights = mx.load(str(file))
    key = "model.encoder.embed_vision.embedding_projection"
    w, scales, biases = mx.quantize(weights[f"{key}.weight"], 32, 8)
    weights.update({f"{key}.weight": w, f"{key}.scales": scales, f"{key}.biases": biases})
    mx.save_safetensors(str(file), weights)
    config = json.loads((out / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 8, "mode": "affine"}
    (out / "config.json").write_text(json.dumps(config))
    model = load_model(out, dtype=mx.float32)
    assert type(model.model.encoder.embed_vision.embedding_projection).__name__ == "QuantizedLinear"
    feats = model.get_image_features(a(ref, "pixels1"), a(ref, "positions1"))
    expected = model.model.encoder.vision_tower(a(ref, "pixels1"), a(ref, "positions1"))
    deq = mx.dequantize(w, scales, biases, 32, 8)
    from mlx_dgemma.model.vision import _rms_norm

    assert rel_err(feats, np.array(_rms_norm(expected, None, 1e-6) @ deq.T)) < 1e-5
    assert rel_err(feats, ref["features1"]) < 0.05  # 8-bit: close to the reference, not equal


def test_more_image_tokens_than_the_context_is_one_line():
    from mlx_dgemma import generate, load

    model, tokenizer = load(DEMO24)
    images = [np.full((32, 40, 3), 9 * i, np.uint8) for i in range(6)]  # 6 x 252 soft tokens > 1024 positions
    with pytest.raises(GenerationError, match=r"for images\), over the 1024-token context"):
        generate(model, tokenizer, "Describe them.", max_tokens=8, images=images)
