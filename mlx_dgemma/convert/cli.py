"""``mlx_dgemma.convert``: the command line (flags in the style of ``mlx_lm.convert``)."""

from __future__ import annotations

import argparse
import re
import signal
from pathlib import Path
from types import FrameType

from mlx_dgemma.cli.shared import run_cli
from mlx_dgemma.convert.api import convert
from mlx_dgemma.convert.lmstudio import DEFAULT_PUBLISHER, LMSTUDIO_NOTE, lmstudio_target
from mlx_dgemma.convert.plan import DTYPES
from mlx_dgemma.convert.recipes import RECIPES, Recipe
from mlx_dgemma.errors import ConvertError

DESCRIPTION = """Convert a DiffusionGemma checkpoint (the original Hugging Face one, or an unquantized MLX one) into
an MLX folder in the mlx-community layout, optionally quantized. Tensors are streamed one at a time, so memory
stays near the largest tensor; the folder appears complete or not at all."""

EPILOG = """examples:
  mlx_dgemma.convert --hf-path google/diffusiongemma-26B-A4B-it -q                 # mixed 4-bit, ./<name>-MLX-4bit
  mlx_dgemma.convert --hf-path ./ckpt --mlx-path ./ckpt-8bit -q --q-bits 8
  mlx_dgemma.convert --hf-path ./ckpt -q --lmstudio --publisher me               # into LM Studio's models folder
  mlx_dgemma.convert --hf-path ./ckpt --adapter-path ./adapters -q               # fine-tuned, then quantized"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5e9 bytes, ``"512MiB"``, ``"100000"`` (bytes)."""
    match = _SIZE.match(text)
    if not match:
        raise ConvertError(f"invalid size {text!r}: write it like 5GB, 500MB or 2GiB")
    unit = (match.group(2) or "").upper().removesuffix("B")
    return int(float(match.group(1)) * _UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_dgemma.convert",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--hf-path", "--model", required=True, help="source: a checkpoint folder or a Hugging Face repo id"
    )
    p.add_argument(
        "--mlx-path",
        help="output folder (default: ./<source name>-MLX-<weights>); with --lmstudio, "
        "the model's folder name",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="dtype of unquantized tensors, scales and biases (default: the checkpoint's)",
    )
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, help="bits per weight: 2, 3, 4, 5, 6 or 8 (default 4)")
    p.add_argument("--q-group-size", type=int, help="quantization group size: 32, 64 or 128 (default 64)")
    p.add_argument(
        "--q-recipe",
        choices=RECIPES,
        help="mixed (default): experts and self-conditioning at "
        "--q-bits, embedding, attention, router and dense MLP at 8 bits (the mlx-community recipe); "
        "uniform: everything at --q-bits",
    )
    p.add_argument(
        "--adapter-path",
        help="fine-tuned adapters from mlx_dgemma.train to fuse into the weights "
        "first (the output is then text-only)",
    )
    p.add_argument(
        "--drop-vision",
        action="store_true",
        help="leave the vision tower out (text only; mlx_dgemma never uses it, mlx-vlm and LM Studio can)",
    )
    p.add_argument(
        "--shard-size",
        default="5GiB",
        help="maximum size of a weight file, e.g. 2GB or 500MiB (default 5GiB, as mlx-lm)",
    )
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument(
        "--lmstudio", action="store_true", help="write into LM Studio's models folder, as <publisher>/<name>"
    )
    p.add_argument(
        "--publisher",
        default=DEFAULT_PUBLISHER,
        help=f"LM Studio publisher folder (default {DEFAULT_PUBLISHER!r})",
    )
    p.add_argument(
        "--lmstudio-dir",
        help="LM Studio's models folder (default: $LMSTUDIO_HOME/models, else ~/.lmstudio/models)",
    )
    return p


def default_name(hf_path: str, args: argparse.Namespace) -> str:
    """``<source name>-MLX-<weights>``, e.g. ``diffusiongemma-26B-A4B-it-MLX-4bit``."""
    path = Path(hf_path).expanduser()
    stem = path.resolve().name if path.is_dir() else hf_path.rstrip("/").rsplit("/", 1)[-1]
    if args.quantize:
        label = Recipe(args.q_recipe or "mixed", _or(args.q_bits, 4), _or(args.q_group_size, 64)).label
    else:
        label = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(args.dtype or "", "")
    return f"{stem}-MLX-{label}" if label else f"{stem}-MLX"


def output_path(args: argparse.Namespace) -> Path:
    if args.lmstudio:
        name = Path(args.mlx_path).name if args.mlx_path else default_name(args.hf_path, args)
        return lmstudio_target(name, args.publisher, args.lmstudio_dir)
    return Path(args.mlx_path) if args.mlx_path else Path(default_name(args.hf_path, args))


def check_flags(args: argparse.Namespace) -> None:
    given = [
        flag
        for flag, value in (
            ("--q-bits", args.q_bits),
            ("--q-group-size", args.q_group_size),
            ("--q-recipe", args.q_recipe),
        )
        if value is not None
    ]
    if given and not args.quantize:
        raise ConvertError(f"{', '.join(given)} only apply when quantizing: add -q")
    if not args.lmstudio and (args.lmstudio_dir or args.publisher != DEFAULT_PUBLISHER):
        raise ConvertError("--publisher and --lmstudio-dir only apply with --lmstudio")


def run(args: argparse.Namespace) -> int:
    check_flags(args)
    result = convert(
        args.hf_path,
        output_path(args),
        dtype=args.dtype,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        q_recipe=args.q_recipe or "mixed",
        adapter_path=args.adapter_path,
        drop_vision=args.drop_vision,
        shard_size=parse_size(args.shard_size),
        force=args.force,
        card_extra=LMSTUDIO_NOTE if args.lmstudio else "",
    )
    print(result.summary())
    return 0


def _or(value: int | None, default: int) -> int:
    """The flag's value when given (0 included: the recipe refuses it), else the default."""
    return default if value is None else value


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through the staging folder's cleanup


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    return run_cli(lambda: run(args), interrupted="interrupted: no output folder was written")
