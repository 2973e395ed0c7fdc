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
    convolution      kernel (C_out, C_in/groups, *k) shared, and the geometry as attributes
                     (stride, padding, dilation, groups, transposed, output_padding,
                     input_shape, output_shape): J is that convolution (bias dropped)

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
    (per sample, or whole when shared) from `(D_out, D_in)` — None where the encoding's own
    check fixes it (a convolution's kernel) — and whether it holds indices."""

    name: str
    shared: bool
    shape: Callable[[int, int], tuple[int, ...]] | None
    integer: bool = False


@dataclass(frozen=True)
class Encoding:
    """How one structure is stored, and how to turn it back into dense matrices."""

    name: str
    fields: tuple[Field, ...]
    _densify: Callable[[dict[str, np.ndarray], int, int, np.dtype], np.ndarray]
    # Group attributes the encoding needs besides its datasets (read into the arrays), and
    # the check of the arrays beyond the fields' shapes.
    attributes: tuple[str, ...] = ()
    _check: Callable[[dict[str, np.ndarray], int, int], None] | None = None

    @property
    def per_sample(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if not f.shared)

    @property
    def shared(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.shared)

    def stored_bytes(self, d_out: int, d_in: int, itemsize: int,
                     sizes: dict[str, int] | None = None) -> tuple[int, int]:
        """(bytes per sample, bytes stored once) on disk, uncompressed. sizes: the number of
        values of the fields whose shape is not fixed by `(D_out, D_in)` (a kernel)."""
        per_sample = shared = 0
        for f in self.fields:
            count = ((sizes or {})[f.name] if f.shape is None
                     else int(np.prod(f.shape(d_out, d_in), dtype=np.int64)))
            size = count * (8 if f.integer else itemsize)
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
        missing = [name for name in self.attributes if name not in arrays]
        if missing:
            raise ResultsFormatError(f"{self.name} Jacobian is missing attribute(s) "
                                     f"{', '.join(missing)}")
        for f in self.fields:
            value = arrays[f.name]
            if f.shape is None:
                continue
            expected = f.shape(d_out, d_in)
            actual = value.shape if f.shared else value.shape[1:]
            if tuple(actual) != tuple(expected):
                raise ResultsFormatError(f"{self.name} dataset {f.name} has shape "
                                         f"{tuple(value.shape)}; expected "
                                         f"{'' if f.shared else '(N, '}{expected}")
            if f.integer and value.size and (value.min() < 0 or value.max() >= d_in):
                raise ResultsFormatError(f"{self.name} dataset {f.name} holds indices out of "
                                         f"range [0, {d_in})")
        if self._check is not None:
            self._check(arrays, d_out, d_in)

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


def _geometry(a) -> dict:
    """The convolution attributes of `a` as ints (spatial settings: tuples)."""
    out = {name: tuple(int(v) for v in np.asarray(a[name]).reshape(-1))
           for name in ("stride", "padding", "dilation", "output_padding", "input_shape",
                        "output_shape")}
    out["groups"] = int(np.asarray(a["groups"]).reshape(-1)[0])
    out["transposed"] = bool(np.asarray(a["transposed"]).reshape(-1)[0])
    return out


def _check_convolution(a, d_out, d_in):
    """The kernel and geometry describe one convolution from `(D_in,)` to `(D_out,)`: the
    channel counts agree with the kernel, and each spatial output size is the convolution's."""
    g, kernel = _geometry(a), np.asarray(a["kernel"])
    in_shape, out_shape, groups = g["input_shape"], g["output_shape"], g["groups"]
    dims = kernel.ndim - 2
    problem = None
    if dims < 1 or len(in_shape) != dims + 1 or len(out_shape) != dims + 1:
        problem = f"kernel {kernel.shape} does not match shapes {in_shape} -> {out_shape}"
    elif any(len(g[k]) != dims for k in ("stride", "padding", "dilation", "output_padding")):
        problem = "stride, padding, dilation and output_padding need one value per dimension"
    elif groups < 1 or min(g["stride"] + g["dilation"]) < 1 or min(g["padding"]) < 0:
        problem = "groups, stride and dilation must be at least 1, padding at least 0"
    elif np.prod(in_shape) != d_in or np.prod(out_shape) != d_out:
        problem = f"shapes {in_shape} -> {out_shape} are not {d_in} -> {d_out} values"
    else:
        channels = ((kernel.shape[0], kernel.shape[1] * groups) if g["transposed"]
                    else (kernel.shape[1] * groups, kernel.shape[0]))
        spatial = _transposed_size if g["transposed"] else _forward_size
        sizes = tuple(spatial(n, k, s, p, d, q) for n, k, s, p, d, q in zip(
            in_shape[1:], kernel.shape[2:], g["stride"], g["padding"], g["dilation"],
            g["output_padding"], strict=True))
        if (in_shape[0], out_shape[0]) != channels or kernel.shape[0] % groups or \
                sizes != tuple(out_shape[1:]):
            problem = (f"kernel {kernel.shape} (groups {groups}) does not map {in_shape} to "
                       f"{out_shape}")
    if problem:
        raise ResultsFormatError(f"convolution Jacobian: {problem}")


def _forward_size(n, k, s, p, d, q):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _transposed_size(n, k, s, p, d, q):
    return (n - 1) * s - 2 * p + d * (k - 1) + q + 1


def _convolution(a, d_out, d_in, dtype):
    """`(1, D_out, D_in)`: J of the convolution; a transposed one is the transpose of the
    forward convolution (same kernel) from its output space to its input space."""
    g = _geometry(a)
    kernel = np.asarray(a["kernel"], dtype=dtype)
    if g["transposed"]:
        return _conv_matrix(kernel, g, g["output_shape"], g["input_shape"], dtype).T[None]
    return _conv_matrix(kernel, g, g["input_shape"], g["output_shape"], dtype)[None]


def _conv_matrix(kernel, g, in_shape, out_shape, dtype) -> np.ndarray:
    """`(prod out_shape, prod in_shape)` of the forward convolution `kernel (C_o, C_i/G, *k)`:
    row (o, p) holds kernel[o, c, t] at column (⌊o / (C_o/G)⌋·C_i/G + c, p·s − pad + t·dil)
    for every tap t landing inside the input (row-major flattening)."""
    c_out, c_in_group = kernel.shape[:2]
    s_in, s_out = tuple(in_shape[1:]), tuple(out_shape[1:])
    p_in, p_out = int(np.prod(s_in)), int(np.prod(s_out))
    out = np.zeros((c_out * p_out, c_in_group * g["groups"] * p_in), dtype)
    o = np.arange(c_out)[:, None, None]
    c = (o // (c_out // g["groups"])) * c_in_group + np.arange(c_in_group)[None, :, None]
    for tap in np.ndindex(*kernel.shape[2:]):
        inside = []
        for n_out, n_in, t, s, p, d in zip(s_out, s_in, tap, g["stride"], g["padding"],
                                           g["dilation"], strict=True):
            q = np.arange(n_out) * s - p + t * d
            keep = (q >= 0) & (q < n_in)
            inside.append((np.nonzero(keep)[0], q[keep]))
        if any(len(p) == 0 for p, _ in inside):
            continue
        rows = np.ravel_multi_index(np.meshgrid(*[p for p, _ in inside], indexing="ij"),
                                    s_out).reshape(-1)
        cols = np.ravel_multi_index(np.meshgrid(*[q for _, q in inside], indexing="ij"),
                                    s_in).reshape(-1)
        weight = kernel[(slice(None), slice(None), *tap)][:, :, None]
        shape = (c_out, c_in_group, len(rows))
        out[np.broadcast_to(o * p_out + rows[None, None], shape),
            np.broadcast_to(c * p_in + cols[None, None], shape)] = np.broadcast_to(weight, shape)
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
    Encoding("convolution", (Field("kernel", True, None),), _convolution,
             attributes=("stride", "padding", "dilation", "groups", "transposed",
                         "output_padding", "input_shape", "output_shape"),
             _check=_check_convolution),
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
                 store: str = "compact", kernel: int | None = None) -> tuple[int, int]:
    """(bytes per sample, bytes shared by all samples) of one Jacobian on disk; a structure
    with no compact encoding, or `store="dense"`, is stored densely. kernel: the number of
    weight values of a shared operator that is one convolution (stored as its kernel)."""
    name = STORED_AS.get(structure, structure)
    if structure in ("shared-operator", "convolution") and kernel is not None:
        name = "convolution"
    name = name if store == "compact" and name in ENCODINGS else "dense"
    return ENCODINGS[name].stored_bytes(d_out, d_in, itemsize, {"kernel": kernel or 0})


def read_rows(group, name: str, rows: Sequence[int] | slice) -> dict[str, np.ndarray]:
    """The arrays of `group` (an h5py group) stored with encoding `name`: the per-sample
    datasets at `rows` (a slice, or any list of sample positions), the shared ones whole."""
    arrays = {}
    for attribute in encoding(name).attributes:
        if attribute not in group.attrs:
            raise ResultsFormatError(f"{group.file.filename}: {group.name}: {name} Jacobian is "
                                     f"missing attribute {attribute!r}")
        arrays[attribute] = np.asarray(group.attrs[attribute])
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
