"""``python -m mlx_dgemma.train``."""

import sys

from .cli import main

sys.exit(main())
