"""Checkpoint conversion for DiffusionGemma (imported as ``mlx_dgemma.convert``)."""
