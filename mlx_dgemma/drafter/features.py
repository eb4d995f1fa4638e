"""The drafter's training features on disk: written in shards as records are encoded, read memory-mapped.

A record (one prompt, with its answer) gives a sample per answer canvas ``k``: the target's captured features of
the context before that canvas (its last ``context_window`` positions) and the canvas. The canvases' windows overlap
(canvas ``k + 1`` reads most of what canvas ``k`` read), so a record stores each position any of its windows needs
once, and a sample is a slice of its record's rows. With a window no longer than a canvas, the windows do not
overlap and a record stores ``context_window`` rows per canvas.

Layout of the store's folder:

* ``shard-NNNNN.features.npy``: float16 ``[rows, F]``, the rows of consecutive records (``F``: the captured layers
  times the target's hidden size);
* ``shard-NNNNN.samples.npy``: int64 ``[n, 3]``, each sample's first row in its shard, its row count and its record;
* ``shard-NNNNN.canvases.npy``: int32 ``[n, canvas_length]``, each sample's target canvas;
* ``index.json``: the settings the features were collected with, and the complete shards. A shard counts once the
  index names it; each file and the index are written to a temporary name and renamed, so an interrupted run
  leaves the store as it was after its last complete shard, and the next run continues there.

Reading maps the shards (``np.load(mmap_mode="r")``): memory does not grow with the data, a batch reads its rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_dgemma.errors import DrafterError

INDEX_FILE = "index.json"
VERSION = 1
FP16_MAX = 65504.0  # float16's largest value: features beyond it are clipped, not stored as inf
HEADER_BYTES = 128  # a shard's .npy header, reserved up front: rows are appended as records are encoded


@dataclass
class Record:
    """One record's features and samples: ``features`` [n, F] float16 holds the positions
    ``needed_positions(windows)`` lists, in order; sample ``k`` reads positions ``windows[k]`` and its target is
    ``canvases[k]``."""

    features: np.ndarray
    windows: list[tuple[int, int]]
    canvases: np.ndarray  # [len(windows), C] int32


def canvas_windows(prompt_length: int, count: int, canvas_length: int, window: int) -> list[tuple[int, int]]:
    """The context positions ``[start, end)`` of a record's ``count`` answer canvases: everything encoded before
    canvas ``k`` (prompt and ``k`` canvases), its last ``window`` positions."""
    ends = [prompt_length + k * canvas_length for k in range(count)]
    return [(max(0, end - window), end) for end in ends]


def needed_positions(windows: Sequence[tuple[int, int]]) -> np.ndarray:
    """The positions any of ``windows`` reads, sorted, each once."""
    if not windows:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in windows]))


def record_rows(prompt_length: int, count: int, canvas_length: int, window: int) -> int:
    """Rows a record stores (what :func:`needed_positions` gives, without building it)."""
    rows, covered = 0, 0
    for start, end in canvas_windows(prompt_length, count, canvas_length, window):
        rows += end - max(start, covered)
        covered = end
    return rows


def to_float16(features: Any) -> tuple[np.ndarray, int]:
    """Features as float16 numpy, clipped to float16's range (a trained model's residual stream can exceed it);
    also how many values were clipped."""
    array = np.asarray(features, dtype=np.float32)
    clipped = int(np.count_nonzero(np.abs(array) > FP16_MAX))
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16), clipped


def chain(previous: str, tokens: Sequence[Sequence[int]]) -> str:
    """A running hash over the records' token ids: equal hashes at record ``n`` mean the same first ``n`` records,
    so a store is only continued with the data it was collected from."""
    digest = hashlib.sha256(previous.encode())
    for part in tokens:
        digest.update(np.asarray(part, dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()[:32]


class FeatureWriter:
    """Appends records to the store in ``folder``, a shard at a time, continuing its complete shards.

    ``settings`` (the target, layers, window, ...) must equal what the store was collected with; ``done`` is the
    number of data records its complete shards cover, ``hashes`` their running hash at each shard's end.
    """

    def __init__(
        self, folder: Path, settings: dict[str, Any], feature_size: int, canvas_length: int, shard_bytes: int
    ):
        self.folder, self.settings, self.shard_bytes = folder, settings, max(int(shard_bytes), 1)
        self.feature_size, self.canvas_length = feature_size, canvas_length
        folder.mkdir(parents=True, exist_ok=True)
        self.index = read_index(folder) or {
            "version": VERSION,
            "settings": settings,
            "feature_size": feature_size,
            "canvas_length": canvas_length,
            "shards": [],
            "clipped": 0,
        }
        check_settings(folder, self.index, settings)
        self._file: Any = None
        self._rows = 0
        self._samples: list[tuple[int, int, int]] = []
        self._canvases: list[np.ndarray] = []
        self._first = self._last = self.done
        self._hash = self.index["shards"][-1]["hash"] if self.index["shards"] else ""
        self._clipped = 0

    @property
    def done(self) -> int:
        """Data records the complete shards cover (the next record to encode)."""
        return self.index["shards"][-1]["records"][1] if self.index["shards"] else 0

    @property
    def hashes(self) -> dict[int, str]:
        """Running record hash at each complete shard's end, by record count."""
        return {s["records"][1]: s["hash"] for s in self.index["shards"]}

    @property
    def samples(self) -> int:
        """Samples stored so far, the current shard's included."""
        return sum(s["samples"] for s in self.index["shards"]) + len(self._samples)

    @property
    def bytes(self) -> int:
        """Feature bytes stored so far, the current shard's included."""
        done = sum(s["rows"] for s in self.index["shards"])
        return (done + self._rows) * self.feature_size * 2

    def add(self, number: int, record: Record | None, record_hash: str, clipped: int = 0) -> None:
        """Store record ``number`` (None: a record skipped, e.g. too long for the target, counted all the same)
        whose running hash is ``record_hash``; a shard that reaches ``shard_bytes`` is completed."""
        if number != self._last:
            raise ValueError(f"record {number} added after record {self._last - 1}: add them in order")
        if record is not None and len(record.windows):
            if self._file is None:
                self._open()
            positions = needed_positions(record.windows)
            if record.features.shape != (len(positions), self.feature_size):
                raise ValueError(
                    f"record features {record.features.shape}, expected {(len(positions), self.feature_size)}"
                )
            base = self._rows
            self._file.write(np.ascontiguousarray(record.features, dtype=np.float16).tobytes())
            for (start, end), canvas in zip(record.windows, record.canvases):
                first = base + int(np.searchsorted(positions, start))
                self._samples.append((first, end - start, number))
                self._canvases.append(np.asarray(canvas, dtype=np.int32))
            self._rows += len(positions)
        self._last = number + 1
        self._hash = record_hash
        self._clipped += clipped
        if self._rows * self.feature_size * 2 >= self.shard_bytes:
            self.complete()

    def complete(self) -> None:
        """Write the current shard (whatever it holds: records, or only skipped ones) and name it in the index."""
        if self._last <= self.done:
            return
        name = f"shard-{len(self.index['shards']):05d}"
        if self._file is None:
            self._open()
        self._finish_features(name)
        _save_npy(self.folder / f"{name}.samples.npy", np.array(self._samples, dtype=np.int64).reshape(-1, 3))
        canvases = np.stack(self._canvases) if self._canvases else np.zeros((0, self.canvas_length), np.int32)
        _save_npy(self.folder / f"{name}.canvases.npy", canvases.astype(np.int32))
        self.index["shards"].append(
            {
                "name": name,
                "records": [self._first, self._last],
                "samples": len(self._samples),
                "rows": self._rows,
                "hash": self._hash,
            }
        )
        self.index["clipped"] = int(self.index.get("clipped", 0)) + self._clipped
        _write_json(self.folder / INDEX_FILE, self.index)
        self._file, self._rows, self._samples, self._canvases = None, 0, [], []
        self._first, self._clipped = self._last, 0

    def _open(self) -> None:
        self._tmp = self.folder / f"shard-{len(self.index['shards']):05d}.features.npy.tmp"
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (open across records; closed by complete/close)
        self._file.write(b"\0" * HEADER_BYTES)

    def _finish_features(self, name: str) -> None:
        """The .npy header, now that the rows are known; then the file is synced and renamed into place."""
        self._file.seek(0)
        self._file.write(npy_header((self._rows, self.feature_size), "<f2"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.folder / f"{name}.features.npy")

    def close(self) -> None:
        """Drop an unfinished shard (a run that stops mid-shard continues from the last complete one)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            Path(self._tmp).unlink(missing_ok=True)


def npy_header(shape: tuple[int, ...], descr: str) -> bytes:
    """A version 1.0 ``.npy`` header of exactly ``HEADER_BYTES`` bytes (padded with spaces, as numpy pads)."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    body = text.ljust(HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(value, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(folder: Path) -> dict[str, Any] | None:
    """The store's index, or None when ``folder`` holds no store yet."""
    file = folder / INDEX_FILE
    if not file.is_file():
        return None
    try:
        index = json.loads(file.read_text())
    except json.JSONDecodeError:
        raise DrafterError(
            f"{file} is not valid JSON: remove {folder} and collect the features again"
        ) from None
    if not isinstance(index, dict) or index.get("version") != VERSION:
        raise DrafterError(
            f"{file} is not a feature index of this version: remove {folder} and collect again"
        )
    return index


def check_settings(folder: Path, index: dict[str, Any], settings: dict[str, Any]) -> None:
    """One-line error when the store was collected with other settings than this run's."""
    have = index.get("settings", {})
    for key in sorted(set(have) | set(settings)):
        if have.get(key) != settings.get(key):
            raise DrafterError(
                f"the features in {folder} were collected with {key} {have.get(key)!r}, this run asks for "
                f"{settings.get(key)!r}: use the same flags, or remove that folder (or give another --features)"
            )


class FeatureStore:
    """The samples of a store, memory-mapped: ``window(i)`` [n, F] float16 and ``targets(idx)`` [B, C] int32.

    ``max_records`` keeps the samples of the first records only (a store collected further than a run asks).
    """

    def __init__(self, folder: Path, max_records: int | None = None):
        index = read_index(folder)
        if index is None:
            raise DrafterError(
                f"no drafter features in {folder}: collect them first (mlx_dgemma.drafter.train)"
            )
        self.folder, self.feature_size = folder, int(index["feature_size"])
        self.clipped = int(index.get("clipped", 0))
        self._features, self._canvases, tables = [], [], []
        for i, shard in enumerate(index["shards"]):
            try:
                self._features.append(np.load(folder / f"{shard['name']}.features.npy", mmap_mode="r"))
                self._canvases.append(np.load(folder / f"{shard['name']}.canvases.npy", mmap_mode="r"))
                table = np.load(folder / f"{shard['name']}.samples.npy")
            except (OSError, ValueError) as e:
                raise DrafterError(
                    f"cannot read shard {shard['name']} of {folder} ({e}): remove the folder and collect again"
                ) from None
            tables.append(np.column_stack([table, np.full(len(table), i), np.arange(len(table))]))
        table = np.concatenate(tables) if tables else np.zeros((0, 5), dtype=np.int64)
        if max_records is not None:
            table = table[table[:, 2] < max_records]
        self.records = len(np.unique(table[:, 2]))
        self.starts, self.lengths, self.record = table[:, 0], table[:, 1], table[:, 2]
        self.shard, self.row = table[:, 3], table[:, 4]

    @property
    def prompts(self) -> int:
        """Records the samples come from (the trainer's statistics call them prompts)."""
        return self.records

    def __len__(self) -> int:
        return len(self.lengths)

    def window(self, i: int) -> np.ndarray:
        """Sample ``i``'s context features [n, F] (float16, read from its shard)."""
        at = int(self.starts[i])
        return self._features[int(self.shard[i])][at : at + int(self.lengths[i])]

    def targets(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """The target canvases of samples ``idx`` [B, C] int32."""
        return np.stack([self._canvases[int(self.shard[i])][int(self.row[i])] for i in idx]).astype(np.int32)
