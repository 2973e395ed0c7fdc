"""The one codec for structured Jacobians on disk: each encoding's datasets, sizes and dense form.

A per-sample Jacobian `(D_out, D_in)` is stored in the exact compact form of its structure
(docs/FORMAT.md, "Jacobian encodings"). Per-sample datasets have the samples on their first
axis; shared datasets are stored once for all samples:

    dense            jacobian (N, D_out, D_in)
    shared           matrix (D_out, D_in)                       shared
    shared-diagonal  diagonal (D,)                              shared
    diagonal         diagonal (N, D)
    row-scaled       row_scale (N, D_out), matrix (D_out, D_in) shared
    selection        selection (N, D_out) int64: the input each output copies
    gather           gather_index (N, D_out) int64, gather_weight (N, D_out):
                     row o holds gather_weight[o] at column gather_index[o], zeros elsewhere
    shared-gather    gather_index (D_out,) int64, gather_weight (D_out,)      shared

The writer, the reader, `spectrum` of a results file, `diff` and the planner all use this
module (NumPy only, so reading results never imports torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import ResultsFormatError


@dataclass(frozen=True)
class Field:
    """One dataset of an encoding: its name, whether it is shared by all samples, its shape
    (per sample, or whole when shared) from `(D_out, D_in)`, and whether it holds indices."""

    name: str
    shared: bool
    shape: Callable[[int, int], tuple[int, ...]]
    integer: bool = False


@dataclass(frozen=True)
class Encoding:
    """How one structure is stored, and how to turn it back into dense matrices."""

    name: str
    fields: tuple[Field, ...]
    _densify: Callable[[dict[str, np.ndarray], int, int, np.dtype], np.ndarray]

    @property
    def per_sample(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if not f.shared)

    @property
    def shared(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.shared)

    def stored_bytes(self, d_out: int, d_in: int, itemsize: int) -> tuple[int, int]:
        """(bytes per sample, bytes stored once) on disk, uncompressed."""
        per_sample = shared = 0
        for f in self.fields:
            size = int(np.prod(f.shape(d_out, d_in), dtype=np.int64)) * (8 if f.integer
                                                                          else itemsize)
            if f.shared:
                shared += size
            else:
                per_sample += size
        return per_sample, shared

    def densify(self, arrays: dict[str, np.ndarray], d_out: int, d_in: int,
                dtype=np.float32) -> np.ndarray:
        """Dense `(k, D_out, D_in)` from `arrays`: per-sample fields with k rows, shared
        fields whole."""
        self.validate(arrays, d_out, d_in)
        return self._densify(arrays, d_out, d_in, np.dtype(dtype))

    def validate(self, arrays: dict[str, np.ndarray], d_out: int, d_in: int) -> None:
        """Refuse arrays that are not this encoding of a `(D_out, D_in)` Jacobian: missing,
        misshapen, or (index fields) pointing outside `[0, D_in)`."""
        missing = [f.name for f in self.fields if f.name not in arrays]
        if missing:
            raise ResultsFormatError(f"{self.name} Jacobian is missing dataset(s) "
                                     f"{', '.join(missing)}")
        for f in self.fields:
            value = arrays[f.name]
            expected = f.shape(d_out, d_in)
            actual = value.shape if f.shared else value.shape[1:]
            if tuple(actual) != tuple(expected):
                raise ResultsFormatError(f"{self.name} dataset {f.name} has shape "
                                         f"{tuple(value.shape)}; expected "
                                         f"{'' if f.shared else '(N, '}{expected}")
            if f.integer and value.size and (value.min() < 0 or value.max() >= d_in):
                raise ResultsFormatError(f"{self.name} dataset {f.name} holds indices out of "
                                         f"range [0, {d_in})")

    def rows(self, arrays: dict[str, np.ndarray]) -> int:
        """How many samples the per-sample fields of `arrays` hold."""
        return next(len(arrays[name]) for name in self.per_sample)


def _dense(a, d_out, d_in, dtype):
    return np.asarray(a["jacobian"], dtype=dtype)


def _shared(a, d_out, d_in, dtype):
    return np.asarray(a["matrix"], dtype=dtype)[None]


def _shared_diagonal(a, d_out, d_in, dtype):
    return np.diag(np.asarray(a["diagonal"], dtype=dtype))[None]


def _diagonal(a, d_out, d_in, dtype):
    diag = np.asarray(a["diagonal"], dtype=dtype)
    out = np.zeros((len(diag), d_out, d_in), dtype)
    out[:, np.arange(d_out), np.arange(d_in)] = diag
    return out


def _row_scaled(a, d_out, d_in, dtype):
    return (np.asarray(a["row_scale"], dtype=dtype)[:, :, None]
            * np.asarray(a["matrix"], dtype=dtype)[None])


def _selection(a, d_out, d_in, dtype):
    index = np.asarray(a["selection"], dtype=np.int64)
    out = np.zeros((len(index), d_out, d_in), dtype)
    np.put_along_axis(out, index[:, :, None], 1.0, axis=2)
    return out


def _gather(a, d_out, d_in, dtype):
    index = np.asarray(a["gather_index"], dtype=np.int64)
    weight = np.asarray(a["gather_weight"], dtype=dtype)
    if index.ndim == 1:  # shared
        index, weight = index[None], weight[None]
    out = np.zeros((len(index), d_out, d_in), dtype)
    np.put_along_axis(out, index[:, :, None], weight[:, :, None], axis=2)
    return out


ENCODINGS: dict[str, Encoding] = {e.name: e for e in (
    Encoding("dense", (Field("jacobian", False, lambda o, i: (o, i)),), _dense),
    Encoding("shared", (Field("matrix", True, lambda o, i: (o, i)),), _shared),
    Encoding("shared-diagonal", (Field("diagonal", True, lambda o, i: (o,)),),
             _shared_diagonal),
    Encoding("diagonal", (Field("diagonal", False, lambda o, i: (o,)),), _diagonal),
    Encoding("row-scaled", (Field("row_scale", False, lambda o, i: (o,)),
                            Field("matrix", True, lambda o, i: (o, i))), _row_scaled),
    Encoding("selection", (Field("selection", False, lambda o, i: (o,), integer=True),),
             _selection),
    Encoding("gather", (Field("gather_index", False, lambda o, i: (o,), integer=True),
                        Field("gather_weight", False, lambda o, i: (o,))), _gather),
    Encoding("shared-gather", (Field("gather_index", True, lambda o, i: (o,), integer=True),
                               Field("gather_weight", True, lambda o, i: (o,))), _gather),
)}
# Structures stored in another structure's encoding: an identity as a diagonal of ones,
# shared maps known only by how they act (or as Kronecker products) as their one matrix,
# per-sample Kronecker products as dense matrices.
STORED_AS = {"identity": "shared-diagonal", "shared-operator": "shared",
             "shared-kronecker": "shared", "kronecker": "dense"}


def encoding(name: str) -> Encoding:
    """The encoding called `name`; an unknown one means a newer writer."""
    if name not in ENCODINGS:
        raise ResultsFormatError(f"unknown Jacobian encoding {name!r}; upgrade jaccli")
    return ENCODINGS[name]


def stored_bytes(structure: str, d_out: int, d_in: int, itemsize: int,
                 store: str = "compact") -> tuple[int, int]:
    """(bytes per sample, bytes shared by all samples) of one Jacobian on disk; a structure
    with no compact encoding, or `store="dense"`, is stored densely."""
    name = STORED_AS.get(structure, structure)
    name = name if store == "compact" and name in ENCODINGS else "dense"
    return ENCODINGS[name].stored_bytes(d_out, d_in, itemsize)


def read_rows(group, name: str, rows: Sequence[int] | slice) -> dict[str, np.ndarray]:
    """The arrays of `group` (an h5py group) stored with encoding `name`: the per-sample
    datasets at `rows` (a slice, or any list of sample positions), the shared ones whole."""
    arrays = {}
    for f in encoding(name).fields:
        if f.name not in group:
            raise ResultsFormatError(f"{group.file.filename}: {group.name}: {name} Jacobian is "
                                     f"missing dataset {f.name!r}")
        dataset = group[f.name]
        arrays[f.name] = dataset[()] if f.shared else _take(dataset, rows)
    return arrays


def _take(dataset, rows: Sequence[int] | slice) -> np.ndarray:
    """`dataset[rows]` for a slice or any list of positions (h5py wants them sorted, unique)."""
    if isinstance(rows, slice):
        return np.asarray(dataset[rows])
    rows = list(rows)
    if not rows:
        return np.zeros((0, *dataset.shape[1:]), dataset.dtype)
    unique, inverse = np.unique(rows, return_inverse=True)
    if unique[0] < 0 or unique[-1] >= dataset.shape[0]:
        raise IndexError(f"sample position out of range [0, {dataset.shape[0]})")
    if unique[-1] - unique[0] + 1 == len(unique):
        block = dataset[int(unique[0]):int(unique[-1]) + 1]
    else:
        block = dataset[unique.tolist()]
    return np.asarray(block)[inverse]
