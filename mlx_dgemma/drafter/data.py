"""Where a drafter's training data comes from: a local file or folder, or a dataset on the Hugging Face Hub.

``--data`` is a JSONL file, a JSON file (a list of records), a parquet file (with ``pyarrow``), a folder of them,
or a Hub dataset id (``org/name``), downloaded as models are (``snapshot_download``, the hub cache first). In a
folder or dataset, ``--split`` (default ``train``) picks the files that name the split (``train.jsonl``,
``data/train-00000-of-00002.parquet``, ``train/part-0.json``); a folder whose files name no split is one split,
``train``.

Records are read in the shapes ``mlx_dgemma.train.data`` knows (chat messages, prompt/completion, ShareGPT, Alpaca,
question/answer); a bad one is a one-line error naming its file and line (or row).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from mlx_dgemma.errors import DGemmaError, DrafterError
from mlx_dgemma.request import encode_prompt
from mlx_dgemma.train.data import Example, encode_record, one_line, prompt_messages

SUFFIXES = (".jsonl", ".json", ".parquet")
SPLITS = ("train", "validation", "valid", "val", "test", "dev", "eval")
# JSON files a dataset folder holds beside its records (the datasets library's metadata).
METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}
PARQUET_BATCH = 1024  # rows read at a time: a parquet file is never in memory whole


@dataclass(frozen=True)
class Source:
    """The files of one split, in reading order, and how to name them in messages."""

    files: tuple[Path, ...]
    name: str


def resolve(data: str | Path, split: str = "train") -> Source:
    """The files ``--data`` names for ``split``: a file, a folder's split files, or a Hub dataset's."""
    path = Path(data).expanduser()
    if path.is_file():
        _check_suffix(path)
        return Source((path,), str(path))
    if path.is_dir():
        return Source(split_files(path, split, str(path)), str(path))
    text = str(data)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith(SUFFIXES):
        raise DrafterError(
            f"data not found: {data} (give a .jsonl/.json/.parquet file, a folder of them, "
            "or a Hugging Face dataset id like org/name)"
        )
    return Source(split_files(download(text, split), split, text), text)


def download(repo: str, split: str) -> Path:
    """A local snapshot of the Hub dataset ``repo``: its data files naming ``split`` (every data file when none
    does); the hub cache first, so that a dataset fetched once works offline."""
    from huggingface_hub import snapshot_download

    error: Exception | None = None
    reached = False
    for patterns in ([f"*{split}*{s}" for s in SUFFIXES], [f"*{s}" for s in SUFFIXES]):
        wanted = split if patterns[0].startswith(f"*{split}") else None
        for local in (True, False):
            try:
                folder = Path(
                    snapshot_download(
                        repo, repo_type="dataset", allow_patterns=patterns, local_files_only=local
                    )
                )
            except Exception as e:  # not cached, offline, unknown or gated: the next try says which
                error = e
                continue
            reached = True
            files = _data_files(folder)
            if files and (wanted is None or any(_split_of(f.relative_to(folder)) == wanted for f in files)):
                return folder
    if not reached:
        raise DrafterError(
            f"cannot get the dataset {repo} from the Hugging Face hub ({type(error).__name__}) and it is not in "
            "the hub cache: check the id and your network (or log in for a gated one), or pass a local file"
        )
    raise DrafterError(f"the dataset {repo} has no .jsonl, .json or .parquet files: convert it to JSONL")


def split_files(folder: Path, split: str, name: str) -> tuple[Path, ...]:
    """The data files of ``folder`` (searched recursively) for ``split``; one-line error when there are none."""
    files = _data_files(folder)
    if not files:
        raise DrafterError(f"no .jsonl, .json or .parquet files in {name}: put the records there")
    named = {f: _split_of(f.relative_to(folder)) for f in files}
    chosen = [f for f in files if named[f] == split]
    if not chosen and split == "train" and not any(named.values()):
        chosen = files  # no file names a split: the folder is the training data
    if not chosen:
        found = sorted({s for s in named.values() if s}) or ["none (the files are the train split)"]
        raise DrafterError(f"no {split!r} split in {name}: its files name the splits {', '.join(found)}")
    return tuple(chosen)


def _data_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix in SUFFIXES
        and p.name not in METADATA
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def _split_of(relative: Path) -> str | None:
    """The split a data file's path names: ``train.jsonl``, ``train-00000-of-00002.parquet``, ``train/x.json``."""
    for part in (*relative.parent.parts, relative.name.split(".")[0]):
        head = part.replace("_", "-").split("-")[0].lower()
        if head in SPLITS:
            return head
    return None


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise DrafterError(f"{path}: give a .jsonl, .json or .parquet file (one record a line for .jsonl)")


