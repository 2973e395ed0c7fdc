"""Load a dataset of samples (first axis) from .npy, .npz, .safetensors, .h5/.hdf5, .pt or .csv.

Arrays are read lazily where the format allows (`.npy` is memory-mapped, HDF5 and safetensors
are sliced from disk), so a file larger than RAM is streamed batch by batch.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import DataLoadError, ShapeMismatchError, UsageError
from .array_files import (
    NpzArray,
    check_numeric,
    npy_from_bytes,
    npz_keys,
    open_npy,
    tensor_to_numpy,
)

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
              limit: int | None = None, key_option: str = "--key") -> DataSource:
    """Open the array at `path` (choosing `key` in multi-array files) and select samples.

    offset: index of the first sample to use; limit: at most this many samples.
    key_option: the command-line option that gave `key`, for error messages.
    """
    path = Path(path)
    if offset < 0 or (limit is not None and limit < 1):
        raise DataLoadError("--offset must be >= 0 and --limit >= 1")
    suffix = ".npy" if str(path) == "-" else path.suffix.lower()
    if key is not None and suffix in (".npy", ".csv"):
        raise UsageError(f"{key_option} {key} selects an array in .npz/.safetensors/.h5/.pt "
                         f"files, but {path} is a {suffix} file holding one array: drop "
                         f"{key_option}")
    if str(path) == "-":
        return _select(path, "npy", None, *_read_stdin(), offset, limit)
    if not path.exists():
        raise DataLoadError(f"data file not found: {path}")
    if path.is_dir():
        raise DataLoadError(f"{path} is a directory; give a data file")
    readers = {".npy": _open_npy, ".npz": _open_npz, ".safetensors": _open_safetensors,
               ".h5": _open_hdf5, ".hdf5": _open_hdf5, ".pt": _open_pt, ".pth": _open_pt,
               ".csv": _open_csv}
    if suffix not in readers:
        raise DataLoadError(f"{path}: unknown data format {suffix!r}; use one of "
                            f"{', '.join(sorted(readers))}")
    fmt = suffix.lstrip(".").replace("hdf5", "h5").replace("pth", "pt")
    try:
        array, key = readers[suffix](path, key)
    except PermissionError as exc:
        raise DataLoadError(f"cannot read {path}: {exc.strerror}") from exc
    return _select(path, fmt, key, array, None, offset, limit)


def _read_stdin() -> tuple[np.ndarray, str]:
    """A .npy array streamed on standard input (`jaccli ... -`), and the SHA-256 of its bytes."""
    import hashlib
    import sys

    raw = sys.stdin.buffer.read()
    if not raw.startswith(b"\x93NUMPY"):
        raise DataLoadError("standard input is not a .npy stream; write one with "
                            "numpy.save(sys.stdout.buffer, array)")
    return npy_from_bytes(raw, "the .npy stream on standard input"), \
        hashlib.sha256(raw).hexdigest()


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
        return open_npy(path), None
    except OSError as exc:
        raise DataLoadError(f"{path} is not a valid .npy file ({exc})") from exc


def _open_npz(path: Path, key: str | None) -> tuple[_ArrayLike, str]:
    key = _choose_key(path, npz_keys(path), key)
    return NpzArray(path, key), key


class _SafetensorsArray:
    """One tensor of a safetensors file, sliced from disk along the first axis (float16 and
    bfloat16 widened to float32)."""

    def __init__(self, path: Path, key: str):
        from safetensors import safe_open

        self._where = f"{path} tensor {key!r}"
        self._handle = safe_open(str(path), framework="pt")
        self._slice = self._handle.get_slice(key)
        self.shape = tuple(self._slice.get_shape())
        if self._slice.get_dtype().startswith("C"):
            raise DataLoadError(f"{self._where} holds complex numbers; jaccli needs real inputs "
                                "(store the real and imaginary parts as separate features)")

    def __getitem__(self, item: slice) -> np.ndarray:
        return tensor_to_numpy(self._slice[item], self._where)


def _open_safetensors(path: Path, key: str | None) -> tuple[_ArrayLike, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
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
    dataset = handle[key]
    if h5py.check_vlen_dtype(dataset.dtype) is not None or \
            h5py.check_string_dtype(dataset.dtype) is not None:
        raise DataLoadError(f"{path} dataset {key!r} holds variable-length or text values, "
                            "not numbers")
    check_numeric(dataset.dtype, f"{path} dataset {key!r}")
    return dataset, key


def _open_pt(path: Path, key: str | None) -> tuple[_ArrayLike, str | None]:
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataLoadError(f"{path} holds pickled Python objects, not plain tensors; save a "
                            "tensor or a dict of tensors") from exc
    except Exception as exc:  # torch.load raises many types on corrupt files
        raise DataLoadError(f"{path} is not a valid torch.save file "
                            f"({_first_line(exc)})") from exc
    if isinstance(obj, torch.Tensor):
        return tensor_to_numpy(obj, str(path)), None
    if isinstance(obj, dict):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        key = _choose_key(path, list(tensors), key)
        return tensor_to_numpy(tensors[key], f"{path} tensor {key!r}"), key
    raise DataLoadError(f"{path} holds a {type(obj).__name__}; expected a tensor or a dict of "
                        "tensors")


def _open_csv(path: Path, key: str | None) -> tuple[_ArrayLike, None]:
    raw = path.read_bytes()
    try:
        if b"\x00" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\x00"), len(raw), "NUL byte")
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataLoadError(f"{path} is not a text CSV file (binary data at byte "
                            f"{exc.start})") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataLoadError(f"{path} is empty; a CSV data file needs one numeric row per "
                            "sample")
    first = lines[0]
    delimiter = "," if "," in first else None
    try:
        np.asarray(first.split(delimiter), dtype=np.float64)
        skip = 0
    except ValueError:
        skip = 1  # a header row
    if len(lines) <= skip:
        raise DataLoadError(f"{path} has a header line but no data rows")
    try:
        rows = np.loadtxt(lines[skip:], delimiter=delimiter, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise DataLoadError(f"{path}: cannot parse as numeric CSV ({_first_line(exc)})") \
            from exc
    return rows, None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
