"""What the code runs on: the platform (a fast BLAS on Linux), memory limits, several ranks (``mlx.distributed``) and
bounded reading of untrusted input."""