def records(source: Source, limit: int | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for the first ``limit`` records of ``source`` (all without one); ``where`` names
    the file and line (``train.jsonl line 3``) or row for error messages."""
    count = 0
    for file in source.files:
        for where, record in _file_records(file):
            if limit is not None and count >= limit:
                return
            count += 1
            yield where, record
    if count == 0:
        raise DrafterError(f"{source.name} has no records: write one JSON object a line")


def _file_records(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".parquet":
        yield from _parquet(path)
        return
    if path.suffix == ".json":
        whole = _whole_json(path)
        if whole is not None:
            yield from ((f"{path.name} record {i}", r) for i, r in enumerate(whole, start=1))
            return
    yield from _jsonl(path)  # .jsonl, or a .json file holding one object a line


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for number, raw in enumerate(f, start=1):
            where = f"{path.name} line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DrafterError(
                    f"{where}: not UTF-8 text (byte {raw[e.start]:#04x}): save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DrafterError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def _whole_json(path: Path) -> list[Any] | None:
    """A .json file's records when it is one JSON document (a list, or an object holding one list); None when it
    is JSON Lines (the Hub's .json files often are)."""
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(doc, dict):
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) == 1 and not ({"messages", "conversations"} & set(doc)):
            return lists[0]
        return [doc]  # a single record
    if isinstance(doc, list):
        return doc
    raise DrafterError(f"{path.name}: expected a list of records, got a JSON {type(doc).__name__}")


def _parquet(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DrafterError(f"reading {path.name} needs pyarrow: pip install pyarrow") from None
    try:
        table = pq.ParquetFile(path)
        row = 0
        for batch in table.iter_batches(batch_size=PARQUET_BATCH):
            for record in batch.to_pylist():
                row += 1
                yield f"{path.name} row {row}", record
    except (OSError, ValueError) as e:  # pyarrow's errors derive from these
        raise DrafterError(f"{path.name}: not a readable parquet file ({one_line(e)})") from None


def examples(
    source: Source, tokenizer: Any, eos_ids: set[int], limit: int | None = None, start: int = 0
) -> Iterator[tuple[int, Example]]:
    """``(number, example)``: each record's prompt and answer token ids (``mlx_dgemma.train.data.encode_record``),
    from record ``start`` on (the ones before it are read, not encoded)."""
    for number, (where, record) in enumerate(records(source, limit)):
        if number >= start:
            yield number, _checked(where, lambda r=record: encode_record(r, tokenizer, eos_ids))


def prompts(
    source: Source, tokenizer: Any, limit: int | None = None, start: int = 0
) -> Iterator[tuple[int, list[int]]]:
    """``(number, prompt ids)``: each record's prompt as generation encodes it, from record ``start`` on. An
    answer, if the record has one, is dropped (the target writes its own); a plain ``{"prompt": "..."}`` string is
    encoded as generation encodes a string prompt."""
    for number, (where, record) in enumerate(records(source, limit)):
        if number >= start:
            yield number, _checked(where, lambda r=record: list(encode_prompt(tokenizer, _prompt(r))))


def _prompt(record: Any) -> Any:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and not record.get("system"):
        if not record["prompt"].strip():
            raise ValueError("the prompt is empty")
        return record["prompt"]
    return prompt_messages(record)


def _checked(where: str, encode: Any) -> Any:
    """``encode()``, its errors as one line prefixed with ``where``."""
    try:
        return encode()
    except (ValueError, DGemmaError, TemplateError) as e:
        raise DrafterError(f"{where}: {one_line(e)}") from None
