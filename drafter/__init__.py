"""Speculative canvas proposal for DiffusionGemma (imported as ``mlx_dgemma.drafter``)."""
