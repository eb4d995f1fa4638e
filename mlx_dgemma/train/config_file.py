"""``-c/--config config.yaml``: mlx-lm lora's YAML config file, mapped onto ``mlx_dgemma.train``'s flags.

Keys are mlx-lm's (``learning_rate``, ``adapter_path``, ``num_layers``, ``lora_parameters``, ...) or this
command's own flag names with underscores (``lora_targets``, ``encoder_loss_weight``, ...). Flags given on the
command line override the file, as in mlx-lm. A key neither knows is a one-line error, as is a value of the
wrong type.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mlx_dgemma.errors import TrainError

# mlx-lm's key -> our flag's dest
RENAMED = {
    "adapter_path": "out",
    "learning_rate": "lr",
    "num_layers": "lora_layers",
    "grad_accumulation_steps": "grad_accum",
    "steps_per_report": "report_every",
    "steps_per_eval": "val_every",
}
# mlx-lm keys that do not change what this trainer does (accepted, ignored)
IGNORED = {"config", "max_seq_length", "trust_remote_code", "clear_cache_threshold"}
# mlx-lm keys with no equivalent: refused unless left empty
UNSUPPORTED = {
    "resume_adapter_file": "use --resume with the same --out",
    "report_to": "not supported",
    "project_name": "not supported",
    "hf_dataset": "give --data a local folder",
}
LORA_KEYS = {"rank", "alpha", "scale", "dropout"}


def read_config_file(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``{dest: value}`` defaults for ``parser`` from the YAML file at ``path``; raises :class:`TrainError`."""
    import yaml  # pyyaml, as mlx-lm reads its config

    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TrainError(f"cannot read the config file {path} ({e.strerror or e})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TrainError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainError(f"{path} must hold a mapping of options (key: value), not a {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        for dest, v in _entries(str(key), value, path):
            if dest not in actions:
                raise TrainError(f"{path}: unknown key {key!r}; see mlx_dgemma.train --help for the options")
            defaults[dest] = _convert(actions[dest], v, str(key), path)
    return defaults


def _entries(key: str, value: Any, path: Path) -> list[tuple[str, Any]]:
    """The (dest, value) pairs one key of the file stands for."""
    if key in IGNORED:
        return []
    if key in UNSUPPORTED:
        if value in (None, "", False):
            return []
        raise TrainError(f"{path}: {key} is not supported by mlx_dgemma.train ({UNSUPPORTED[key]})")
    if key == "lora_parameters":
        return _lora_parameters(value, path)
    if key == "optimizer_config":
        return _optimizer_config(value, path)
    if key == "lr_schedule":
        return _lr_schedule(value, path)
    if key == "num_layers" and value == -1:
        return [("lora_layers", "all")]
    return [(RENAMED.get(key, key), value)]


def _lora_parameters(value: Any, path: Path) -> list[tuple[str, Any]]:
    if not isinstance(value, dict):
        raise TrainError(f"{path}: lora_parameters must be a mapping (rank, scale or alpha, dropout)")
    if value.get("keys"):
        raise TrainError(
            f"{path}: lora_parameters.keys is not supported: choose modules with lora_targets "
            "(attn, mlp, experts, self_conditioning)"
        )
    unknown = sorted(set(value) - LORA_KEYS - {"keys"})
    if unknown:
        raise TrainError(
            f"{path}: unknown key lora_parameters.{unknown[0]}; use rank, scale or alpha, dropout"
        )
    out = [(k, value[k]) for k in ("rank", "dropout", "alpha") if k in value]
    if "scale" in value and "alpha" not in value:  # mlx-lm gives the scale; ours is alpha / rank
        scale, rank = value["scale"], value.get("rank", 8)
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (scale, rank)):
            raise TrainError(f"{path}: lora_parameters.scale and rank must be numbers")
        out.append(("alpha", float(scale) * rank))
    return out


def _optimizer_config(value: Any, path: Path) -> list[tuple[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) or v is None for v in value.values()):
        raise TrainError(f"{path}: optimizer_config must map optimizer names to their settings")
    out = []
    for name, settings in value.items():
        for k, v in (settings or {}).items():
            if k != "weight_decay":
                raise TrainError(f"{path}: optimizer_config.{name}.{k} is not supported (only weight_decay)")
            out.append(("weight_decay", v))
    return out


def _lr_schedule(value: Any, path: Path) -> list[tuple[str, Any]]:
    if value is None or isinstance(value, str):
        return [] if value is None else [("lr_schedule", value)]
    if isinstance(value, dict) and value.get("name") == "cosine_decay":  # mlx-lm's form
        return [("lr_schedule", "cosine"), *([("warmup", value["warmup"])] if "warmup" in value else [])]
    raise TrainError(f"{path}: lr_schedule must be constant or cosine (or mlx-lm's {{name: cosine_decay}})")


def _convert(action: argparse.Action, value: Any, key: str, path: Path) -> Any:
    """``value`` as the flag would take it: the flag's type and choices, or a boolean for a switch."""
    if action.nargs == 0:  # a switch (store_true, or --lora/--full's store_const)
        if isinstance(action.const, bool):
            if not isinstance(value, bool):
                raise TrainError(f"{path}: {key} must be true or false (got {value!r})")
            return value == action.const if action.const else not value
        value = str(value)
        if value != action.const:
            raise TrainError(f"{path}: {key} must be {action.const!r} (got {value!r})")
        return value
    if isinstance(value, (dict, list, bool)) or value is None:
        raise TrainError(f"{path}: {key} must be a single value (got {value!r})")
    try:
        converted = action.type(str(value)) if callable(action.type) else str(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kind = getattr(action.type, "__name__", "value")
        raise TrainError(
            f"{path}: {key} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind} (got {value!r})"
        ) from None
    if action.choices is not None and converted not in action.choices:
        raise TrainError(
            f"{path}: {key} must be one of {', '.join(map(str, action.choices))} (got {value!r})"
        )
    return converted
