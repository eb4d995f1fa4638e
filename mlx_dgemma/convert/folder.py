"""The non-weight files of the output folder: config.json, tokenizer and template files, the model card."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from mlx_dgemma.convert.plan import Plan, dtype_name
from mlx_dgemma.model.config import ModelArgs
from mlx_dgemma.model.image_processing import DEFAULT_BUDGET

# Tokenizer, chat template, generation and processor configs: every top-level file of these kinds.
SIDECAR_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken")
SIDECAR_PREFIXES = ("LICENSE", "NOTICE", "USE_POLICY")
NOT_COPIED = {"config.json"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def sidecar_files(source: Path) -> list[Path]:
    """The source's top-level non-weight files that belong in the output (weight indexes excluded)."""
    files = []
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in NOT_COPIED or path.name.endswith(".index.json"):
            continue
        if path.suffix in SIDECAR_SUFFIXES or path.name.startswith(SIDECAR_PREFIXES):
            files.append(path)
    return files


def drafter_files(source: Path) -> list[Path]:
    """The files of a bundled ``drafter/`` folder (``mlx_dgemma.drafter``), if the source has one."""
    folder = source / "drafter"
    if not (folder / "config.json").is_file():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file())


def copy_sidecars(source: Path, dest: Path) -> list[str]:
    """Copy :func:`sidecar_files` (following hub-cache symlinks) and a bundled ``drafter/``; warn when the
    source has no tokenizer."""
    files = sidecar_files(source)
    for path in files:
        shutil.copyfile(path, dest / path.name)
    for path in drafter_files(source):  # the model's own drafter fits its conversions too
        (dest / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        # copyfile, not copytree: an OSError (disk full) reaches the caller as itself, not as a list of them
        shutil.copyfile(path, dest / path.relative_to(source))
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        print(
            f"warning: {source} has no tokenizer (tokenizer.json or tokenizer.model): copy it into the output "
            "before generating",
            file=sys.stderr,
        )
    return [path.name for path in files]


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def processor_config(vision: dict[str, Any]) -> dict[str, Any]:
    """Gemma 4's ``processor_config.json`` for a vision config: the image processor our
    ``mlx_dgemma.model.image_processing`` reproduces (bicubic aspect-preserving resize, rescale to [0, 1], no
    normalisation, RGB), nested under ``image_processor`` as transformers 5 saves it. transformers'
    ``AutoImageProcessor`` and mlx-vlm's Gemma 4 processor (LM Studio's MLX engine) read it."""
    budget = DEFAULT_BUDGET
    image = {
        "do_convert_rgb": True,
        "do_normalize": False,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_processor_type": "Gemma4ImageProcessor",
        "image_std": [1.0, 1.0, 1.0],
        "max_soft_tokens": budget,
        "patch_size": int(vision.get("patch_size") or 16),
        "pooling_kernel_size": int(vision.get("pooling_kernel_size") or 3),
        "resample": 3,
        "rescale_factor": 1 / 255,  # 3: PIL's BICUBIC
    }
    return {"image_processor": image, "image_seq_length": budget, "processor_class": "Gemma4Processor"}


def write_processor_config(plan: Plan, dest: Path) -> bool:
    """Write :func:`processor_config` when the output keeps the vision tower and the source shipped no processor
    config (those it ships are copied as they are); returns whether it wrote one."""
    vision = plan.config.get("vision_config")
    if not plan.keep_vision or not isinstance(vision, dict):
        return False
    if any((plan.source / name).is_file() for name in PROCESSOR_FILES):
        return False
    (dest / PROCESSOR_FILES[0]).write_text(json.dumps(processor_config(vision), indent=2) + "\n")
    return True


def output_config(plan: Plan) -> dict[str, Any]:
    """The source config with the output's dtype, quantization block and vision choice."""
    config = {k: v for k, v in plan.config.items() if k != "_name_or_path"}
    config["text_config"] = released_text_config(config.get("text_config") or {}, plan.args)
    name = dtype_name(plan.dtype)
    if name is not None:
        config["dtype"] = name
        if "torch_dtype" in config:
            config["torch_dtype"] = name
    if not plan.keep_vision:
        config["vision_config"] = None  # mlx-vlm then builds no vision tower, and expects no vision weights
    if plan.recipe is not None:
        block = plan.recipe.config_block(plan.quantized)
        config["quantization"] = block
        config["quantization_config"] = dict(block)  # the name Hugging Face tooling reads
    return dict(sorted(config.items()))


def released_text_config(text: dict[str, Any], args: ModelArgs) -> dict[str, Any]:
    """The text config in the released form (``global_head_dim`` / ``num_global_key_value_heads``).

    ``save_pretrained`` writes a ``per_layer_config`` of full-attention overrides instead, which mlx-vlm does
    not read (it would build 512-wide full-attention heads). Overrides of anything else are kept as they are.
    """
    overrides = text.get("per_layer_config")
    if not overrides:
        return text
    full = {str(i) for i in range(args.num_hidden_layers) if not args.is_sliding(i)}
    plain = all(
        isinstance(v, dict) and set(v) <= {"head_dim", "num_key_value_heads"} for v in overrides.values()
    )
    if not plain or not {str(int(k)) for k in overrides if str(k).isdigit()} <= full:
        return text
    text = {k: v for k, v in text.items() if k != "per_layer_config"}
    text["global_head_dim"] = args.global_head_dim
    text["num_global_key_value_heads"] = args.num_global_key_value_heads
    return dict(sorted(text.items()))


def write_config(plan: Plan, dest: Path) -> None:
    (dest / "config.json").write_text(json.dumps(output_config(plan), indent=4) + "\n")


def model_card(plan: Plan, source_name: str, hub_id: str | None, extra: str = "") -> str:
    """A short README: source, weights recipe, size, how to load it."""
    weights = (
        plan.recipe.describe() if plan.recipe else f"unquantized {dtype_name(plan.dtype) or 'as stored'}"
    )
    vision = "kept (unquantized)" if plan.keep_vision else "dropped (text only)"
    shards = len(plan.shards)
    front = ["---", "library_name: mlx", "tags:", "- mlx", "- diffusion_gemma", "- mlx_dgemma"]
    front += [f"base_model: {hub_id}"] if hub_id else []
    front += [f"pipeline_tag: {'image-text-to-text' if plan.keep_vision else 'text-generation'}", "---", ""]
    body = f"""# {source_name} (MLX)

DiffusionGemma converted to MLX with `mlx_dgemma.convert`.

- Source: `{hub_id or source_name}`
- Weights: {weights}
- Vision tower: {vision}
- Size: {plan.nbytes / 1e9:.2f} GB in {shards} shard{"s" if shards > 1 else ""}, {plan.bits_per_weight:.2f} bits per weight
- Layout: the mlx-community / mlx-vlm one (`model.decoder.*`, `quantization` block in `config.json`)

## Use

With `mlx_dgemma` installed:

```bash
mlx_dgemma.generate --model PATH_TO_THIS_FOLDER --prompt "Why is the sky blue?"
```

```python
from mlx_dgemma import load, generate
model, tokenizer = load("PATH_TO_THIS_FOLDER")
print(generate(model, tokenizer, "Why is the sky blue?"))
```

mlx-vlm (0.7.10 or later) loads this folder too. The license is the source model's.
"""
    return "\n".join(front) + body + (f"\n{extra.strip()}\n" if extra else "")


def write_model_card(plan: Plan, dest: Path, source_name: str, hub_id: str | None, extra: str = "") -> None:
    (dest / "README.md").write_text(model_card(plan, source_name, hub_id, extra))
