"""``python -m mlx_dgemma.server``."""

from . import main

main()
