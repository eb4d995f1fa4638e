"""The one error type of the training package."""

from __future__ import annotations

from ..errors import DGemmaError


class TrainError(DGemmaError, ValueError):
    """Training input that cannot be used as given (bad data line, bad adapter folder, bad flag)."""
