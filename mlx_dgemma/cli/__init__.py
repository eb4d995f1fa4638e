"""Command lines that belong to no other concern: ``generate`` (and what every command shares, ``shared``).
``python -m mlx_dgemma <command>`` runs any of them (``mlx_dgemma/__main__.py``)."""
