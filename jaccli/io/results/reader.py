"""Read files written by jaccli (layout: docs/FORMAT.md); NumPy and h5py only."""

from __future__ import annotations

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
        """The stored arrays of samples `rows` (slice or positions) in their encoding."""
        return read_rows(self.group, self.encoding, rows)


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
        except ResultsFormatError:
            self.file.close()
            raise
        self.attrs = {k: decode_attr(v) for k, v in self.file.attrs.items()}
        self.sample_index = np.asarray(self.file["samples/index"])
        groups = [self._group(g) for g in self.file["layers"].values()]
        self.layers = sorted(groups, key=lambda g: g.attrs.get("order", 0))
        self.end_to_end = self._group(self.file["end_to_end"]) if "end_to_end" in self.file \
            else None
        self.params = sorted((self._group(g) for g in self.file["params"].values()),
                             key=lambda g: g.attrs.get("order", 0)) if "params" in self.file \
            else []

    def _group(self, group: h5py.Group) -> ResultGroup:
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

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_results(path: str | Path) -> Results:
    """Open a jaccli results file for reading; refuses unknown major versions."""
    return Results(path)
