"""The converter's one-line errors."""

from __future__ import annotations

from mlx_dgemma.errors import DGemmaError


class ConvertError(DGemmaError, ValueError):
    """A conversion that cannot be done as asked: bad options, target folder, disk space. Nothing is written."""
