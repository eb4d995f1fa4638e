"""``python -m mlx_dgemma.train``."""

import sys

from mlx_dgemma.train.cli import main

sys.exit(main())
