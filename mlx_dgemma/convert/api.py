"""``convert(hf_path, mlx_path, quantize=True, ...)``: mlx-lm's ``convert`` call, onto the streaming pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlx_dgemma.convert.pipeline import DEFAULT_SHARD_SIZE, ConvertResult
from mlx_dgemma.convert.pipeline import convert as convert_folder
from mlx_dgemma.errors import ConvertError

# mlx-lm ``convert`` keywords with no counterpart here: the one line that says what to do instead.
_UNSUPPORTED = {
    "upload_repo": "upload the written folder yourself (huggingface-cli upload REPO FOLDER)",
    "revision": "download that revision first (huggingface-cli download REPO --revision REV) and pass its folder",
    "dequantize": "convert from the original (unquantized) checkpoint instead",
    "quant_predicate": "pick a q_recipe ('mixed', the mlx-community recipe, or 'uniform')",
}


def convert(
    hf_path: str | Path,
    mlx_path: str | Path = "mlx_model",
    quantize: bool = False,
    q_group_size: int | None = None,
    q_bits: int | None = None,
    q_mode: str = "affine",
    dtype: str | None = None,
    *,
    q_recipe: str = "mixed",
    adapter_path: str | Path | None = None,
    drop_vision: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
    progress: bool | None = None,
    card_extra: str = "",
    trust_remote_code: bool = False,
    **unsupported: Any,
) -> ConvertResult:
    """Convert the DiffusionGemma checkpoint ``hf_path`` (folder or hub id) into an MLX folder at ``mlx_path``,
    with mlx-lm's ``convert`` signature (``quantize``, ``q_bits`` (default 4), ``q_group_size`` (default 64),
    ``q_mode="affine"``, ``dtype``); ``from mlx_dgemma import convert; convert(repo, quantize=True)`` works.

    Beyond mlx-lm: ``q_recipe`` (``"mixed"``, the default and the mlx-community recipe, or ``"uniform"``),
    ``adapter_path`` (fine-tuned adapters of ``mlx_dgemma.train``, fused in first), ``drop_vision``,
    ``shard_size`` (bytes), ``force`` (replace ``mlx_path``), ``progress``. ``trust_remote_code`` is accepted
    (nothing remote runs). mlx-lm keywords with no counterpart raise a ``ConvertError`` saying what to use.
    Returns a ``ConvertResult``; the folder appears complete or not at all.
    """
    for name, value in unsupported.items():
        if name in _UNSUPPORTED:
            if value in (None, False):
                continue  # mlx-lm's default: nothing asked
            raise ConvertError(f"{name}= is not supported by mlx_dgemma.convert: {_UNSUPPORTED[name]}")
        raise TypeError(f"convert() got an unexpected keyword argument {name!r}")
    if q_mode != "affine":
        raise ConvertError(f"q_mode={q_mode!r} is not supported: mlx_dgemma quantizes in 'affine' mode only")
    options: dict[str, Any] = dict(
        dtype=dtype,
        quantize=quantize,
        q_bits=4 if q_bits is None else q_bits,
        q_group_size=64 if q_group_size is None else q_group_size,
        q_recipe=q_recipe,
        drop_vision=drop_vision,
        shard_size=shard_size,
        force=force,
        progress=progress,
    )
    if adapter_path is None:
        return convert_folder(hf_path, mlx_path, card_extra=card_extra, **options)
    from mlx_dgemma.convert.adapters import fused_source

    target = Path(mlx_path).expanduser().absolute()
    with fused_source(hf_path, adapter_path, target) as fused:
        note = f"\nFine-tuned: the adapters in `{adapter_path}` are fused in.\n"
        return convert_folder(fused, mlx_path, card_extra=note + card_extra, **options)
