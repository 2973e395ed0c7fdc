"""Read files written by jaccli (layout: docs/FORMAT.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ResultsFormatError
from .writer import FORMAT_NAME, FORMAT_VERSION


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
    def jacobian(self) -> h5py.Dataset:
        """The per-sample Jacobians, shape (N, D_out, D_in)."""
        return self["jacobian"]


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
            self._check_format()
        except ResultsFormatError:
            self.file.close()
            raise
        self.attrs = {k: _decode(v) for k, v in self.file.attrs.items()}
        self.sample_index = np.asarray(self.file["samples/index"])
        groups = [self._group(g) for g in self.file["layers"].values()]
        self.layers = sorted(groups, key=lambda g: g.attrs.get("order", 0))
        self.end_to_end = self._group(self.file["end_to_end"]) if "end_to_end" in self.file \
            else None

    def _check_format(self) -> None:
        attrs = self.file.attrs
        if attrs.get("format") != FORMAT_NAME:
            raise ResultsFormatError(f"{self.path} is an HDF5 file but not a jaccli results file")
        version = str(attrs.get("format_version", "0"))
        major = version.split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise ResultsFormatError(
                f"{self.path} uses jaccli format version {version}; this jaccli reads "
                f"{FORMAT_VERSION.split('.')[0]}.x — install a jaccli version that matches")
        if not bool(attrs.get("complete", False)):
            raise ResultsFormatError(f"{self.path} is incomplete (the run that wrote it did "
                                     "not finish); compute it again")

    def _group(self, group: h5py.Group) -> ResultGroup:
        attrs = {k: _decode(v) for k, v in group.attrs.items()}
        return ResultGroup(str(attrs.get("name", group.name)), str(attrs.get("kind", "layer")),
                           attrs, group)

    @property
    def n_samples(self) -> int:
        return len(self.sample_index)

    def groups(self) -> list[ResultGroup]:
        """All result groups: the layers, then the end-to-end one if present."""
        return self.layers + ([self.end_to_end] if self.end_to_end is not None else [])

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


def _decode(value: Any) -> Any:
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
