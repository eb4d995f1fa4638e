"""Where LM Studio looks for models, and what it does with a DiffusionGemma folder.

LM Studio lists every folder ``<models>/<publisher>/<model>/`` of its models directory; a folder holding
``config.json`` and ``*.safetensors`` is an MLX model, run by its MLX engine (built on mlx-lm / mlx-vlm),
which picks the architecture from ``model_type`` and reads the tokenizer files, the chat template and
``generation_config.json`` next to the weights. We keep ``model_type`` as ``diffusion_gemma`` and the
mlx-community layout, so the folder is exactly what an mlx-community download would be: LM Studio lists it,
and loads it once its MLX engine ships a DiffusionGemma implementation (mlx-vlm 0.7.10 has one); until then
it reports the model type as unsupported, and ``mlx_dgemma.generate --model <folder>`` runs it.

The home folder is found as LM Studio finds it: ``$LMSTUDIO_HOME``, else the path written in
``~/.lmstudio-home-pointer``, else ``~/.cache/lm-studio`` if it exists (older versions), else ``~/.lmstudio``.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlx_dgemma.errors import ConvertError

DEFAULT_PUBLISHER = "local"


def lmstudio_home() -> Path:
    """LM Studio's home folder (see the module docstring for the order)."""
    if os.environ.get("LMSTUDIO_HOME"):
        return Path(os.environ["LMSTUDIO_HOME"]).expanduser()
    home = Path.home()
    pointer = home / ".lmstudio-home-pointer"
    if pointer.is_file():
        pointed = pointer.read_text(encoding="utf-8").strip()
        if pointed:
            return Path(pointed).expanduser()
    legacy = home / ".cache" / "lm-studio"
    return legacy if legacy.is_dir() else home / ".lmstudio"


def lmstudio_target(
    name: str, publisher: str = DEFAULT_PUBLISHER, models_dir: str | Path | None = None
) -> Path:
    """``<models>/<publisher>/<name>``: the folder LM Studio lists as ``publisher/name``."""
    for label, part in (("publisher", publisher), ("model name", name)):
        if not part or part in (".", "..") or "/" in part or "\\" in part:
            raise ConvertError(f"invalid LM Studio {label} {part!r}: use a plain name, without slashes")
    models = Path(models_dir).expanduser() if models_dir is not None else lmstudio_home() / "models"
    return models / publisher / name


LMSTUDIO_NOTE = """## LM Studio

This folder sits in LM Studio's models directory as `publisher/model`. LM Studio lists it as an MLX model
(`model_type: diffusion_gemma`, mlx-community layout) and runs it with its MLX engine once that engine
supports DiffusionGemma (mlx-vlm 0.7.10 does); until then LM Studio reports the model type as unsupported,
and `mlx_dgemma.generate --model <this folder>` runs it."""
