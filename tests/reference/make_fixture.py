"""Build a tiny random DiffusionGemma checkpoint with the reference and record its outputs.

Pure torch + the reference (``transformers==5.23.0``): this script must never import mlx or mlx_dgemma,
so what it records does not depend on the port under test.

    python tests/reference/make_fixture.py --spec '{"text": {...}, "canvas_length": 8, ...}' --out DIR

Spec keys: ``text`` (DiffusionGemmaTextConfig overrides, ``global_head_dim`` and
``num_global_key_value_heads`` included), ``canvas_length``, ``seed``, ``prompt_len``,
``batch_prompt_lens`` (two ints) and ``dtype`` ("float32" or "float64": the dtype the reference runs in;
the weights are drawn and saved in float32 either way, so both dtypes describe the same checkpoint).

Writes:
  DIR/hf/            ``save_pretrained`` layout (one safetensors file, ``per_layer_config`` in config.json)
  DIR/hf_released/   the released checkpoint's layout: sharded, ``global_head_dim`` /
                     ``num_global_key_value_heads`` in config.json instead of ``per_layer_config``
  DIR/reference.npz  reference outputs (float32; token ids and masks int32), see ``run_single``/``run_batch``
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig
from transformers.cache_utils import DynamicCache
from transformers.models.diffusion_gemma.modeling_diffusion_gemma import (
    DiffusionGemmaRMSNorm,
    DiffusionGemmaTextExperts,
    DiffusionGemmaTextRouter,
)
from transformers.models.gemma4 import Gemma4VisionConfig
from transformers.utils import logging as hf_logging

Model = DiffusionGemmaForBlockDiffusion

SPECIAL_TOKENS = {"pad_token_id": 0, "eos_token_id": [1, 3], "bos_token_id": 2}
# Random ids are drawn from [FIRST_FREE_ID, vocab - FIRST_FREE_ID): clear of the special ids above and of
# boi / eoi / image, which take the last three ids.
FIRST_FREE_ID = 4
# Embedding std = gain / sqrt(hidden), so logits (tied lm_head) have std ~ gain: far below the soft-cap 30.
EMBED_GAIN = 3.0
# The router scales its input by hidden**-0.5, so unit-std projections give O(1) expert scores.
ROUTER_STD = 1.0
SC_LOGITS_STD = 3.0
# Keeps the vision tower tiny: the checkpoint must contain it, the text path never runs it.
TINY_VISION = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "patch_size": 4,
    "pooling_kernel_size": 2,
    "position_embedding_size": 64,
}


def build_config(spec: dict) -> DiffusionGemmaConfig:
    # global_head_dim / num_global_key_value_heads go in as kwargs: __post_init__ turns them into per_layer_config.
    text = DiffusionGemmaTextConfig(**{**SPECIAL_TOKENS, **spec["text"]})
    vocab = text.vocab_size
    return DiffusionGemmaConfig(
        text_config=text,
        vision_config=Gemma4VisionConfig(**TINY_VISION),
        boi_token_id=vocab - 3,
        eoi_token_id=vocab - 2,
        image_token_id=vocab - 1,
        canvas_length=spec["canvas_length"],
    )


def uniform_(tensor: torch.Tensor, gen: torch.Generator, scale: float = 1.0) -> None:
    """U(0.5, 1.5) * scale: random, but around the trained-model magnitude of norms and scales."""
    tensor.copy_((torch.rand(tensor.shape, generator=gen) + 0.5) * scale)


def normal_(tensor: torch.Tensor, gen: torch.Generator, std: float) -> None:
    tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)


@torch.no_grad()
def randomise_(model: Model, gen: torch.Generator) -> None:
    """Moves every text weight away from its trivial init (norms at 1, scales at 1, ...), in place.

    The decoder owns every shared weight; the encoder's are the same Parameter objects, and in-place
    writes keep it that way. Vision weights keep their (seeded) default init.
    """
    decoder = model.model.decoder
    for name, module in decoder.named_modules():
        if isinstance(module, DiffusionGemmaRMSNorm) and module.with_scale:
            # Attention scaling is 1.0: q/k norms near head_dim**-0.25 keep the scores O(1), not O(head_dim).
            is_qk = name.endswith(("q_norm", "k_norm"))
            uniform_(module.weight, gen, module.weight.numel() ** -0.25 if is_qk else 1.0)
        elif isinstance(module, DiffusionGemmaTextRouter):
            uniform_(module.scale, gen)
            uniform_(module.per_expert_scale, gen)
        elif isinstance(module, DiffusionGemmaTextExperts):
            normal_(module.gate_up_proj, gen, module.hidden_dim**-0.5)
            normal_(module.down_proj, gen, module.intermediate_dim**-0.5)
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, gen, EMBED_GAIN * module.embedding_dim**-0.5)
        elif isinstance(module, nn.Linear):
            std = ROUTER_STD if name.endswith("router.proj") else module.in_features**-0.5
            normal_(module.weight, gen, std)
    # layer_scalar is a buffer, not tied: each side has its own, and they must differ to catch mix-ups.
    for layers in (decoder.layers, model.model.encoder.language_model.layers):
        for layer in layers:
            uniform_(layer.layer_scalar, gen)


def build_model(spec: dict) -> Model:
    torch.manual_seed(spec["seed"])  # the default init (vision tower) draws from the global generator
    model = Model(build_config(spec)).eval()
    randomise_(model, torch.Generator().manual_seed(spec["seed"]))
    # generate() reads the special ids from the generation config, as in a released checkpoint.
    for key, value in SPECIAL_TOKENS.items():
        setattr(model.generation_config, key, value)
    return model


def write_released_config(path: Path) -> None:
    """Rewrites config.json the way the released checkpoint names the full-attention overrides."""
    config = json.loads(path.read_text())
    text = config["text_config"]
    overrides = list(text.pop("per_layer_config").values())
    if any(override != overrides[0] for override in overrides):
        raise ValueError(f"full-attention layers differ, no released form for {overrides}")
    text["global_head_dim"] = overrides[0]["head_dim"]
    if "num_key_value_heads" in overrides[0]:
        text["num_global_key_value_heads"] = overrides[0]["num_key_value_heads"]
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_checkpoints(model: Model, out: Path) -> tuple[Path, Path]:
    hf, released = out / "hf", out / "hf_released"
    for path in (hf, released):
        shutil.rmtree(path, ignore_errors=True)  # stale shards from an earlier run would confuse loaders
    model.save_pretrained(hf)
    # A third of the single-file size forces at least two shards, as in the released checkpoint.
    model.save_pretrained(released, max_shard_size=(hf / "model.safetensors").stat().st_size // 3)
    write_released_config(released / "config.json")
    shards = json.loads((released / "model.safetensors.index.json").read_text())["weight_map"].values()
    if len(set(shards)) < 2:
        raise RuntimeError(f"expected a sharded checkpoint in {released}")
    return hf, released


def text_config_dict(model: Model) -> dict:
    config = model.config.text_config.to_dict()
    config.pop("dtype")  # set by from_pretrained only
    return config


def check_reload(model: Model, path: Path) -> None:
    """The saved checkpoint must reload to the same config and the same weights, ties and buffers included."""
    loaded = Model.from_pretrained(path, dtype=torch.float32)
    if text_config_dict(loaded) != text_config_dict(model):
        raise RuntimeError(f"{path}: text config does not round-trip")
    expected, got = model.state_dict(), loaded.state_dict()
    if expected.keys() != got.keys():
        raise RuntimeError(f"{path}: state dict keys differ: {sorted(expected.keys() ^ got.keys())[:5]}")
    differ = [key for key in expected if not torch.equal(expected[key], got[key])]
    if differ:
        raise RuntimeError(f"{path}: weights differ after reload: {differ[:5]}")


def load_reference(path: Path, dtype: torch.dtype) -> Model:
    # The grouped-mm experts path rejects float64; the eager one is the plain per-expert loop.
    experts = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    return Model.from_pretrained(path, dtype=dtype, **experts).eval()


def random_ids(gen: torch.Generator, shape: tuple[int, ...], vocab: int) -> torch.Tensor:
    return torch.randint(FIRST_FREE_ID, vocab - FIRST_FREE_ID, shape, generator=gen)


def random_sc_logits(gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * SC_LOGITS_STD


def encode(
    model: Model, ids: torch.Tensor, cache: DynamicCache, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Encoder pass: writes `ids` into the cache, positions continuing after what it holds."""
    out = model.model.encoder(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return out.last_hidden_state


def decode(
    model: Model,
    canvas: torch.Tensor,
    cache: DynamicCache,
    sc_logits: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decoder pass over a canvas; it must only read the cache."""
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    logits = model(
        decoder_input_ids=canvas,
        past_key_values=cache,
        self_conditioning_logits=sc_logits,
        decoder_attention_mask=mask,
    ).logits
    for (keys, values), layer in zip(before, cache.layers):
        if not (torch.equal(keys, layer.keys) and torch.equal(values, layer.values)):
            raise RuntimeError("the decoder modified the KV cache")
    return logits


def cache_arrays(cache: DynamicCache, prefix: str) -> dict[str, torch.Tensor]:
    """What each layer stores: sliding layers keep only their last sliding_window - 1 positions."""
    arrays = {}
    for i, layer in enumerate(cache.layers):
        arrays[f"{prefix}_k_{i}"] = layer.keys
        arrays[f"{prefix}_v_{i}"] = layer.values
    return arrays


def new_cache(model: Model) -> DynamicCache:
    # As generate() builds it: the config gives sliding layers their window.
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def run_single(model: Model, spec: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Batch 1: prefill (A), denoise without / with self-conditioning (B), commit + second canvas (C)."""
    vocab, canvas_len = model.config.text_config.vocab_size, spec["canvas_length"]
    out = {"prompt": random_ids(gen, (1, spec["prompt_len"]), vocab)}
    cache = new_cache(model)
    out["prefill_hidden"] = encode(model, out["prompt"], cache)
    out.update(cache_arrays(cache, "prefill"))

    out["canvas1"] = random_ids(gen, (1, canvas_len), vocab)
    out["sc_logits"] = random_sc_logits(gen, (1, canvas_len, vocab))
    out["logits_nosc"] = decode(model, out["canvas1"], cache)
    out["logits_sc"] = decode(model, out["canvas1"], cache, out["sc_logits"])

    out["commit1"] = random_ids(gen, (1, canvas_len), vocab)
    encode(model, out["commit1"], cache)
    out.update(cache_arrays(cache, "commit"))
    out["canvas2"] = random_ids(gen, (1, canvas_len), vocab)
    out["sc_logits2"] = random_sc_logits(gen, (1, canvas_len, vocab))
    out["logits_second"] = decode(model, out["canvas2"], cache, out["sc_logits2"])
    return out


def left_padded_prompts(gen: torch.Generator, lengths: list[int], vocab: int) -> tuple[torch.Tensor, ...]:
    width = max(lengths)
    prompt = torch.full((len(lengths), width), SPECIAL_TOKENS["pad_token_id"], dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for row, length in enumerate(lengths):
        prompt[row, width - length :] = random_ids(gen, (length,), vocab)
        mask[row, width - length :] = True
    return prompt, mask


def run_batch(model: Model, spec: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Batch 2 with left padding (D), as generate() does it: positions are one shared arange for all rows,
    padding only masks. The masks grow by one canvas of ones per committed canvas."""
    vocab, canvas_len = model.config.text_config.vocab_size, spec["canvas_length"]
    prompt, mask = left_padded_prompts(gen, spec["batch_prompt_lens"], vocab)
    out = {"batch_prompt": prompt, "batch_mask": mask}
    canvas_ones = torch.ones((len(prompt), canvas_len), dtype=torch.bool)
    cache = new_cache(model)
    encode(model, prompt, cache, mask)

    out["batch_canvas"] = random_ids(gen, (len(prompt), canvas_len), vocab)
    out["batch_sc_logits"] = random_sc_logits(gen, (len(prompt), canvas_len, vocab))
    mask = torch.cat([mask, canvas_ones], dim=1)
    out["logits_batch"] = decode(model, out["batch_canvas"], cache, out["batch_sc_logits"], mask)

    out["batch_commit"] = random_ids(gen, (len(prompt), canvas_len), vocab)
    encode(model, out["batch_commit"], cache, mask)
    out["batch_canvas2"] = random_ids(gen, (len(prompt), canvas_len), vocab)
    mask = torch.cat([mask, canvas_ones], dim=1)
    out["logits_batch2"] = decode(model, out["batch_canvas2"], cache, mask=mask)
    return out


def run_generate(model: Model, spec: dict, gen: torch.Generator, prompts: dict) -> dict[str, torch.Tensor]:
    """generate() with a given starting canvas and one denoising step (E): its commit is the argmax of the
    first step's processed logits, so it does not depend on the random stream and must match exactly."""
    vocab, canvas_len = model.config.text_config.vocab_size, spec["canvas_length"]
    out = {"gen_start": random_ids(gen, (1, canvas_len), vocab)}
    kwargs = {"max_denoising_steps": 1, "max_new_tokens": canvas_len, "return_dict_in_generate": False}
    prompt = prompts["prompt"]
    out["gen_tokens"] = model.generate(prompt, decoder_input_ids=out["gen_start"], **kwargs)[
        :, prompt.shape[1] :
    ]
    out["gen_batch_start"] = random_ids(gen, (2, canvas_len), vocab)
    prompt, mask = prompts["batch_prompt"], prompts["batch_mask"]
    sequences = model.generate(
        prompt, attention_mask=mask, decoder_input_ids=out["gen_batch_start"], **kwargs
    )
    out["gen_batch_tokens"] = sequences[:, prompt.shape[1] :]
    return out


def to_numpy(name: str, tensor: torch.Tensor) -> np.ndarray:
    if tensor.is_floating_point():
        array = tensor.detach().to(torch.float32).numpy()
        if not np.isfinite(array).all():
            raise RuntimeError(f"reference output {name} is not finite")
        return array
    return tensor.to(torch.int32).numpy()


def record_reference(model: Model, spec: dict, path: Path) -> dict[str, np.ndarray]:
    gen = torch.Generator().manual_seed(spec["seed"] + 1)  # inputs do not reuse the weights' stream
    with torch.no_grad():
        tensors = {**run_single(model, spec, gen), **run_batch(model, spec, gen)}
        tensors.update(run_generate(model, spec, gen, tensors))
    arrays = {name: to_numpy(name, tensor) for name, tensor in tensors.items()}
    arrays["canvas_length"] = np.int32(spec["canvas_length"])
    np.savez(path, **arrays)
    return arrays


def record_bf16(path: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Scenario B's self-conditioned logits from the reference run in bfloat16: the yardstick for our bf16."""
    model = load_reference(path, torch.bfloat16)
    cache = new_cache(model)
    with torch.no_grad():
        encode(model, torch.from_numpy(arrays["prompt"]).long(), cache)
        sc_logits = torch.from_numpy(arrays["sc_logits"]).to(torch.bfloat16)  # as generate() passes them
        logits = decode(model, torch.from_numpy(arrays["canvas1"]).long(), cache, sc_logits)
    return to_numpy("logits_sc_bf16", logits)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", required=True, help="JSON fixture spec (see above)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--scenarios",
        choices=("all", "none"),
        default="all",
        help="'none' writes only the checkpoints (for benchmarks), skipping reference.npz",
    )
    args = parser.parse_args()
    hf_logging.disable_progress_bar()  # keeps the output to the one summary line
    spec = json.loads(args.spec)
    dtype = {"float32": torch.float32, "float64": torch.float64}[spec.get("dtype", "float32")]
    start = time.perf_counter()

    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(spec)
    hf, released = save_checkpoints(model, args.out)
    for path in (hf, released):
        check_reload(model, path)
    if args.scenarios == "none":
        print(f"{args.out}: checkpoints only, {time.perf_counter() - start:.1f}s")
        return

    arrays = record_reference(load_reference(hf, dtype), spec, args.out / "reference.npz")
    arrays["logits_sc_bf16"] = record_bf16(hf, arrays)
    np.savez(args.out / "reference.npz", **arrays)
    logits = arrays["logits_nosc"]
    print(
        f"{args.out}: {spec.get('dtype', 'float32')} max|logit| {np.abs(logits).max():.3f}, "
        f"logits std {logits.std():.3f}, {len(arrays)} arrays, {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
