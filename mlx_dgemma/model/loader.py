"""Find a checkpoint (folder, hub id or hub cache), check it, and load it lazily into a ``Model``.

Every problem a user can cause is reported as a one-line ``CheckpointError`` before any heavy work:
weights are memory-mapped, so nothing is read until it is first used.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Literal, overload

import mlx.core as mx
import mlx.nn as nn

from mlx_dgemma.errors import CheckpointError
from mlx_dgemma.model.arrays import flatten, load_safetensors
from mlx_dgemma.model.config import ModelArgs, check_vision
from mlx_dgemma.model.diffusion_gemma import Model
from mlx_dgemma.model.vision import VisionArgs, has_vision_weights
from mlx_dgemma.runtime.bounded import MAX_CHECKPOINT_FILE_BYTES, MiB, check_regular, parse_json, read_text
from mlx_dgemma.runtime.distributed import launched_group

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "default_model"

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.md"]

SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on a file's JSON header
# The checkpoint's small JSON files that mlx_dgemma parses itself (config, generation config, weight index).
MAX_CONFIG_BYTES = 64 * MiB
# Files of a checkpoint that the tokenizer libraries open: each must be a regular file (a FIFO would block them
# forever, a device would never end) of at most MAX_CHECKPOINT_FILE_BYTES.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def resolve(path_or_repo: str | Path) -> Path:
    """A local folder for ``path_or_repo``: the folder itself, or the hub cache (downloading if allowed)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    repo = str(path_or_repo)
    if path.exists() or repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise CheckpointError(
            f"model folder not found: {path_or_repo} (give a folder or a Hugging Face repo id)"
        )
    from huggingface_hub import snapshot_download

    try:  # the hub cache first: works offline and costs no request
        return Path(snapshot_download(repo, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        raise CheckpointError(
            f"cannot get {repo} from the Hugging Face hub ({type(e).__name__}) and it is not in the hub cache: "
            "check the repo id and your network, or pass a local folder"
        ) from None


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder, as a dict."""
    if not os.path.lexists(folder / "config.json"):
        raise CheckpointError(f"no config.json in {folder}: point at a DiffusionGemma checkpoint folder")
    return _read_json(folder / "config.json")


def check_chat_template(tokenizer: Any, folder: Path) -> None:
    """Raise one line naming the template file if the checkpoint's chat template does not compile, or does not
    render a one-message conversation within bounds (``chat_template.PROBE_CPU_S`` seconds of CPU,
    ``PROBE_MEMORY_BYTES``), checked in a short-lived sandboxed process (``mlx_dgemma.prompt.chat_template``).

    Errors a template raises on purpose for some input (``raise_exception``) surface later, per request, from
    ``encode_prompt``.
    """
    from mlx_dgemma.prompt.chat_template import PROBE_CPU_S, PROBE_MEMORY_BYTES, probe

    templates = getattr(tokenizer, "chat_template", None)
    if not templates:
        return
    hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
    special = getattr(hf_tokenizer, "special_tokens_map", None) or {}
    for template in templates.values() if isinstance(templates, dict) else [templates]:
        if not isinstance(template, str):
            continue
        result = probe(template, special if isinstance(special, dict) else {})
        if result.get("ok"):
            continue
        name = next(
            (
                n
                for n in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
                if (folder / n).is_file()
            ),
            "tokenizer_config.json",
        )
        if "syntax" in result:
            raise CheckpointError(
                f"{folder / name} holds a broken chat template ({result['syntax']}, line "
                f"{result.get('line')}): fix it or copy it from the original checkpoint"
            )
        spent = (
            f"more than {PROBE_MEMORY_BYTES // MiB} MiB of memory"
            if result.get("limit") == "memory"
            else f"more than {PROBE_CPU_S} s of CPU (a loop that never ends?)"
        )
        raise CheckpointError(
            f"{folder / name} holds a chat template that took {spent} to render a one-message "
            "conversation: fix it or copy it from the original checkpoint"
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those the index names, else every ``*.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if os.path.lexists(index):
        data = _read_json(index)
        try:
            names = sorted(set(data["weight_map"].values()))
        except (KeyError, AttributeError, TypeError):
            raise CheckpointError(f"{index} is not a valid safetensors index: re-download it") from None
        if not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{index} is not a valid safetensors index: re-download it")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{len(missing)} weight shard(s) missing in {folder}: {', '.join(missing[:3])}; "
                "the download is incomplete, fetch the missing files"
            )
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors weights in {folder}: convert or download the checkpoint first"
        )
    return files


def check_safetensors(file: Path) -> None:
    """Raise if ``file`` is not a complete safetensors file (truncated downloads are the usual cause)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, SAFETENSORS_MAX_HEADER):
                raise ValueError("header larger than the file, or than the format allows")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
        raise CheckpointError(
            f"{file} is not a valid safetensors file: re-download or re-convert it"
        ) from None
    if 8 + header_len + end > size:
        raise CheckpointError(
            f"{file} is truncated ({size} of {8 + header_len + end} bytes): re-download or re-convert it"
        )


def load_weights(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a checkpoint, memory-mapped (nothing is read until used)."""
    weights: dict[str, mx.array] = {}
    for file in weight_files(folder):
        check_safetensors(file)
        weights.update(load_safetensors(file))
    return weights


def _quantize(model: Model, config: dict[str, Any], weights: dict[str, mx.array]) -> None:
    """Swap in quantized layers where the checkpoint stores quantized tensors (mlx-lm / mlx-vlm layout)."""
    q = config.get("quantization") or config.get("quantization_config")
    if not q or "bits" not in q:
        return

    def predicate(path: str, module: nn.Module) -> bool | dict:
        if f"{path}.scales" not in weights:
            return False
        override = q.get(path)
        return override if isinstance(override, dict) else True

    nn.quantize(
        model,
        group_size=q["group_size"],
        bits=q["bits"],
        mode=q.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_tensors(model: Model, weights: dict[str, mx.array], folder: Path) -> None:
    """Raise one line naming missing, unexpected and mis-shaped tensors of a checkpoint."""
    expected = dict(flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
            f"{', ...' if len(unexpected) > 3 else ''})"
        )
    if wrong:
        k = wrong[0]
        problems.append(
            f"{len(wrong)} with the wrong shape ({k}: {tuple(weights[k].shape)}, "
            f"config says {tuple(expected[k].shape)})"
        )
    if problems:
        raise CheckpointError(
            f"weights in {folder} do not match its config.json: {'; '.join(problems)}; "
            "the checkpoint is incomplete or its config belongs to another model"
        )


def load_model(
    path_or_repo: str | Path, dtype: mx.Dtype | None = None, group: mx.distributed.Group | None = None
) -> Model:
    """Load a DiffusionGemma text model from a folder or hub id (HF, sharded, or mlx-community layout).

    ``dtype`` casts the floating-point weights (e.g. ``mx.float32`` for CPU tests); default keeps them as stored.
    ``group`` (an ``mx.distributed`` group of several ranks) loads only this rank's part (``mlx_dgemma.model.shard``).
    """
    folder = resolve(path_or_repo)
    config = read_config(folder)
    args = ModelArgs.from_config(config, source=str(folder / "config.json"))
    raw = load_weights(folder)
    # A config may name a vision tower whose weights were left out (text-only conversions): load text only.
    try:
        vision = VisionArgs.from_config(config) if has_vision_weights(raw) else None
    except (TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(
            f"{folder / 'config.json'} has an invalid vision_config ({e}): re-download the "
            "checkpoint's config.json"
        ) from None
    if vision is not None:
        check_vision(vision, str(folder / "config.json"))
    model = Model(args, _read_json(folder / "generation_config.json"), vision)
    weights = model.sanitize(raw)
    _quantize(model, config, weights)
    check_tensors(model, weights, folder)
    if group is not None:
        from mlx_dgemma.model.shard import shard_weights

        weights = shard_weights(model, weights, group, folder)
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    model.source = str(folder)  # where a bundled drafter would be (``mlx_dgemma.drafter``)
    return model


def load_tokenizer(path_or_repo: str | Path, tokenizer_config: dict[str, Any] | None = None) -> Any:
    """The checkpoint's tokenizer (an mlx-lm ``TokenizerWrapper``: HF tokenizer plus streaming detokenizer).

    ``tokenizer_config`` is passed to ``AutoTokenizer.from_pretrained`` as mlx-lm passes it (``trust_remote_code``,
    ``eos_token``: an end-of-turn token added to the checkpoint's, ...)."""
    folder = resolve(path_or_repo)
    for name in TOKENIZER_FILES:
        if os.path.lexists(folder / name):
            check_regular(folder / name, "tokenizer file", MAX_CHECKPOINT_FILE_BYTES, CheckpointError)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(
            f"no tokenizer (tokenizer.json or tokenizer.model) in {folder}: copy it from the "
            "original checkpoint"
        )
    _check_json_object(folder / "tokenizer.json")
    from mlx_lm.tokenizer_utils import load as load_mlx_lm_tokenizer

    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    try:
        tokenizer = load_mlx_lm_tokenizer(
            folder, dict(tokenizer_config or {}), eos_token_ids=[eos] if isinstance(eos, int) else eos
        )
    except Exception as e:  # the tokenizer libraries' own reports on a malformed file
        what = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(
            f"cannot load the tokenizer in {folder} ({type(e).__name__}: {what}): re-download "
            "tokenizer.json / tokenizer_config.json or copy them from the original checkpoint"
        ) from None
    check_chat_template(tokenizer, folder)
    return tokenizer


def _check_json_object(file: Path) -> None:
    """Raise one line if ``file`` (when present) does not hold a JSON object, from its first bytes only (a
    tokenizer.json runs to tens of megabytes; the tokenizer library parses it)."""
    if not file.is_file():
        return
    with open(file, "rb") as f:
        head = f.read(4096).lstrip(b" \t\r\n\xef\xbb\xbf")
    if not head.startswith(b"{"):
        kind = {b"[": "a JSON list", b'"': "a JSON string"}.get(
            head[:1], "no JSON object" if head else "nothing"
        )
        raise CheckpointError(
            f"{file} holds {kind}, not an object ({{...}}): re-download it or copy it from the "
            "original checkpoint"
        )


@overload
def load(
    path_or_repo: str | Path | None = None,
    dtype: mx.Dtype | dict[str, Any] | None = None,
    adapter_path: str | Path | None = None,
    *,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    lazy: bool = True,
    return_config: Literal[False] = False,
    trust_remote_code: bool = False,
) -> tuple[Model, Any]: ...


@overload
def load(
    path_or_repo: str | Path | None = None,
    dtype: mx.Dtype | dict[str, Any] | None = None,
    adapter_path: str | Path | None = None,
    *,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    lazy: bool = True,
    return_config: Literal[True],
    trust_remote_code: bool = False,
) -> tuple[Model, Any, dict[str, Any]]: ...


@overload
def load(
    path_or_repo: str | Path | None = None,
    dtype: mx.Dtype | dict[str, Any] | None = None,
    adapter_path: str | Path | None = None,
    *,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    lazy: bool = True,
    return_config: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Model, Any] | tuple[Model, Any, dict[str, Any]]: ...


def load(
    path_or_repo: str | Path | None = None,
    dtype: mx.Dtype | dict[str, Any] | None = None,
    adapter_path: str | Path | None = None,
    *,
    tokenizer_config: dict[str, Any] | None = None,
    model_config: dict[str, Any] | None = None,
    lazy: bool = True,
    return_config: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Model, Any] | tuple[Model, Any, dict[str, Any]]:
    """Load a model and its tokenizer: a folder, a Hugging Face repo id, or (no argument) the embedded default.

    ``adapter_path`` applies fine-tuned adapters written by ``mlx_dgemma.train``. Started by ``mlx.launch``
    on several ranks, each rank loads its part of the model (``mlx_dgemma.model.shard``).

    mlx-lm's keywords work as there: ``tokenizer_config`` goes to the tokenizer (``load_tokenizer``),
    ``lazy=False`` reads every weight now (default: memory-mapped, read when first used), ``return_config``
    returns ``config.json`` as a third item; ``trust_remote_code`` is accepted for the model, which is
    built in (no remote code runs); the tokenizer's is ``tokenizer_config={"trust_remote_code": True}``, as in
    mlx-lm. A dict as the second positional argument is mlx-lm's ``tokenizer_config``.
    """
    if isinstance(dtype, dict):  # mlx-lm's load(path, tokenizer_config)
        if tokenizer_config is not None:
            raise CheckpointError("tokenizer_config given twice (second argument and keyword): give it once")
        dtype, tokenizer_config = None, dtype
    if model_config:
        raise CheckpointError(
            "model_config is not supported: the architecture is read from config.json; edit "
            "the checkpoint's config.json instead"
        )
    folder = resolve(path_or_repo if path_or_repo is not None else DEFAULT_MODEL)
    group = launched_group()
    if group is not None and adapter_path is not None:
        raise CheckpointError(
            "adapters cannot be applied to a model split over several ranks: fuse them first "
            "(mlx_dgemma.train --fuse) and launch with the fused model"
        )
    model = load_model(folder, dtype, group)
    if adapter_path is not None:
        from mlx_dgemma.model.adapters import load_adapters

        load_adapters(model, adapter_path)
    if not lazy:
        mx.eval(model.parameters())
    tokenizer = load_tokenizer(folder, tokenizer_config)
    if return_config:
        return model, tokenizer, read_config(folder)
    return model, tokenizer


def _read_json(file: Path) -> dict[str, Any]:
    """A checkpoint's JSON object file (``{}`` when absent): a regular file of at most ``MAX_CONFIG_BYTES``,
    UTF-8, parsed; anything else is one line naming it."""
    if not os.path.lexists(file):
        return {}
    text = read_text(file, MAX_CONFIG_BYTES, "checkpoint file", CheckpointError, "re-download it")
    data = parse_json(text, str(file), CheckpointError, "re-download it")
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{file} holds a JSON {type(data).__name__}, not an object ({{...}}): "
            "re-download it or copy it from the original checkpoint"
        )
    return data
