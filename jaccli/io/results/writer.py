"""Write results to a versioned HDF5 file, atomically (see docs/FORMAT.md).

The file is written under a temporary name beside the target and renamed only when complete,
so an interrupted or failed run never leaves a file that looks finished
(`jaccli.partial_file`: exclusive creation, disk-full and signal handling).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...errors import UsageError
from .encodings import encoding
from .format import FORMAT_NAME, FORMAT_VERSION, encode_attr
from .output_guard import check_output
from .partial_file import PartialFile
from .termination import deliver_pending, signals_as_exceptions

COMPRESSIONS = ("none", "gzip", "lzf")
CHUNK_BYTES = 1024 * 1024


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of about `CHUNK_BYTES`: whole samples when they fit, else rows of one sample."""
    per_sample = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    if per_sample <= CHUNK_BYTES:
        return (max(1, min(shape[0], CHUNK_BYTES // max(per_sample, 1))), *shape[1:])
    row = int(np.prod(shape[2:], dtype=np.int64)) * itemsize
    return (1, max(1, min(shape[1], CHUNK_BYTES // max(row, 1))), *shape[2:])


class ResultsWriter:
    """Creates the groups and datasets of one results file and fills them batch by batch.

    path: the final file name; the data first goes to `.NAME.partial-PID-RANDOM` in the same
        folder, created exclusively.
    compression: "none", "gzip" (level 0-9) or "lzf".
    """

    def __init__(self, path: str | Path, *, kind: str, sample_index: np.ndarray,
                 attrs: dict[str, Any], compression: str = "none",
                 compression_level: int | None = None):
        if compression not in COMPRESSIONS:
            raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}")
        self.path = Path(path)
        self.partial: PartialFile | None = None
        self.kind = kind
        self.sample_index = np.asarray(sample_index, dtype=np.int64)
        self.attrs = attrs
        self._filters: dict[str, Any] = {}
        if compression != "none":
            self._filters = {"compression": compression, "shuffle": True}
            if compression == "gzip" and compression_level is not None:
                self._filters["compression_opts"] = compression_level
        self._file: h5py.File | None = None
        self._order = 0

    def __enter__(self) -> ResultsWriter:
        check_output(self.path, ())
        self._signals = signals_as_exceptions()
        self._signals.__enter__()
        try:
            self.partial = PartialFile(self.path)
            self._file = h5py.File(self.partial.fileobj, "w", track_order=True)
            self._start()
            self.check()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        root = self._file
        root.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                           "kind": self.kind, "complete": False})
        root.attrs.update({k: encode_attr(v) for k, v in self.attrs.items()})
        samples = root.create_group("samples")
        samples.create_dataset("index", data=self.sample_index, maxshape=(None,))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._file is not None:
                file, self._file = self._file, None
                with contextlib.suppress(Exception):  # the error being raised is what counts
                    file.close()  # the partial file drops failed writes: HDF5 sees none
            if self.partial is not None and not self._finished:
                self.partial.discard()
        finally:
            self._signals.__exit__(None, None, None)

    def check(self) -> None:
        """Raise if a write has failed (disk full, ...) or a signal is waiting; call between
        writes to stop early."""
        if self.partial is not None:
            self.partial.raise_if_failed()
        deliver_pending()

    _finished = False

    @property
    def file(self) -> h5py.File:
        assert self._file is not None, "use ResultsWriter as a context manager"
        return self._file

    def create_group(self, name: str, *, parent: str, attrs: dict[str, Any]) -> h5py.Group:
        """The group for one result: a layer (`parent="layers"`: /layers/NAME), a parameter
        (`"params"`: /params/NAME) or the end-to-end result (`"end_to_end"`: /end_to_end).
        A parent group is created with its first member: a file without layers has no
        /layers."""
        self.check()
        if parent == "end_to_end":
            group = self.file.create_group("end_to_end")
        else:
            if parent not in self.file:
                self.file.create_group(parent, track_order=True)
            group = self.file[parent].create_group(name)
        kind = {"layers": "layer", "params": "param"}.get(parent, parent)
        group.attrs.update({"name": name, "kind": kind, "order": self._order})
        group.attrs.update({k: encode_attr(v) for k, v in attrs.items()})
        self._order += 1
        return group

    def create_dataset(self, group: h5py.Group, name: str, shape: tuple[int, ...],
                       dtype: np.dtype) -> h5py.Dataset:
        """A dataset with samples on its first axis: chunked, appendable, optionally compressed."""
        self.check()
        dtype = np.dtype(dtype)
        return group.create_dataset(name, shape=shape, dtype=dtype,
                                    chunks=chunk_shape(shape, dtype.itemsize),
                                    maxshape=(None, *shape[1:]), **self._filters)

    def create_encoded(self, group: h5py.Group, name: str, first: dict[str, np.ndarray],
                       n_samples: int) -> None:
        """The datasets of a Jacobian stored with encoding `name` (`encodings.ENCODINGS`):
        shared ones written from `first` now, per-sample ones sized for `n_samples`."""
        for field in encoding(name).fields:
            value = first[field.name]
            if field.shared:
                group.create_dataset(field.name, data=value)
            else:
                self.create_dataset(group, field.name, (n_samples, *value.shape[1:]),
                                    value.dtype)

    def create_shared_rows(self, group: h5py.Group, name: str, shape: tuple[int, int],
                           dtype: np.dtype, bands: Iterable[tuple[int, np.ndarray]]) -> None:
        """A shared dataset `(rows, columns)` written from `(first row, band)` pieces in
        order, so the whole never has to be in memory (chunked and filtered like the other
        datasets when compression is on)."""
        self.check()
        dtype = np.dtype(dtype)
        options = ({"chunks": chunk_shape(shape, dtype.itemsize), **self._filters}
                   if self._filters else {})
        dataset = group.create_dataset(name, shape=shape, dtype=dtype, **options)
        for first, band in bands:
            dataset[first:first + len(band)] = band

    @staticmethod
    def write_encoded(group: h5py.Group, name: str, start: int,
                      arrays: dict[str, np.ndarray]) -> None:
        """Write the per-sample datasets of `arrays` at samples `start:start + k`."""
        for field in encoding(name).per_sample:
            value = arrays[field]
            group[field][start:start + len(value)] = value

    def finish(self, attrs: dict[str, Any] | None = None) -> Path:
        """Record final attributes, close, and move the file to its final name."""
        self.check()
        self.file.attrs.update({k: encode_attr(v) for k, v in (attrs or {}).items()})
        self.file.attrs["complete"] = True
        self.file.close()
        self._file = None
        self.check()
        self.partial.commit()
        self._finished = True
        return self.path

