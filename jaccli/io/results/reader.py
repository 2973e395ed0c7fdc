"""Read files written by jaccli (layout: docs/FORMAT.md); NumPy and h5py only."""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...errors import ResultsFormatError
from .encodings import encoding, read_rows
from .format import check_format, decode_attr


@dataclass
class ResultGroup:
    """One layer's (or the end-to-end) results: attributes and lazily read datasets."""

    name: str
    kind: str
    attrs: dict[str, Any]
    group: h5py.Group

    @property
    def type_name(self) -> str:
        return str(self.attrs.get("type", ""))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.attrs.get("input_shape", ()))

    @property
    def output_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.attrs.get("output_shape", ()))

    def __contains__(self, dataset: str) -> bool:
        return dataset in self.group

    def __getitem__(self, dataset: str) -> h5py.Dataset:
        """The h5py dataset (read lazily; slice it, or use `np.asarray` for all of it)."""
        if dataset not in self.group:
            raise KeyError(f"{self.name} has no dataset {dataset!r}; it has "
                           f"{', '.join(self.group)}")
        return self.group[dataset]

    @property
    def encoding(self) -> str:
        return str(self.attrs.get("encoding", "dense"))

    @property
    def jacobian(self) -> JacobianView:
        """The per-sample Jacobians as a dense `(N, D_out, D_in)` view, read on demand."""
        return JacobianView(self)

    def compact(self, rows) -> dict[str, np.ndarray]:
        """The stored arrays of samples `rows` (slice or positions) in their encoding, checked
        (shapes, index ranges) against the group's `d_out` x `d_in`."""
        arrays = read_rows(self.group, self.encoding, rows)
        encoding(self.encoding).validate(arrays, int(self.attrs["d_out"]),
                                         int(self.attrs["d_in"]))
        return arrays


class JacobianView:
    """A dense `(N, D_out, D_in)` view of one stored Jacobian, whatever its encoding.

    Index it like an array along the sample axis (`view[3]`, `view[-1]`, `view[10:20]`,
    `view[[1, 5]]`, optionally followed by more indices); `np.asarray(view)` reads every
    sample. An index outside `[-N, N)` raises IndexError.
    """

    def __init__(self, group: ResultGroup):
        self.group = group
        self.encoding = encoding(group.encoding)
        self.n = group.group.file["samples/index"].shape[0]
        self.d_out, self.d_in = int(group.attrs["d_out"]), int(group.attrs["d_in"])
        self.dtype = np.dtype(str(group.group.file.attrs.get("dtype", "float32")))
        self.shape = (self.n, self.d_out, self.d_in)

    ndim = 3

    def __len__(self) -> int:
        return self.n

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, item) -> np.ndarray:
        first, rest = (item[0], item[1:]) if isinstance(item, tuple) else (item, ())
        if isinstance(first, (int, np.integer)):
            return self._read([self._position(first)])[0][rest]
        if isinstance(first, slice):
            rows = list(range(*first.indices(self.n)))
        else:
            rows = [self._position(i) for i in np.asarray(first).reshape(-1)]
        return self._read(rows)[(slice(None), *rest)]

    def _position(self, index) -> int:
        index = int(index)
        if not -self.n <= index < self.n:
            raise IndexError(f"sample {index} is out of range for {self.n} samples")
        return index % self.n

    def _read(self, rows: list[int]) -> np.ndarray:
        arrays = self.group.compact(rows)
        dense = self.encoding.densify(arrays, self.d_out, self.d_in, self.dtype)
        return np.broadcast_to(dense, (len(rows), self.d_out, self.d_in)).copy() \
            if dense.shape[0] != len(rows) else dense


