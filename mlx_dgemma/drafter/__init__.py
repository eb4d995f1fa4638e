"""Speculative canvas proposal for DiffusionGemma (imported as ``mlx_dgemma.drafter``).

A proposer guesses each canvas; the target verifies it with its own sampler and commit rule
(``mlx_dgemma.decoding.verify``). ``make_proposer("auto" | "none" | "lookup" | PATH, model)`` picks one.
"""

from mlx_dgemma.drafter.checkpoint import DrafterError, load_drafter, save_drafter, target_identity
from mlx_dgemma.drafter.model import Drafter, DrafterArgs
from mlx_dgemma.drafter.propose import (
    DrafterProposer,
    LookupProposer,
    NoiseProposer,
    bundled_drafter,
    make_proposer,
)

__all__ = [
    "Drafter",
    "DrafterArgs",
    "DrafterError",
    "DrafterProposer",
    "LookupProposer",
    "NoiseProposer",
    "bundled_drafter",
    "load_drafter",
    "make_proposer",
    "save_drafter",
    "target_identity",
]
