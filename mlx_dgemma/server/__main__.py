"""``python -m mlx_dgemma.server``."""

from mlx_dgemma.server import main

main()
