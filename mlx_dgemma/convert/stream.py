"""Write the planned shards, one source tensor at a time, in memory bounded by the largest tensor.

Each shard's safetensors header is written first (every size is known from the plan), then each tensor is
read from its memory-mapped source, cast and quantized, evaluated, appended to the file and released. No
shard is ever held in memory, so peak memory is about one source tensor and its outputs, whatever the
shard size.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import mlx.core as mx
import numpy as np

from mlx_dgemma.convert.plan import Job, Plan, Tensor
from mlx_dgemma.convert.quantize import transform
from mlx_dgemma.model.arrays import load_safetensors

INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.int8: "I8",
    mx.uint16: "U16",
    mx.int16: "I16",
    mx.uint32: "U32",
    mx.int32: "I32",
    mx.uint64: "U64",
    mx.int64: "I64",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.float32: "F32",
    mx.float64: "F64",
}
Advance = Callable[[int, int], None]


def shard_names(count: int) -> list[str]:
    """``model-00001-of-0000N.safetensors``, or ``model.safetensors`` for a single shard: as mlx-lm's
    ``save_model`` (and mlx-vlm) name them. The index is written either way, as mlx-lm writes it."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class SourceReader:
    """Source tensors on demand: one file open (lazily) at a time, each tensor handed out once and forgotten."""

    def __init__(self) -> None:
        self._file: Path | None = None
        self._tensors: dict[str, mx.array] = {}

    def take(self, job: Job) -> mx.array:
        if job.file != self._file:
            self._tensors = load_safetensors(job.file)
            self._file = job.file
        # Popping drops the reader's reference: once written, the tensor's memory is freed.
        return self._tensors.pop(job.key)


def write_weights(plan: Plan, folder: Path, advance: Advance | None = None) -> dict:
    """Write every shard of ``plan`` and the index into ``folder``; returns the index."""
    reader = SourceReader()
    weight_map = {}
    for name, jobs in zip(shard_names(len(plan.shards)), plan.shards):
        write_shard(folder / name, jobs, reader, advance)
        mx.clear_cache()
        weight_map.update({t.name: name for job in jobs for t in job.outputs})
    index = {"metadata": {"total_size": plan.nbytes}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=4) + "\n")
    return index


def write_shard(path: Path, jobs: list[Job], reader: SourceReader, advance: Advance | None = None) -> None:
    """Write one shard: its header, then each job's tensors as they are computed."""
    with open(path, "wb") as f:
        write_bytes(f, safetensors_header([t for job in jobs for t in job.outputs]))
        for job in jobs:
            arrays = transform(reader.take(job), job)
            mx.eval(arrays)
            for planned, array in zip(job.outputs, arrays, strict=True):
                _write_array(f, planned, array)
            del arrays
            if advance is not None:
                advance(len(job.outputs), job.nbytes)


def safetensors_header(tensors: list[Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Length-prefixed JSON header for ``tensors`` laid out back to back, padded to 8 bytes as the spec allows."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "mlx"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


def _write_array(f: BinaryIO, planned: Tensor, array: mx.array) -> None:
    if tuple(array.shape) != planned.shape or array.dtype != planned.dtype:
        raise RuntimeError(  # a bug in the planner, never a user error
            f"{planned.name}: computed {array.dtype}{tuple(array.shape)}, planned {planned.dtype}{planned.shape}"
        )
    if array.dtype == mx.bfloat16:  # numpy has no bfloat16: write the same bits as uint16
        array = array.view(mx.uint16)
    write_bytes(f, np.ascontiguousarray(array).data)  # a view of MLX's buffer, not a copy


def write_bytes(f: BinaryIO, data: bytes | memoryview) -> None:
    """All file writes go through here (one place to watch for a full disk)."""
    f.write(data)
