"""The results file's identity: format name and version, attribute encoding, and the checks a
reader makes before trusting a file (layout: docs/FORMAT.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ResultsFormatError

FORMAT_NAME = "jaccli-results"
FORMAT_VERSION = "1.1"


def encode_attr(value: Any) -> Any:
    """HDF5 attributes hold scalars, strings and arrays; store anything else as JSON text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # plain str: h5py cannot store str subclasses like TorchVersion
    if isinstance(value, (bool, int, float, np.generic)):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return np.asarray(value, dtype=np.int64)
    return json.dumps(value)


def decode_attr(value: Any) -> Any:
    """The Python value of an attribute written by `encode_attr`."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def check_format(attrs, path: Path) -> None:
    """Refuse files that are not jaccli results, of another major version, or unfinished."""
    if attrs.get("format") != FORMAT_NAME:
        raise ResultsFormatError(f"{path} is an HDF5 file but not a jaccli results file")
    version = str(attrs.get("format_version", "0"))
    major = FORMAT_VERSION.split(".")[0]
    if version.split(".")[0] != major:
        raise ResultsFormatError(
            f"{path} uses jaccli format version {version}; this jaccli reads {major}.x — "
            "install a jaccli version that matches")
    if not bool(attrs.get("complete", False)):
        raise ResultsFormatError(f"{path} is incomplete (the run that wrote it did not "
                                 "finish); compute it again")


def is_hdf5(path: Path) -> bool:
    """Whether the file at `path` starts with the HDF5 signature."""
    try:
        with Path(path).open("rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False
