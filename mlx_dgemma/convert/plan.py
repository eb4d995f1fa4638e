"""The conversion plan: every output tensor, its source, its size and its shard, known before any weight is read.

Planning reads only the safetensors headers (MLX loads lazily), so every check on the source (model type,
missing shards, missing or mis-shaped tensors, an already quantized source) happens before anything is
written, and the shard count and output size are known up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_dgemma.convert.layout import is_vision, keeps_vision, output_names
from mlx_dgemma.convert.recipes import QuantSpec, Recipe
from mlx_dgemma.errors import CheckpointError, ConvertError
from mlx_dgemma.model.arrays import load_safetensors
from mlx_dgemma.model.config import ModelArgs
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.model.loader import check_safetensors, check_tensors, read_config, weight_files

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class Tensor:
    """One tensor of the output."""

    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


@dataclass(frozen=True)
class Job:
    """One source tensor: read, cast to ``dtype``, quantized if ``quant``, written as ``outputs``."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: mx.Dtype
    quant: QuantSpec | None
    outputs: tuple[Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


@dataclass
class Plan:
    """Everything the writer needs, and what the config and model card say about it."""

    source: Path
    config: dict[str, Any]
    args: ModelArgs
    dtype: mx.Dtype | None
    recipe: Recipe | None
    keep_vision: bool
    jobs: list[Job]
    shards: list[list[Job]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    @property
    def ntensors(self) -> int:
        return sum(len(job.outputs) for job in self.jobs)

    @property
    def quantized(self) -> dict[str, QuantSpec]:
        """``{module path: spec}`` of every quantized module."""
        return {job.outputs[0].name.removesuffix(".weight"): job.quant for job in self.jobs if job.quant}

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per parameter, over every tensor written (scales and biases included)."""
        params = sum(math.prod(job.shape) for job in self.jobs)
        return 8 * self.nbytes / max(params, 1)


def build_plan(
    source: Path,
    dtype: str | None = None,
    recipe: Recipe | None = None,
    drop_vision: bool = False,
    shard_size: int = 5 << 30,
) -> Plan:
    """Read and check ``source`` (config and headers), and plan the output; raises before any write."""
    config = read_config(source)
    args = ModelArgs.from_config(config, source=str(source / "config.json"))
    _refuse_quantized(config, source)
    target_dtype = _target_dtype(dtype, config)
    arrays, files = _read_headers(source)
    keep_vision = keeps_vision(config, drop_vision)
    names = output_names(arrays, config, keep_vision)
    model = Model(args)  # lazy parameters: shapes only, nothing is allocated
    check_tensors(model, {n: arrays[k] for k, n in names.items() if not is_vision(n)}, source)
    jobs = _jobs(names, arrays, files, model, recipe, target_dtype)
    plan = Plan(source, config, args, target_dtype, recipe, keep_vision, jobs)
    plan.shards = assign_shards(jobs, shard_size)
    return plan


def _jobs(
    names: dict[str, str],
    arrays: dict[str, mx.array],
    files: dict[str, Path],
    model: Model,
    recipe: Recipe | None,
    dtype: mx.Dtype | None,
) -> list[Job]:
    """One job per output tensor, in source order (each source file is then read once, front to back)."""
    quantizable = {path for path, m in model.named_modules() if is_quantizable(m)}
    jobs = []
    for key, name in names.items():
        module = name.removesuffix(".weight")
        quant = recipe.spec_for(module, arrays[key].shape[-1]) if recipe and module in quantizable else None
        jobs.append(_job(files[key], key, name, arrays[key], dtype, quant))
    return sorted(jobs, key=lambda job: (str(job.file), job.key))


def assign_shards(jobs: list[Job], shard_size: int) -> list[list[Job]]:
    """Greedy, in order: a shard closes before the job that would take it past ``shard_size``."""
    shards: list[list[Job]] = [[]]
    size = 0
    for job in jobs:
        if shards[-1] and size + job.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(job)
        size += job.nbytes
    return shards


def _job(
    file: Path, key: str, name: str, array: mx.array, dtype: mx.Dtype | None, quant: QuantSpec | None
) -> Job:
    shape = tuple(array.shape)
    out_dtype = dtype if dtype is not None and mx.issubdtype(array.dtype, mx.floating) else array.dtype
    outputs: tuple[Tensor, ...]
    if quant is None:
        outputs = (Tensor(name, shape, out_dtype),)
    else:
        module, rows, cols = name.removesuffix(".weight"), shape[:-1], shape[-1]
        groups = (*rows, cols // quant.group_size)
        outputs = (
            Tensor(f"{module}.weight", (*rows, cols * quant.bits // 32), mx.uint32),
            Tensor(f"{module}.scales", groups, out_dtype),
            Tensor(f"{module}.biases", groups, out_dtype),
        )
    return Job(file, key, shape, out_dtype, quant, outputs)


def _read_headers(source: Path) -> tuple[dict[str, mx.array], dict[str, Path]]:
    """Every source tensor, lazily (shape and dtype only), and the file it lives in."""
    arrays: dict[str, mx.array] = {}
    files: dict[str, Path] = {}
    for file in weight_files(source):
        check_safetensors(file)
        try:
            tensors = load_safetensors(file)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{file} cannot be read ({e}): re-download it") from None
        arrays.update(tensors)
        files.update(dict.fromkeys(tensors, file))
    return arrays, files


def _refuse_quantized(config: dict[str, Any], source: Path) -> None:
    if config.get("quantization") or config.get("quantization_config"):
        raise ConvertError(
            f"{source} is already quantized (config.json has a quantization block): convert from the original "
            "unquantized checkpoint"
        )


def _target_dtype(dtype: str | None, config: dict[str, Any]) -> mx.Dtype | None:
    """The requested dtype, else the one the checkpoint declares, else None (keep each tensor's own)."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConvertError(f"unsupported dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    text = config.get("text_config") or {}
    declared = (
        config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    )
    return DTYPES.get(declared) if isinstance(declared, str) else None


def dtype_name(dtype: mx.Dtype | None) -> str | None:
    """``mx.bfloat16`` -> ``"bfloat16"``."""
    if dtype is None:
        return None
    return next((name for name, d in DTYPES.items() if d == dtype), None)


def is_quantizable(module: nn.Module) -> bool:
    """A layer MLX can swap for a quantized one (Linear, Embedding, SwitchLinear)."""
    return hasattr(module, "to_quantized")
