"""``convert``: a DiffusionGemma checkpoint in, a complete MLX model folder out, or nothing at all."""

from __future__ import annotations

import errno
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_dgemma.convert.folder import (
    copy_sidecars,
    drafter_files,
    sidecar_files,
    write_config,
    write_model_card,
    write_processor_config,
)
from mlx_dgemma.convert.plan import Plan, build_plan, dtype_name
from mlx_dgemma.convert.progress import Progress, human_bytes
from mlx_dgemma.convert.recipes import Recipe
from mlx_dgemma.convert.staging import StagedFolder, check_locations, check_target, recover
from mlx_dgemma.convert.stream import write_weights
from mlx_dgemma.errors import ConvertError
from mlx_dgemma.model.loader import resolve

DEFAULT_SHARD_SIZE = 5 << 30  # 5 GiB, as mlx-lm and mlx-vlm shard
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True)
class ConvertResult:
    """What was written."""

    path: Path
    tensors: int
    nbytes: int
    shards: int
    bits_per_weight: float
    dtype: str | None
    quantization: dict[str, Any] | None
    seconds: float

    def summary(self) -> str:
        q = self.quantization
        what = f"{q['bits']}-bit (group {q['group_size']})" if q else (self.dtype or "as stored")
        return (
            f"wrote {self.path}: {self.tensors} tensors, {human_bytes(self.nbytes)} in {self.shards} shard(s), "
            f"{what}, {self.bits_per_weight:.2f} bits/weight, {self.seconds:.1f}s"
        )


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str | None = None,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_recipe: str = "mixed",
    drop_vision: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    progress: bool | None = None,
    card_extra: str = "",
) -> ConvertResult:
    """Convert the DiffusionGemma checkpoint ``hf_path`` (folder or hub id) into an MLX folder at ``mlx_path``.

    Tensors are streamed one at a time (memory: about the largest tensor). The folder appears complete, or
    not at all. ``quantize`` applies ``q_recipe`` (``"mixed"``: the mlx-community recipe; ``"uniform"``) at
    ``q_bits`` / ``q_group_size``. ``progress``: draw a bar on stderr (None: only if it is a terminal).
    Raises ``ConvertError`` / ``CheckpointError`` (one line) on bad input, before writing anything.
    """
    start = time.monotonic()
    recipe = Recipe(q_recipe, q_bits, q_group_size) if quantize else None
    if shard_size <= 0:
        raise ConvertError(f"invalid shard size {shard_size}: give a positive size such as 5GB")
    target = Path(mlx_path).expanduser().absolute()
    source = resolve(hf_path)
    check_locations(source, target)
    recover(target)  # first: a previous model that a killed --force run had moved aside goes back in place
    check_target(target, force)
    plan = build_plan(source, dtype, recipe, drop_vision, shard_size)
    copied = sidecar_files(source) + drafter_files(source)
    check_space(target, plan.nbytes + sum(p.stat().st_size for p in copied))
    bar = Progress(plan.ntensors, plan.nbytes, enabled=progress)
    staged = StagedFolder(target, force)
    try:
        with staged as folder:
            _write_folder(plan, folder, bar, str(hf_path), card_extra)
            staged.commit()
    except OSError as e:
        raise ConvertError(_os_error_message(e, target)) from None
    finally:
        bar.close()
    return ConvertResult(
        target,
        plan.ntensors,
        plan.nbytes,
        len(plan.shards),
        plan.bits_per_weight,
        dtype_name(plan.dtype),
        recipe.config_block(plan.quantized) if recipe else None,
        time.monotonic() - start,
    )


def _write_folder(plan: Plan, folder: Path, bar: Progress, hf_path: str, card_extra: str) -> None:
    write_weights(plan, folder, bar.advance)
    copy_sidecars(plan.source, folder)
    write_processor_config(plan, folder)  # mlx-vlm / LM Studio need one for a vision model
    name, hub_id = source_name(hf_path)
    write_model_card(plan, folder, name, hub_id, card_extra)
    write_config(plan, folder)  # last: a folder without it is never taken for a model


def check_space(target: Path, needed: int) -> None:
    """Refuse early when the target's file system cannot hold ``needed`` bytes."""
    folder = next((p for p in (target, *target.parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ConvertError(
            f"not enough disk space in {folder}: the output needs {human_bytes(needed)}, {human_bytes(free)} "
            "free; free some space or choose another --mlx-path"
        )


def source_name(hf_path: str) -> tuple[str, str | None]:
    """(a display name, the hub id or None) for what the user passed as the source."""
    path = Path(hf_path).expanduser()
    if path.is_dir():
        return path.resolve().name, None
    return str(hf_path).rsplit("/", 1)[-1], str(hf_path)


def _os_error_message(e: OSError, target: Path) -> str:
    if e.errno in _DISK_FULL:
        return f"disk full while writing {target}: nothing was written; free some space or choose another --mlx-path"
    where = e.filename or target
    return (
        f"cannot write {where} ({e.strerror or e}): nothing was written; check the path and its permissions"
    )