class Results:
    """An open results file. Use as a context manager, or call `close()`.

    attrs: the root attributes (provenance: versions, command, hashes, device, dtype).
    sample_index: (N,) row numbers of the samples in the data file.
    layers: the per-layer groups in computation order; end_to_end: that group or None.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ResultsFormatError(f"results file not found: {self.path}")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise ResultsFormatError(f"{self.path} is not a readable HDF5 file ({exc})") from exc
        try:
            check_format(self.file.attrs, self.path)
            self.attrs = {k: decode_attr(v) for k, v in self.file.attrs.items()}
            self.sample_index = np.asarray(self.file["samples/index"], dtype=np.int64)
            groups = [self._group(g) for g in self.file["layers"].values()] \
                if "layers" in self.file else []  # none without layers (older files: empty)
            self.layers = sorted(groups, key=lambda g: g.attrs.get("order", 0))
            self.end_to_end = (self._group(self.file["end_to_end"])
                               if "end_to_end" in self.file else None)
            self.params = sorted((self._group(g) for g in self.file["params"].values()),
                                 key=lambda g: g.attrs.get("order", 0)) \
                if "params" in self.file else []
            self._check_lengths()
        except BaseException as exc:
            self.file.close()
            if isinstance(exc, ResultsFormatError) or not _from_h5py(exc):
                raise
            raise damaged(self.path, exc) from exc

    def _check_lengths(self) -> None:
        """Every per-sample dataset holds one row per sample of /samples/index."""
        if self.attrs.get("kind") not in ("jacobians", "spectra"):
            return
        n = len(self.sample_index)
        for group in self.groups():
            shared = (set(encoding(group.encoding).shared)
                      if self.attrs.get("kind") == "jacobians" else set())
            if self.attrs.get("kind") == "jacobians":
                missing = [f for f in encoding(group.encoding).per_sample + tuple(shared)
                           if f not in group.group]
                if missing:
                    raise ResultsFormatError(f"{self.path} is damaged: {group.name} has no "
                                             f"dataset {missing[0]!r}")
            for name, dataset in group.group.items():
                if name not in shared and (dataset.ndim == 0 or dataset.shape[0] != n):
                    raise ResultsFormatError(
                        f"{self.path} is damaged: {group.name}/{name} has shape "
                        f"{dataset.shape} for {n} samples")

    def _group(self, group: h5py.Group | None) -> ResultGroup:
        if not isinstance(group, h5py.Group):  # h5py yields None for a broken link
            raise ResultsFormatError(f"{self.path} is damaged: a result group cannot be read; "
                                     "compute it again")
        attrs = {k: decode_attr(v) for k, v in group.attrs.items()}
        return ResultGroup(str(attrs.get("name", group.name)), str(attrs.get("kind", "layer")),
                           attrs, group)

    @property
    def n_samples(self) -> int:
        return len(self.sample_index)

    def groups(self) -> list[ResultGroup]:
        """All result groups: the layers, the end-to-end one if present, the parameters."""
        return (self.layers + ([self.end_to_end] if self.end_to_end is not None else [])
                + self.params)

    def layer(self, name: str) -> ResultGroup:
        """The group of the layer called `name` ("end_to_end" for the end-to-end one)."""
        for group in self.groups():
            if group.name == name or (name == "end_to_end" and group.kind == "end_to_end"):
                return group
        names = ", ".join(g.name for g in self.groups())
        raise KeyError(f"no layer {name!r} in {self.path}; it has: {names}")

    def jacobian(self, name: str) -> np.ndarray:
        """All per-sample Jacobians of one layer as an array (N, D_out, D_in)."""
        return np.asarray(self.layer(name).jacobian)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Results:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close; a read of this file that h5py failed (corrupt bytes, a missing dataset)
        becomes one ResultsFormatError naming the file."""
        ours = (exc is not None and not isinstance(exc, ResultsFormatError)
                and _from_h5py(exc, self.file.filename))
        self.close()
        if ours:
            raise damaged(self.path, exc) from exc


def damaged(path: Path, exc: BaseException) -> ResultsFormatError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ResultsFormatError(f"{path} is damaged or was not written by jaccli ({text}); "
                              "compute it again")


def _from_h5py(exc: BaseException, filename: str | None = None) -> bool:
    """Whether `exc` was raised while h5py read a file (not by jaccli's own code) — the file
    called `filename`, when given and h5py's frames say which file they were reading."""
    if not isinstance(exc, (OSError, KeyError, ValueError, IndexError, TypeError)):
        return False
    inside, files = False, set()
    tb = exc.__traceback__
    while tb is not None:
        if "h5py" in tb.tb_frame.f_code.co_filename:
            inside = True
            owner = tb.tb_frame.f_locals.get("self")
            with suppress(Exception):  # not an h5py object, or one no longer open
                files.add(owner.file.filename)
        tb = tb.tb_next
    return inside and (filename is None or not files or filename in files)


def open_results(path: str | Path) -> Results:
    """Open a jaccli results file for reading; refuses unknown major versions."""
    return Results(path)
