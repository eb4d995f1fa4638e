"""``python -m mlx_dgemma.convert``."""

import sys

from .cli import main

sys.exit(main())
