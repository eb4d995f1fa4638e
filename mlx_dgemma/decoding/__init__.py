"""Decoding: the one canvas loop (``canvas``), its steppers (``steppers``; fast mode's is ``mlx_dgemma.decoding.fast``) and
its hooks (``hooks``)."""
