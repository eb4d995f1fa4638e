"""A drafter folder: ``config.json`` (the drafter's shape and the target it was trained for),
``drafter.safetensors`` (its weights only: the target's embedding and LM head are shared, not stored) and, optionally,
``shortlist.safetensors`` (its draft vocabulary: ``mlx_dgemma.drafter.head``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_dgemma.drafter.head import Shortlist, read_shortlist
from mlx_dgemma.drafter.model import Drafter, DrafterArgs
from mlx_dgemma.errors import DrafterError
from mlx_dgemma.model.arrays import flatten, load_safetensors
from mlx_dgemma.train.checkpoint import write_folder

CONFIG_FILE, WEIGHTS_FILE = "config.json", "drafter.safetensors"
MODEL_TYPE = "mlx_dgemma_drafter"


def target_identity(model: Any) -> dict[str, Any]:
    """What a drafter depends on in its target: vocabulary, hidden size, canvas, and a hash of the whole shape."""
    a = model.args
    shape = json.dumps(asdict(a), sort_keys=True, default=str)
    return {
        "vocab_size": a.vocab_size,
        "hidden_size": a.hidden_size,
        "canvas_length": a.canvas_length,
        "num_hidden_layers": a.num_hidden_layers,
        "config_hash": hashlib.sha256(shape.encode()).hexdigest()[:16],
    }


def save_drafter(drafter: Drafter, model: Any, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``folder`` atomically: training's folder writer (a temporary sibling, fsync-ed, renamed into place)."""
    weights = dict(flatten(drafter.parameters()))
    config = {
        "model_type": MODEL_TYPE,
        "drafter": drafter.args.to_dict(),
        "target": target_identity(model),
        **(extra or {}),
    }
    write_folder(
        folder,
        {
            WEIGHTS_FILE: lambda p: mx.save_safetensors(str(p), weights),
            CONFIG_FILE: lambda p: p.write_text(json.dumps(config, indent=2) + "\n"),
        },
    )


def read_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder).expanduser()
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise DrafterError(
            f"no drafter in {folder}: {CONFIG_FILE} is missing (train one with "
            "mlx_dgemma.drafter.train, or use --drafter none|lookup)"
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise DrafterError(f"{file} is not valid JSON ({e.msg}): retrain or re-copy the drafter") from None
    if config.get("model_type") != MODEL_TYPE:
        raise DrafterError(f"{folder} is not an mlx_dgemma drafter (model_type {config.get('model_type')!r})")
    return config


def drafting_confidence(folder: str | Path) -> float:
    """The confidence the drafter in ``folder`` drafts at (``config.json``'s ``"propose": {"confidence": c}``,
    chosen by measuring it with its target; 0.0, every position, when it records none)."""
    value = read_config(folder).get("propose", {}).get("confidence", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise DrafterError(
            f"{Path(folder).expanduser() / CONFIG_FILE}: propose.confidence must be a number in [0, 1) "
            f"(got {value!r}): fix it, or remove it to draft every position"
        )
    return float(value)


def matches(folder: str | Path, model: Any) -> bool:
    """Whether the drafter in ``folder`` was trained for ``model``'s shape."""
    return read_config(folder).get("target") == target_identity(model)


def load_drafter(folder: str | Path, model: Any) -> Drafter:
    """The drafter in ``folder``; refuses one trained for a different target with a one-line error."""
    folder = Path(folder).expanduser()
    config = read_config(folder)
    want, have = config.get("target", {}), target_identity(model)
    for key in ("vocab_size", "hidden_size", "canvas_length", "num_hidden_layers", "config_hash"):
        if want.get(key) != have[key]:
            raise DrafterError(
                f"the drafter in {folder} was trained for another target ({key} {want.get(key)}, "
                f"this model has {have[key]}): train one for this model with mlx_dgemma.drafter.train"
            )
    drafter = Drafter(DrafterArgs.from_dict(config["drafter"]))
    try:
        weights = load_safetensors(folder / WEIGHTS_FILE)
    except (OSError, RuntimeError, ValueError) as e:
        raise DrafterError(
            f"cannot read {folder / WEIGHTS_FILE} ({e}): retrain or re-copy the drafter"
        ) from None
    try:
        drafter.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise DrafterError(f"{folder / WEIGHTS_FILE} does not fit its config.json ({e})") from None
    drafter.eval()
    mx.eval(drafter.parameters())
    return drafter


def load_shortlist(folder: str | Path, model: Any) -> Shortlist | None:
    """The draft vocabulary shortlist in ``folder`` (None: the drafter drafts over the whole vocabulary)."""
    return read_shortlist(folder, model.args.vocab_size)
