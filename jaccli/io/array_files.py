"""Read `.npy`/`.npz` arrays without trusting their headers, and check dtypes of samples.

A header is parsed and checked (shape of non-negative integers, a numeric dtype, as many
data bytes as it declares) before anything is mapped or read, so a malformed or truncated
file is one clear error, and a `.npz` member claiming 10^12 rows is refused before any
allocation. `.npz` members are read lazily, row range by row range: `--limit 10` on a
member that inflates to gigabytes decompresses only the rows it uses.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import DataLoadError
from ..units import available_ram, format_bytes


def check_numeric(dtype: np.dtype, where: str) -> None:
    """Refuse dtypes that are not real numbers (integers, floats and booleans pass)."""
    kind = np.dtype(dtype).kind
    if kind in "biuf":
        return
    reasons = {"c": "complex numbers; jaccli needs real inputs (store the real and imaginary "
                    "parts as separate features, or the real part if that is what you mean)",
               "O": "Python objects, which need unpickling; store a numeric array",
               "U": "text, not numbers", "S": "bytes or text, not numbers",
               "V": "structured records, not a plain numeric array",
               "M": "dates, not numbers", "m": "time spans, not numbers"}
    raise DataLoadError(f"{where} holds {reasons.get(kind, f'values of type {dtype}')}")


def read_npy_header(stream: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Parse a `.npy` header from `stream`, leaving it at the first data byte.

    Returns (shape, fortran_order, dtype); raises DataLoadError for a malformed header or a
    non-numeric dtype.
    """
    from numpy.lib import format as npy_format

    try:
        version = npy_format.read_magic(stream)
        reader = (npy_format.read_array_header_1_0 if version == (1, 0)
                  else npy_format.read_array_header_2_0)
        shape, fortran_order, dtype = reader(stream)
    except Exception as exc:  # numpy raises ValueError, TokenError, SyntaxError, EOFError...
        raise DataLoadError(f"{where} is not a valid .npy file: its header cannot be parsed "
                            f"({type(exc).__name__})") from exc
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise DataLoadError(f"{where} is not a valid .npy file: its header declares the "
                            f"shape {shape}")
    check_numeric(dtype, where)
    return tuple(shape), bool(fortran_order), np.dtype(dtype)


def data_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of an array's data (exact Python integers: no overflow)."""
    return math.prod(shape) * np.dtype(dtype).itemsize


def open_npy(path: Path) -> np.ndarray:
    """A read-only memory map of the `.npy` file at `path`, after checking its header."""
    with path.open("rb") as f:
        shape, fortran_order, dtype = read_npy_header(f, str(path))
        offset = f.tell()
    declared, present = data_bytes(shape, dtype), path.stat().st_size - offset
    if present < declared:
        raise DataLoadError(f"{path} is truncated: its header declares {shape} {dtype} "
                            f"({format_bytes(declared)}) but the file holds "
                            f"{format_bytes(present)} of data")
    if declared == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran_order else "C")


def npy_from_bytes(raw: bytes, where: str) -> np.ndarray:
    """The array of a complete `.npy` byte string (standard input), checked like a file."""
    import io

    stream = io.BytesIO(raw)
    shape, fortran_order, dtype = read_npy_header(stream, where)
    declared, present = data_bytes(shape, dtype), len(raw) - stream.tell()
    if present < declared:
        raise DataLoadError(f"{where} is truncated: its header declares {shape} {dtype} "
                            f"({format_bytes(declared)}) but only {format_bytes(present)} "
                            "of data follow")
    flat = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def npz_keys(path: Path) -> list[str]:
    """The array names of a `.npz` file."""
    with _open_zip(path) as archive:
        return [n[:-4] for n in archive.namelist() if n.endswith(".npy")]


class NpzArray:
    """One array of a `.npz` file, read lazily along its first axis.

    shape and dtype come from the member's checked header; `array[a:b]` decompresses only
    up to row b (C order). A Fortran-order member is read whole once, if the memory budget
    allows.
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self._archive = _open_zip(path)
        where = f"{path} member {key!r}"
        try:
            self._info = self._archive.getinfo(f"{key}.npy")
            with self._archive.open(self._info) as member:
                self.shape, self._fortran, self.dtype = read_npy_header(member, where)
                self._offset = member.tell()
        except (zipfile.BadZipFile, OSError, EOFError, KeyError) as exc:
            raise DataLoadError(f"{where} cannot be read ({exc})") from exc
        declared = data_bytes(self.shape, self.dtype)
        present = self._info.file_size - self._offset
        if declared > present:
            raise DataLoadError(f"{where} declares {self.shape} {self.dtype} "
                                f"({format_bytes(declared)}) but holds "
                                f"{format_bytes(present)}; the file is truncated or corrupt")
        self._row_bytes = data_bytes(self.shape[1:], self.dtype)
        self._whole: np.ndarray | None = None
        self._member: IO[bytes] | None = None
        if self._fortran and len(self.shape) > 1:
            budget = int(available_ram() * 0.25)
            if declared > budget:
                raise DataLoadError(f"{where} is stored in Fortran order, so it must be read "
                                    f"whole: {format_bytes(declared)}, over the memory budget "
                                    f"of {format_bytes(budget)}; save it in C order "
                                    "(np.ascontiguousarray)")

    def __getitem__(self, item: slice) -> np.ndarray:
        start, stop, _ = item.indices(self.shape[0])
        stop = max(start, stop)
        if self._fortran and len(self.shape) > 1:
            return self._read_whole()[start:stop]
        count = (stop - start) * self._row_bytes
        raw = self._read(self._offset + start * self._row_bytes, count)
        return np.frombuffer(raw, dtype=self.dtype).reshape((stop - start, *self.shape[1:]))

    def _read_whole(self) -> np.ndarray:
        if self._whole is None:
            raw = self._read(self._offset, data_bytes(self.shape, self.dtype))
            self._whole = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape, order="F")
        return self._whole

    def _read(self, position: int, count: int) -> bytes:
        try:
            if self._member is None:
                self._member = self._archive.open(self._info)
            # Forward seeks decompress and discard; backward ones restart the member.
            self._member.seek(position)
            raw = self._member.read(count)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataLoadError(f"{self.path} member {self.key!r} cannot be read ({exc})") \
                from exc
        if len(raw) < count:
            raise DataLoadError(f"{self.path} member {self.key!r} is truncated")
        return raw


def tensor_to_numpy(tensor: Any, where: str) -> np.ndarray:
    """A torch tensor from a data file as a NumPy array: detached; float16 and bfloat16
    widened to float32 (exact); complex, quantized and sparse tensors refused."""
    import torch

    if tensor.layout != torch.strided or tensor.is_quantized:
        raise DataLoadError(f"{where} is a {str(tensor.layout).replace('torch.', '')} "
                            f"{'quantized ' if tensor.is_quantized else ''}tensor; save a "
                            "dense tensor (tensor.to_dense() / dequantize())")
    if tensor.is_complex():
        raise DataLoadError(f"{where} holds complex numbers; jaccli needs real inputs (store "
                            "the real and imaginary parts as separate features, or the real "
                            "part if that is what you mean)")
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.to(torch.float32)
    try:
        array = tensor.cpu().numpy()
    except (TypeError, RuntimeError) as exc:
        raise DataLoadError(f"{where} has dtype {tensor.dtype}, which jaccli cannot read; "
                            "save float32 or float64") from exc
    check_numeric(array.dtype, where)
    return array


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataLoadError(f"{path} is not a valid .npz file ({exc})") from exc
