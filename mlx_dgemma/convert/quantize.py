"""One tensor's conversion: cast to the output dtype, then quantize if the plan says so."""

from __future__ import annotations

import mlx.core as mx

from mlx_dgemma.convert.plan import Job


def transform(array: mx.array, job: Job) -> list[mx.array]:
    """The output tensors of ``job`` from its source ``array``, in ``job.outputs`` order (lazy: eval them)."""
    if array.dtype != job.dtype:
        array = array.astype(job.dtype)
    if job.quant is None:
        return [array]
    weight, scales, biases = mx.quantize(array, job.quant.group_size, job.quant.bits, mode=job.quant.mode)
    return [weight, scales, biases]
