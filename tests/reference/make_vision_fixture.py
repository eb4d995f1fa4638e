"""Build a tiny random DiffusionGemma checkpoint WITH a vision tower, and record the reference's image outputs.

Pure torch + the reference (``transformers==5.23.0``), like ``make_fixture.py`` whose helpers it reuses: it must
never import mlx or mlx_dgemma.

    python tests/reference/make_vision_fixture.py --spec '{"bidirectional": "vision", ...}' --out DIR

Spec keys: ``text`` (text-config overrides), ``vision`` (Gemma4VisionConfig overrides), ``bidirectional``
("vision" or null), ``clipped`` (finite clipping ranges on the vision linears), ``standardize``,
``processor`` (also record the image-processor cases), ``checkpoint_only`` (write only DIR/hf), ``seed``,
``canvas_length``.

Writes DIR/hf (``save_pretrained``) and DIR/reference.npz:
  processor_*: Gemma 4's PIL image processor on random images (several sizes, aspects, modes and budgets)
  images_*:    the uint8 images the scenarios use; prompt / turn2 token ids and mm_token_type_ids
  features1 / features2: ``get_image_features(...).pooler_output`` of each turn's images
  prefill_k_i / prefill_v_i, logits1: cache and self-conditioned decoder logits after the image prompt
  turn2_k_i / turn2_v_i, logits2: after a committed canvas and a second turn with another image
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import DiffusionGemmaConfig, DiffusionGemmaTextConfig
from transformers.models.gemma4 import Gemma4VisionConfig
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixture import (
    SPECIAL_TOKENS,
    Model,
    cache_arrays,
    decode,
    load_reference,
    new_cache,
    normal_,
    random_ids,
    random_sc_logits,
    randomise_,
    to_numpy,
    uniform_,
)

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "patch_size": 16,
    "pooling_kernel_size": 3,
    "position_embedding_size": 160,
}
BUDGET = 70  # soft tokens per image in the model scenarios: blocks of 45-64 tokens, longer than the window
# (height, width) of the scenario images: wide, tall, square-ish small (upscaled), extreme panorama.
TURN1 = [(120, 200), (400, 90)]
TURN2 = [(50, 50)]
# Processor checks: (height, width, mode, budget).
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


def build_config(spec: dict) -> DiffusionGemmaConfig:
    text = DiffusionGemmaTextConfig(
        **{**SPECIAL_TOKENS, **spec["text"], "use_bidirectional_attention": spec.get("bidirectional")}
    )
    vision = Gemma4VisionConfig(
        **{
            **VISION,
            **spec.get("vision", {}),
            "use_clipped_linears": bool(spec.get("clipped")),
            "standardize": bool(spec.get("standardize")),
        }
    )
    vocab = text.vocab_size
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        boi_token_id=vocab - 3,
        eoi_token_id=vocab - 2,
        image_token_id=vocab - 1,
        canvas_length=spec["canvas_length"],
    )


@torch.no_grad()
def randomise_vision_(model: Model, gen: torch.Generator, clipped: bool) -> None:
    """Trained-like magnitudes for the tower: q/k norms near head_dim**-0.25 (scale 1.0 attention)."""
    encoder = model.model.encoder
    for name, p in list(encoder.vision_tower.named_parameters()) + list(
        encoder.embed_vision.named_parameters()
    ):
        if name.endswith("norm.weight"):
            is_qk = name.endswith(("q_norm.weight", "k_norm.weight"))
            uniform_(p, gen, p.numel() ** -0.25 if is_qk else 1.0)
        elif name.endswith("position_embedding_table"):
            normal_(p, gen, 0.5)
        else:
            normal_(p, gen, p.shape[-1] ** -0.5)
    tower = encoder.vision_tower
    if getattr(tower, "std_bias", None) is not None:
        normal_(tower.std_bias, gen, 1.0)
        uniform_(tower.std_scale, gen)
    if clipped:  # ranges that do clip, so the clamp path is exercised
        for name, buf in tower.named_buffers():
            if name.endswith(("input_max", "output_max")):
                buf.fill_(1.5)
            elif name.endswith(("input_min", "output_min")):
                buf.fill_(-1.5)


def random_image(rng: np.random.Generator, h: int, w: int, mode: str = "RGB") -> np.ndarray:
    """Smooth random colours plus noise: resizing must matter, and uniform noise would average out."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    coarse = rng.integers(0, 256, size=(max(h // 8, 2), max(w // 8, 2), channels), dtype=np.uint8)
    img = np.array(Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse, mode).resize((w, h)))
    noise = rng.integers(-20, 21, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def record_processor(rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for i, (h, w, mode, budget) in enumerate(PROCESSOR_CASES):
        img = random_image(rng, h, w, mode)
        proc = Gemma4ImageProcessorPil(max_soft_tokens=budget)
        res = proc(images=[Image.fromarray(img, mode)], return_tensors="np")
        out[f"processor_image_{i}"] = img
        out[f"processor_pixels_{i}"] = res["pixel_values"].astype(np.float32)
        out[f"processor_positions_{i}"] = res["image_position_ids"].astype(np.int32)
        out[f"processor_tokens_{i}"] = np.array(res["num_soft_tokens_per_image"], dtype=np.int32)
    return out


def image_prompt(gen: torch.Generator, config: DiffusionGemmaConfig, counts: list[int]) -> torch.Tensor:
    """Random text with ``<|image>`` + N x ``<|image|>`` + ``<image|>`` per image, as the processor expands it."""
    vocab = config.text_config.vocab_size
    parts = [random_ids(gen, (5,), vocab)]
    for n in counts:
        parts.append(
            torch.tensor([config.boi_token_id] + [config.image_token_id] * n + [config.eoi_token_id])
        )
        parts.append(random_ids(gen, (4,), vocab))
    return torch.cat(parts)[None]


def encode_images(model: Model, ids: torch.Tensor, cache, types: torch.Tensor, pixels, positions) -> None:
    """One encoder call as generate() makes it: the mask mapping built with the whole sequence's
    mm_token_type_ids (positions continue after the cache)."""
    past = cache.get_seq_length()
    position_ids = torch.arange(past, past + ids.shape[1])[None]
    mapping = model.model.encoder.create_masks_for_generate(
        config=model.config,
        inputs_embeds=torch.empty((1, ids.shape[1], 0)),
        attention_mask=torch.ones((1, past + ids.shape[1]), dtype=torch.bool),
        past_key_values=cache,
        position_ids=position_ids,
        mm_token_type_ids=types,
    )
    model.model.encoder(
        input_ids=ids,
        pixel_values=pixels,
        image_position_ids=positions,
        attention_mask=mapping,
        past_key_values=cache,
        position_ids=position_ids,
        use_cache=True,
    )


def process(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    res = Gemma4ImageProcessorPil(max_soft_tokens=BUDGET)(
        images=[Image.fromarray(i) for i in images], return_tensors="pt"
    )
    return res["pixel_values"], res["image_position_ids"], list(res["num_soft_tokens_per_image"])


@torch.no_grad()
def record_model(model: Model, spec: dict, gen: torch.Generator, rng: np.random.Generator) -> dict:
    config = model.config
    vocab, canvas_len = config.text_config.vocab_size, spec["canvas_length"]
    out: dict[str, torch.Tensor | np.ndarray] = {}
    imgs1 = [random_image(rng, h, w) for h, w in TURN1]
    imgs2 = [random_image(rng, h, w) for h, w in TURN2]
    for i, img in enumerate(imgs1 + imgs2):
        out[f"images_{i}"] = img
    pixels1, pos1, counts1 = process(imgs1)
    pixels2, pos2, counts2 = process(imgs2)
    encoder = model.model.encoder
    out["features1"] = encoder.get_image_features(pixels1, pos1).pooler_output
    out["features2"] = encoder.get_image_features(pixels2, pos2).pooler_output

    prompt = image_prompt(gen, config, counts1)
    types = (prompt == config.image_token_id).long()
    out.update(prompt=prompt, prompt_types=types, pixels1=pixels1, positions1=pos1)
    cache = new_cache(model)
    encode_images(model, prompt, cache, types, pixels1, pos1)
    out.update(cache_arrays(cache, "prefill"))
    out["canvas1"] = random_ids(gen, (1, canvas_len), vocab)
    out["sc_logits1"] = random_sc_logits(gen, (1, canvas_len, vocab))
    out["logits1"] = decode(model, out["canvas1"], cache, out["sc_logits1"])

    # Second turn: a committed canvas, then new text with another image (types cover the whole sequence).
    out["commit1"] = random_ids(gen, (1, canvas_len), vocab)
    model.model.encoder(input_ids=out["commit1"], past_key_values=cache, use_cache=True)
    turn2 = image_prompt(gen, config, counts2)
    full = torch.cat([prompt, out["commit1"], turn2], dim=1)
    out.update(turn2=turn2, pixels2=pixels2, positions2=pos2)
    encode_images(model, turn2, cache, (full == config.image_token_id).long(), pixels2, pos2)
    out.update(cache_arrays(cache, "turn2"))
    out["canvas2"] = random_ids(gen, (1, canvas_len), vocab)
    out["sc_logits2"] = random_sc_logits(gen, (1, canvas_len, vocab))
    out["logits2"] = decode(model, out["canvas2"], cache, out["sc_logits2"])
    return {k: v if isinstance(v, np.ndarray) else to_numpy(k, v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    spec = json.loads(args.spec)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec["seed"])
    model = Model(build_config(spec)).eval()
    gen = torch.Generator().manual_seed(spec["seed"])
    randomise_(model, gen)
    randomise_vision_(model, gen, bool(spec.get("clipped")))
    hf = args.out / "hf"
    shutil.rmtree(hf, ignore_errors=True)
    model.save_pretrained(hf)
    if spec.get("checkpoint_only"):  # benchmarks: the checkpoint, no reference outputs
        print(f"{hf}: checkpoint only")
        return
    reference = load_reference(hf, torch.float32)
    rng = np.random.default_rng(spec["seed"])
    arrays = record_model(reference, spec, gen, rng)
    if spec.get("processor"):
        arrays.update(record_processor(rng))
    np.savez(args.out / "reference.npz", **arrays)
    print(f"{args.out}: {len(arrays)} arrays, logits1 max {np.abs(arrays['logits1']).max():.2f}")


if __name__ == "__main__":
    main()
