"""Where each batch's Jacobians go: per-sample Frobenius norms for the summary, and (on a
writer thread) their host copies in the results file, encoded by the results codec."""

from __future__ import annotations

import h5py
import numpy as np
import torch

from ..engine.structures import Structured
from ..graph.algebra import SHARED_TAGS
from ..graph.storage import storable
from ..graph.structures import Operator
from ..io.results.background import BackgroundWriter
from ..io.results.format import encode_attr
from ..io.results.writer import ResultsWriter
from .planner import Plan, PlanEntry

# The results-file group each kind of plan entry goes under.
PARENTS = {"layer": "layers", "end_to_end": "end_to_end", "param": "params"}


class ResultSink:
    """Hands each batch's Jacobians to the writer thread: norms, host copies, HDF5 writes.

    writer: the open results file, or None to keep only the norms.
    norms: `{entry name: (N,) float64}`, filled in place.
    """

    def __init__(self, writer: ResultsWriter | None, plan: Plan, norms: dict[str, np.ndarray],
                 store: str, np_dtype):
        self.writer, self.plan, self.norms, self.store = writer, plan, norms, store
        self.np_dtype = np_dtype
        self.entries = {e.name: e for e in plan.entries}
        self.groups: dict[str, h5py.Group] = {}
        self.background = BackgroundWriter()

    def submit(self, start: int, count: int, results: dict[str, Structured]) -> None:
        """Queue the Jacobians of samples `start:start + count`."""
        for name, jac in results.items():
            self.background.submit(lambda n=name, j=jac: self._write(n, start, count, j))

    def close(self) -> None:
        """Wait for every queued write; raise the first error one of them hit."""
        self.background.close()

    def finish_groups(self, seconds: dict[str, float], routes: dict[str, str]) -> None:
        """Attributes known at the end: time spent, and the verified generic route (if any)
        that produced each entry (docs/FORMAT.md)."""
        for name, group in self.groups.items():
            group.attrs["seconds"] = seconds[name]
            group.attrs["generic_route"] = routes.get(name, "")

    def _write(self, name: str, start: int, count: int, jac: Structured) -> None:
        if self.writer is not None and self.store != "dense" and isinstance(jac, Operator):
            self._write_operator(name, start, count, jac)
            return
        frob = jac.frobenius(count).detach().to("cpu", torch.float64).numpy()
        self.norms[name][start:start + count] = frob
        if self.writer is None:
            return
        encoding, tensors = (("dense", {"jacobian": jac.dense(count)}) if self.store == "dense"
                             else storable(jac, count, per_sample=self.entries[name]
                                           .structure not in SHARED_TAGS))
        arrays = {key: _host(value, self.np_dtype) for key, value in tensors.items()}
        group = self.groups.get(name)
        if group is None:
            group = self._create(self.entries[name], encoding, arrays)
        elif group.attrs["encoding"] != encoding:
            raise RuntimeError(f"{name}: structure changed from {group.attrs['encoding']} "
                               f"to {encoding} between batches")
        self.writer.write_encoded(group, encoding, start, arrays)
        group["frobenius"][start:start + count] = frob
        self.writer.check()  # a full disk stops the run now, not after the last batch

    def _write_operator(self, name: str, start: int, count: int, jac: Operator) -> None:
        """A shared operator the first time: one convolution as its kernel and geometry (the
        `convolution` encoding); any other map (pooling, a chain) in the `shared` encoding,
        its matrix streamed to the file a band of rows at a time (`Operator.row_blocks`): it
        is never whole in memory."""
        entry = self.entries[name]
        conv = jac.convolution
        encoding = ("convolution" if conv is not None
                    and tuple(conv.input_shape) == tuple(entry.input_shape)
                    and tuple(conv.output_shape) == tuple(entry.output_shape) else "shared")
        group = self.groups.get(name)
        if group is None and encoding == "convolution":
            group = self._create(entry, encoding, {"kernel": _host(conv.weight, self.np_dtype)})
            group.attrs.update({k: encode_attr(v) for k, v in conv.attrs().items()})
        elif group is None:
            group = self._create(entry, "shared", None)
            self.writer.create_shared_rows(
                group, "matrix", (jac.d_out, jac.d_in), self.np_dtype,
                ((first, _host(band, self.np_dtype)) for first, band in jac.row_blocks()))
        elif group.attrs["encoding"] != encoding:
            raise RuntimeError(f"{name}: structure changed from {group.attrs['encoding']} "
                               f"to {encoding} between batches")
        frob = jac.frobenius(count).detach().to("cpu", torch.float64).numpy()
        self.norms[name][start:start + count] = frob
        group["frobenius"][start:start + count] = frob
        self.writer.check()

    def _create(self, entry: PlanEntry, encoding: str, arrays: dict | None) -> h5py.Group:
        writer = self.writer
        group = writer.create_group(entry.name, parent=PARENTS[entry.kind], attrs={
            "type": entry.type_name, "param_shape": list(entry.param_shape or ()),
            "modules": list(entry.members), "note": entry.note,
            "input_shape": list(entry.input_shape), "output_shape": list(entry.output_shape),
            "d_in": entry.d_in, "d_out": entry.d_out, "mode": entry.mode, "rule": entry.rule,
            "encoding": encoding})
        if arrays is not None:  # else the caller writes the datasets
            writer.create_encoded(group, encoding, arrays, self.plan.n_samples)
        writer.create_dataset(group, "frobenius", (self.plan.n_samples,), np.float64)
        self.groups[entry.name] = group
        return group


def _host(value: torch.Tensor, np_dtype) -> np.ndarray:
    host = value.detach().cpu().numpy()
    return host if host.dtype.kind in "iu" else host.astype(np_dtype, copy=False)
