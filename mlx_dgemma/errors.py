"""Every error mlx_dgemma raises on bad input, in one place: each is one line that names the problem and the fix.

Each class is also importable from the module that raises it (``mlx_dgemma.convert.ConvertError``, ...)."""

from __future__ import annotations


class DGemmaError(Exception):
    """Base class of every error mlx_dgemma raises on bad input."""


class CheckpointError(DGemmaError, ValueError):
    """A model folder, config or weight file that cannot be loaded."""


class GenerationError(DGemmaError, ValueError):
    """A generation request that cannot be served as asked (empty prompt, too long, unsupported option)."""


class TemplateTooSlow(GenerationError):
    """The chat template ran past ``RENDER_CPU_S`` seconds of CPU on a prompt."""


class SamplerConfigError(DGemmaError, ValueError):
    """An invalid sampler setting; the message is one line naming the field and the fix."""


class ConstraintError(DGemmaError, ValueError):
    """A bad schema, grammar or infill template; the message is one line naming the problem and the fix.

    ``where``: for a schema error, the path of the offending keyword inside the schema (``properties.a.pattern``).
    """

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where


class GrammarBusy(ConstraintError):
    """Every grammar-compiling slot is taken (``COMPILE_SLOTS``): the server answers 429, try again shortly."""


class AdapterError(DGemmaError, ValueError):
    """An adapter folder or LoRA setting that cannot be used (missing files, wrong model, bad rank)."""


class DrafterError(DGemmaError):
    """A drafter that cannot be used: missing, corrupt, or trained for another target."""


class DistributedError(DGemmaError):
    """The ranks cannot work together: one is unreachable, or they hold different models."""


class ConvertError(DGemmaError, ValueError):
    """A conversion that cannot be done as asked: bad options, target folder, disk space. Nothing is written."""


class TrainError(DGemmaError, ValueError):
    """Training input that cannot be used as given (bad data line, bad adapter folder, bad flag)."""
