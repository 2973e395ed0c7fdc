"""Load a dataset of samples (first axis) from .npy, .npz, .safetensors, .h5/.hdf5, .pt or .csv.

Arrays are read lazily where the format allows (`.npy` is memory-mapped, HDF5 and safetensors
are sliced from disk), so a file larger than RAM is streamed batch by batch.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import DataLoadError, ShapeMismatchError

_SCAN_BYTES = 64 * 1024 * 1024


class _ArrayLike(Protocol):
    shape: tuple[int, ...]

    def __getitem__(self, item: slice) -> Any: ...


@dataclass
class DataSource:
    """A selection of samples `[offset, offset + len)` of one array, read in batches.

    sample_shape: the per-sample shape (the array's shape without its first axis), after any
        reshape to the model's input shape.
    """

    path: Path
    format: str
    key: str | None
    array: _ArrayLike
    offset: int
    count: int
    sample_shape: tuple[int, ...]
    sha256: str | None = None  # set when the bytes were read whole (standard input)

    def __len__(self) -> int:
        return self.count

    @property
    def indices(self) -> np.ndarray:
        """Row numbers of the selected samples in the file, shape (N,)."""
        return np.arange(self.offset, self.offset + self.count, dtype=np.int64)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples `start:stop` of the selection, shape (stop - start, *sample_shape)."""
        rows = np.array(self.array[self.offset + start:self.offset + stop])  # a writable copy
        return rows.reshape((stop - start, *self.sample_shape))

    def batches(self, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(start, rows)` for consecutive batches of at most `batch_size` samples."""
        for start in range(0, self.count, batch_size):
            yield start, self.read(start, min(start + batch_size, self.count))

    def check_finite(self) -> None:
        """Raise DataLoadError naming the first samples that hold NaN or Inf."""
        per_sample = max(1, int(np.prod(self.sample_shape)) * 8)
        step = max(1, _SCAN_BYTES // per_sample)
        bad: list[int] = []
        total = 0
        for start, rows in self.batches(step):
            if not np.issubdtype(rows.dtype, np.floating):
                return
            flags = ~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
            found = np.flatnonzero(flags)
            total += len(found)
            bad.extend((found[:5] + self.offset + start).tolist())
        if total:
            shown = ", ".join(map(str, bad[:5]))
            raise DataLoadError(f"{self.path}: {total} sample(s) contain NaN or Inf (rows {shown}"
                                f"{', ...' if total > 5 else ''}); clean the data or select "
                                "finite rows with --offset/--limit")

    def match_input_shape(self, input_shape: tuple[int, ...] | None) -> None:
        """Check (or, for flat CSV rows, apply) the model's per-sample input shape."""
        if input_shape is None or tuple(input_shape) == self.sample_shape:
            return
        if self.format == "csv" and int(np.prod(input_shape)) == int(np.prod(self.sample_shape)):
            self.sample_shape = tuple(input_shape)
            return
        raise ShapeMismatchError(
            f"data samples have shape {self.sample_shape} but the model expects input of shape "
            f"{tuple(input_shape)} (per sample; the first axis of {self.path.name} is samples)")


def load_data(path: str | Path, *, key: str | None = None, offset: int = 0,
              limit: int | None = None) -> DataSource:
    """Open the array at `path` (choosing `key` in multi-array files) and select samples.

    offset: index of the first sample to use; limit: at most this many samples.
    """
    path = Path(path)
    if offset < 0 or (limit is not None and limit < 1):
        raise DataLoadError("--offset must be >= 0 and --limit >= 1")
    if str(path) == "-":
        return _select(path, "npy", None, *_read_stdin(), offset, limit)
    if not path.exists():
        raise DataLoadError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    readers = {".npy": _open_npy, ".npz": _open_npz, ".safetensors": _open_safetensors,
               ".h5": _open_hdf5, ".hdf5": _open_hdf5, ".pt": _open_pt, ".pth": _open_pt,
               ".csv": _open_csv}
    if suffix not in readers:
        raise DataLoadError(f"{path}: unknown data format {suffix!r}; use one of "
                            f"{', '.join(sorted(readers))}")
    fmt = suffix.lstrip(".").replace("hdf5", "h5").replace("pth", "pt")
    array, key = readers[suffix](path, key)
    return _select(path, fmt, key, array, None, offset, limit)


def _read_stdin() -> tuple[np.ndarray, str]:
    """A .npy array streamed on standard input (`jaccli ... -`), and the SHA-256 of its bytes."""
    import hashlib
    import io
    import sys

    raw = sys.stdin.buffer.read()
    if not raw.startswith(b"\x93NUMPY"):
        raise DataLoadError("standard input is not a .npy stream; write one with "
                            "numpy.save(sys.stdout.buffer, array)")
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as exc:
        raise DataLoadError(f"cannot read the .npy stream on standard input ({exc})") from exc
    return array, hashlib.sha256(raw).hexdigest()


def _select(path: Path, fmt: str, key: str | None, array: _ArrayLike, sha256: str | None,
            offset: int, limit: int | None) -> DataSource:
    shape = tuple(int(d) for d in array.shape)
    if len(shape) < 1 or shape[0] == 0:
        raise DataLoadError(f"{path}: the array{_key_note(key)} has shape {shape}; expected "
                            "samples along the first axis")
    if offset >= shape[0]:
        raise DataLoadError(f"--offset {offset} is past the end of {path.name} "
                            f"({shape[0]} samples)")
    count = shape[0] - offset if limit is None else min(limit, shape[0] - offset)
    return DataSource(path, fmt, key, array, offset, count, shape[1:], sha256)


def _key_note(key: str | None) -> str:
    return f" {key!r}" if key else ""


def _choose_key(path: Path, keys: list[str], key: str | None) -> str:
    if key is not None:
        if key not in keys:
            raise DataLoadError(f"{path}: no array named {key!r}; available: {', '.join(keys)}")
        return key
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise DataLoadError(f"{path} contains no arrays")
    raise DataLoadError(f"{path} holds several arrays ({', '.join(keys)}); choose one with --key")


def _open_npy(path: Path, key: str | None) -> tuple[_ArrayLike, None]:
    with path.open("rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise DataLoadError(f"{path} is not a valid .npy file (no NumPy header)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False), None
    except ValueError as exc:  # object arrays need pickle: refuse them
        raise DataLoadError(f"{path} holds Python objects, which need unpickling; store a "
                            "numeric array") from exc
    except OSError as exc:
        raise DataLoadError(f"{path} is not a valid .npy file ({exc})") from exc


def _open_npz(path: Path, key: str | None) -> tuple[_ArrayLike, str]:
    try:
        archive = np.load(path, allow_pickle=False)
        key = _choose_key(path, list(archive.files), key)
        return archive[key], key
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataLoadError(f"{path} is not a valid .npz file ({exc})") from exc


class _SafetensorsArray:
    """One tensor of a safetensors file, sliced from disk along the first axis."""

    def __init__(self, path: Path, key: str):
        from safetensors import safe_open

        self._handle = safe_open(str(path), framework="np")
        self._slice = self._handle.get_slice(key)
        self.shape = tuple(self._slice.get_shape())

    def __getitem__(self, item: slice) -> np.ndarray:
        return self._slice[item]


def _open_safetensors(path: Path, key: str | None) -> tuple[_ArrayLike, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            keys = list(f.keys())
        key = _choose_key(path, keys, key)
        return _SafetensorsArray(path, key), key
    except (SafetensorError, OSError) as exc:
        raise DataLoadError(f"{path} is not a valid safetensors file ({exc})") from exc


def _open_hdf5(path: Path, key: str | None) -> tuple[_ArrayLike, str]:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise DataLoadError(f"{path} is not a valid HDF5 file ({exc})") from exc
    keys: list[str] = []
    handle.visititems(lambda name, obj: keys.append(name) if isinstance(obj, h5py.Dataset)
                      and obj.ndim >= 1 else None)
    key = _choose_key(path, keys, key.strip("/") if key else None)
    return handle[key], key


def _open_pt(path: Path, key: str | None) -> tuple[_ArrayLike, str | None]:
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataLoadError(f"{path} holds pickled Python objects, not plain tensors; save a "
                            "tensor or a dict of tensors") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise DataLoadError(f"{path} is not a valid torch.save file ({exc})") from exc
    if isinstance(obj, torch.Tensor):
        return obj.numpy(), None
    if isinstance(obj, dict):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        key = _choose_key(path, list(tensors), key)
        return tensors[key].numpy(), key
    raise DataLoadError(f"{path} holds a {type(obj).__name__}; expected a tensor or a dict of "
                        "tensors")


def _open_csv(path: Path, key: str | None) -> tuple[_ArrayLike, None]:
    with path.open() as f:
        first = f.readline()
    delimiter = "," if "," in first else None
    try:
        np.asarray(first.split(delimiter), dtype=np.float64)
        skip = 0
    except ValueError:
        skip = 1  # a header row
    try:
        rows = np.loadtxt(path, delimiter=delimiter, skiprows=skip, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise DataLoadError(f"{path}: cannot parse as numeric CSV ({exc})") from exc
    return rows, None
