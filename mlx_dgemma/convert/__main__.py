"""``python -m mlx_dgemma.convert``."""

import sys

from mlx_dgemma.convert.cli import main

sys.exit(main())
