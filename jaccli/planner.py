"""Decide, before anything runs, what each layer costs and how many samples fit in a batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .engine.generic import choose_mode
from .errors import OutOfMemoryError
from .layers import Layer, Trace
from .memory import format_bytes

# A batch holds each Jacobian about three times over: as computed, reshaped/copied on the
# device, and as the host array being written.
WORKING_COPIES = 3
MAX_AUTO_BATCH = 4096
END_TO_END = "(end-to-end)"


@dataclass
class PlanEntry:
    """One Jacobian to compute: a layer's, or the model's end-to-end one (`layer` None).

    input_shape / output_shape: per-sample; the Jacobian is `(N, D_out, D_in)`.
    """

    name: str
    type_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    mode: str
    bytes_per_sample: int
    layer: Layer | None = None

    @property
    def d_in(self) -> int:
        return _numel(self.input_shape)

    @property
    def d_out(self) -> int:
        return _numel(self.output_shape)

    @property
    def kind(self) -> str:
        return "end_to_end" if self.layer is None else "layer"


@dataclass
class Plan:
    """Everything a run will do, known before its first batch."""

    entries: list[PlanEntry]
    n_samples: int
    batch_size: int
    budget: int
    budget_source: str
    device: str
    dtype: str
    chain: bool
    skipped: list[Layer] = field(default_factory=list)

    @property
    def bytes_per_sample(self) -> int:
        return sum(e.bytes_per_sample for e in self.entries)

    @property
    def output_bytes(self) -> int:
        return self.bytes_per_sample * self.n_samples

    def to_dict(self) -> dict:
        return {
            "n_samples": self.n_samples, "batch_size": self.batch_size,
            "n_batches": -(-self.n_samples // self.batch_size),
            "memory_budget_bytes": self.budget, "memory_budget_source": self.budget_source,
            "device": self.device, "dtype": self.dtype, "chain": self.chain,
            "bytes_per_sample": self.bytes_per_sample, "output_bytes": self.output_bytes,
            "entries": [{"name": e.name, "kind": e.kind, "type": e.type_name,
                         "input_shape": list(e.input_shape), "output_shape": list(e.output_shape),
                         "d_in": e.d_in, "d_out": e.d_out, "mode": e.mode,
                         "bytes_per_sample": e.bytes_per_sample} for e in self.entries],
            "skipped": [{"name": s.name, "type": s.type_name, "reason": s.skip_reason}
                        for s in self.skipped],
        }


def make_plan(trace: Trace, *, n_samples: int, end_to_end: bool, include_layers: bool,
              dtype: torch.dtype, device: torch.device, budget: int, budget_source: str,
              batch_size: int | None = None, mode: str = "auto") -> Plan:
    """Plan a run over `n_samples` samples of the traced model within `budget` bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries = []
    if include_layers:
        for layer in trace.layers:
            entries.append(PlanEntry(layer.name, layer.type_name, layer.input_shape,
                                     layer.output_shape,
                                     choose_mode(layer.d_in, layer.d_out, mode),
                                     layer.d_in * layer.d_out * itemsize, layer))
    if end_to_end:
        d_in, d_out = _numel(trace.input_shape), _numel(trace.output_shape)
        entries.append(PlanEntry(END_TO_END, "model", trace.input_shape, trace.output_shape,
                                 choose_mode(d_in, d_out, mode), d_in * d_out * itemsize))
    per_sample = max(1, sum(e.bytes_per_sample for e in entries))
    largest = max(entries, key=lambda e: e.bytes_per_sample, default=None)
    if largest is not None and WORKING_COPIES * largest.bytes_per_sample > budget:
        raise OutOfMemoryError(
            f"the Jacobian of {largest.name} ({largest.d_out} x {largest.d_in}) takes "
            f"{format_bytes(largest.bytes_per_sample)} per sample, more than the memory budget "
            f"({format_bytes(budget)}, {budget_source}) allows; select other layers with "
            "--layers or raise --max-memory")
    if batch_size is None:
        batch_size = max(1, min(budget // (WORKING_COPIES * per_sample), MAX_AUTO_BATCH))
    batch_size = max(1, min(batch_size, n_samples))
    return Plan(entries, n_samples, batch_size, budget, budget_source, str(device),
                str(dtype).removeprefix("torch."), trace.chain, list(trace.skipped))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
