"""User-facing errors: one line that names the problem and the fix."""


class DGemmaError(Exception):
    """Base class of every error mlx_dgemma raises on bad input."""


class CheckpointError(DGemmaError, ValueError):
    """A model folder, config or weight file that cannot be loaded."""


class GenerationError(DGemmaError, ValueError):
    """A generation request that cannot be served as asked (empty prompt, too long, unsupported option)."""
