"""Decide, before anything runs, how each Jacobian is computed, what it costs in memory and
on disk, how many samples fit in a batch, and the generic path's chunk size. The plan is a
report: the pipelines act on it; planning changes nothing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..engine.generic import verification_cost
from ..errors import OutputError
from ..graph.structures import FORM_CHUNK
from ..io.results.encodings import stored_bytes
from ..io.results.output_guard import free_space, output_cap
from ..tracing.layers import Layer
from ..units import format_bytes
from .engines import END_TO_END, Engine
from .memory import MemoryPlan, Term

# A batch holds each per-sample Jacobian about three times over: as computed, as an
# intermediate of a product or a copy, and as the host array being written.
WORKING_COPIES = 3
# Forming a shared operator's matrix holds one chunk of its output (`FORM_CHUNK` values)
# and the op's workspace for it (a convolution's im2col: up to ~C_in·k² / C_out times more).
FORMING_WORKSPACE = 16
# Shared matrices are held once, plus what holding them costs the allocator (measured: ~1.5x
# on convolution stacks, whose matrices are formed column chunk by column chunk).
SHARED_COPIES = 1.5
# Of a CPU budget, the share kept for freed memory the allocator does not return (measured:
# up to ~30% on convolution stacks at small budgets).
RESERVE = 0.3
# Values per sample a generic-path basis vector keeps alive, in units of (D_in + D_out).
GENERIC_ACTIVATIONS = 4


@dataclass
class PlanEntry:
    """One Jacobian to compute: a layer's, the model's end-to-end one, or a parameter's.

    input_shape / output_shape: per-sample; the dense Jacobian is `(N, D_out, D_in)`.
    structure: its exact compact form (docs/FORMAT.md); rule: how it is differentiated.
    bytes_per_sample: stored bytes per sample; shared_bytes: stored once for all samples.
    members: the module names it spans; note: what else to know (several inputs, ...).
    """

    name: str
    type_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    rule: str
    structure: str
    mode: str
    bytes_per_sample: int
    shared_bytes: int = 0
    param_shape: tuple[int, ...] | None = None  # set for a parameter Jacobian
    entry_kind: str = "layer"
    members: tuple[str, ...] = ()
    note: str = ""

    @property
    def d_in(self) -> int:
        return math.prod(self.input_shape)

    @property
    def d_out(self) -> int:
        return math.prod(self.output_shape)

    @property
    def kind(self) -> str:
        return "param" if self.param_shape is not None else self.entry_kind


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
    store: str
    skipped: list[Layer] = field(default_factory=list)
    chain_costs: dict[str, float] | None = None
    chunk_size: int | None = None
    disk: DiskCheck | None = None  # set when an output file is planned
    engine: str = ""  # which engine (graph capture path, or hooks)
    engine_note: str = ""  # why
    memory: MemoryPlan | None = None  # what a batch holds, term by term

    @property
    def bytes_per_sample(self) -> int:
        return sum(e.bytes_per_sample for e in self.entries)

    @property
    def verification_cost(self) -> float | None:
        """The extra cost of checking the generic (torch.func) entries with jvp/vjp probes on
        one sample per batch, relative to computing them (None: no generic entry)."""
        generic = [e for e in self.entries if "generic" in e.rule]
        if not generic:
            return None
        return max(verification_cost(e.d_in, e.d_out, self.batch_size,
                                     e.mode if e.mode in ("fwd", "rev") else "auto")
                   for e in generic)

    @property
    def output_bytes(self) -> int:
        return self.bytes_per_sample * self.n_samples + sum(e.shared_bytes for e in self.entries)

    def to_dict(self) -> dict:
        return {
            "schema": "jaccli/plan", "schema_version": 1,
            "n_samples": self.n_samples, "batch_size": self.batch_size,
            "n_batches": -(-self.n_samples // self.batch_size),
            "memory_budget_bytes": self.budget, "memory_budget_source": self.budget_source,
            "device": self.device, "dtype": self.dtype, "chain": self.chain, "store": self.store,
            "engine": self.engine, "engine_note": self.engine_note,
            "generic_chunk_size": self.chunk_size,
            "bytes_per_sample": self.bytes_per_sample, "output_bytes": self.output_bytes,
            "end_to_end_chain_cost": self.chain_costs,
            "verification_cost": self.verification_cost,
            "entries": [{"name": e.name, "kind": e.kind, "type": e.type_name, "rule": e.rule,
                         "note": e.note, "modules": list(e.members),
                         "structure": e.structure, "mode": e.mode,
                         "input_shape": list(e.input_shape), "output_shape": list(e.output_shape),
                         "d_in": e.d_in, "d_out": e.d_out,
                         "bytes_per_sample": e.bytes_per_sample, "shared_bytes": e.shared_bytes}
                        for e in self.entries],
            "skipped": [{"name": s.name, "type": s.type_name, "reason": s.skip_reason}
                        for s in self.skipped],
            "output_cap_bytes": self.disk.cap if self.disk else None,
            "output_cap_source": self.disk.source if self.disk else None,
            "free_bytes": self.disk.free if self.disk else None,
            "memory": self.memory.to_dict(self.batch_size) if self.memory else None,
        }


@dataclass
class DiskCheck:
    """The room an output file may take: `cap` bytes (None: unknown) because of `source`,
    with `free` bytes free on its file system (None: unknown)."""

    cap: int | None
    source: str
    free: int | None


def check_disk(plan: Plan, output: Path, *, max_output: int | None, compressed: bool,
               suggestions: list[str]) -> DiskCheck:
    """Refuse, before any work, an output predicted to exceed its cap (`--max-output`, else
    the free space less a margin); `suggestions`: the options that would make it smaller.
    A compressed file is checked only against an explicit `--max-output`."""
    cap, source = output_cap(output, max_output)
    check = DiskCheck(cap, source, free_space(output))
    if cap is not None and plan.output_bytes > cap and (not compressed or max_output):
        largest = max(plan.entries, key=lambda e: e.bytes_per_sample * plan.n_samples
                      + e.shared_bytes)
        raise OutputError(
            f"{output} would take about {format_bytes(plan.output_bytes)} (largest: "
            f"{largest.name}), over {format_bytes(cap)} ({source}; "
            f"{format_bytes(check.free or 0)} free); make it smaller with "
            f"{', '.join(suggestions)}, or raise --max-output")
    return check


@dataclass
class InEffect:
    """The options of the run that shape its memory, so a refusal suggests only options that
    would change the term that does not fit (and none already in effect)."""

    store: str = "compact"
    granularity: str = "module"
    include_layers: bool = True
    end_to_end: bool = True
    dtype: str = "float32"
    writing: bool = False  # an output file: the writer's queue holds a batch
    reserve: int = 0  # bytes of freed memory the allocator keeps (CPU)


def allocator_reserve(device: torch.device, budget: int | None) -> int:
    """On CPU, the part of the budget set aside for memory the C allocator keeps after it is
    freed (fragmentation: resident, but not reusable for a larger block): `RESERVE` of it.
    The CUDA peak (`max_memory_allocated`) counts live tensors only: no reserve."""
    if device.type == "cuda":
        return 0
    from .resources import memory_budget

    return int(RESERVE * memory_budget(device, budget)[0])


def in_effect(settings, inputs, *, writing: bool) -> InEffect:
    """The options of `settings` (compute or spectrum) that shape the memory a batch holds."""
    layers = settings.layers
    return InEffect(store=getattr(settings, "store", "compact"),
                    granularity=layers.granularity,
                    include_layers=layers.include_layers and "inputs" in getattr(
                        settings, "wrt", ("inputs",)),
                    end_to_end=layers.end_to_end,
                    dtype=str(inputs.dtype).removeprefix("torch."), writing=writing,
                    reserve=allocator_reserve(inputs.device, settings.run.max_memory))


def make_plan(engine: Engine, *, n_samples: int, dtype: torch.dtype,
              device: torch.device, budget: int, budget_source: str, store: str = "compact",
              batch_size: int | None = None, extra: list[PlanEntry] | None = None,
              names: set[str] | None = None, in_effect: InEffect | None = None,
              extra_terms: list[Term] | None = None,
              baseline: tuple[int, str] = (0, "not measured")) -> Plan:
    """Plan a run of `engine` (plus `extra` entries, e.g. parameter Jacobians) over
    `n_samples` samples within `budget` bytes; `names` restricts it to those entries.

    The batch size is the largest whose memory terms (`memory_terms`, plus `extra_terms`
    from the caller: decompositions, Krylov bases) fit the budget; `baseline`: what the
    process held when planning (outside the budget, stated in the plan).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries = [PlanEntry(e.name, e.type_name, e.input_shape, e.output_shape, e.rule,
                         e.structure, e.mode,
                         *stored_bytes(e.structure, e.d_out, e.d_in, itemsize, store,
                                       kernel=getattr(e, "kernel", None)),
                         entry_kind=e.kind, members=e.members, note=e.note)
               for e in engine.entries]
    entries += extra or []
    if names is not None:
        entries = [e for e in entries if e.name in names]
    effect = in_effect or InEffect(store=store, dtype=str(dtype).removeprefix("torch."))
    terms = memory_terms(engine, entries, itemsize, effect,
                         names=names if names is not None else None) + (extra_terms or [])
    memory = MemoryPlan(terms, budget, budget_source, *baseline)
    batch_size = memory.fit(batch_size, n_samples)
    chunk_size = _generic_chunk_size(entries, batch_size, itemsize, budget)
    return Plan(entries, n_samples, batch_size, budget, budget_source, str(device),
                str(dtype).removeprefix("torch."), engine.chain, store,
                list(engine.skipped), engine.chain_costs, chunk_size, engine=engine.path,
                engine_note=engine.note, memory=memory)


def memory_terms(engine: Engine, entries: list[PlanEntry], itemsize: int, effect: InEffect,
                 names: set[str] | None = None) -> list[Term]:
    """What computing (and writing) one batch of `entries` holds, term by term.

    inputs: the batch as read (up to float64) and as a tensor; recorded activations: the
    forward pass's saved tensors and the per-op Jacobians kept for the batch; per-sample
    Jacobians: each entry's, `WORKING_COPIES` times (as computed, in a product, as copied);
    forming products: the widest intermediates of the end-to-end / block Jacobians;
    shared matrices: each shared Jacobian formed once (a convolution's matrix for its norm
    or a decomposition; written to a file, it is streamed a band at a time instead), and the
    largest one's identity-sized workspace while forming it; the writer's
    queue: one more batch of stored Jacobians in flight while the next is computed.
    """
    held = engine.held_values(names)
    d_in = math.prod(engine.input_shape)
    float32 = ["--dtype float32"] if effect.dtype == "float64" else []
    layers = ["--layers"] if effect.include_layers else []
    working = {e.name: _working_bytes(e, itemsize, effect.store) for e in entries}
    largest = max(entries, key=lambda e: working[e.name], default=None)
    per_sample_fixes = list(layers)
    if effect.store == "dense":
        per_sample_fixes.append("--store compact")
    if effect.granularity == "block" and effect.include_layers:
        per_sample_fixes.append("--granularity module")
    if largest is not None and largest.kind == "end_to_end":
        per_sample_fixes.append("--no-end-to-end")
    # A shared operator written in the compact store is streamed to the file a band of rows
    # at a time (`Operator.row_blocks`), its norm kept on the way: never held whole.
    streamed = effect.writing and effect.store == "compact"
    shared_entries = [e for e in entries if e.shared_bytes
                      and not (streamed and e.structure == "shared-operator")]
    # In memory a shared operator is its matrix once formed (a norm without a file, a
    # decomposition), whatever it takes on disk (a convolution: its kernel).
    held_shared = {e.name: (e.d_out * e.d_in * itemsize if e.structure == "shared-operator"
                            else e.shared_bytes) for e in shared_entries}
    # Forming the largest shared matrix (chunk and op workspace) and taking its norm (a
    # temporary as large as the matrix) happen one matrix at a time.
    forming = max(held_shared.values(), default=0) + (
        FORMING_WORKSPACE * FORM_CHUNK * itemsize if any(
            e.structure == "shared-operator" for e in entries) else 0)
    widest = max(held.accumulation.items(), key=lambda kv: kv[1], default=(None, 0))
    forming_fixes = (["--no-end-to-end"] if widest[0] == END_TO_END else list(layers))
    if effect.granularity == "block" and effect.include_layers:
        forming_fixes.append("--granularity module")
    shared_fixes = list(layers) + (["--no-layers"] if effect.include_layers
                                   and effect.end_to_end else [])
    largest_shared = max(shared_entries, key=lambda e: held_shared[e.name], default=None)
    terms = [
        Term("the inputs", 0, d_in * (itemsize + 8), f"({d_in} values a sample)", float32),
        Term("the recorded activations", 0, (held.recorded + held.units) * itemsize,
             "(the forward pass's saved tensors and per-op Jacobians)", float32),
        Term("the per-layer Jacobians", 0,
             WORKING_COPIES * sum(working.values()),
             f"(largest: {largest.name}, {largest.d_out} x {largest.d_in})" if largest else "",
             per_sample_fixes + float32),
        Term("the products forming end-to-end and block Jacobians", 0,
             max(held.accumulation.values(), default=0) * itemsize,
             f"(widest: {widest[0]})" if widest[0] else "", forming_fixes + float32),
        Term(f"the shared matrices of {len(shared_entries)} Jacobians",
             int(SHARED_COPIES * sum(held_shared.values())) + forming,
             0,
             f"(largest: {largest_shared.name}, {largest_shared.d_out} x "
             f"{largest_shared.d_in}, {format_bytes(held_shared[largest_shared.name])})"
             if largest_shared else "", shared_fixes + float32),
    ]
    if effect.reserve:
        terms.append(Term("the allocator's reserve", effect.reserve, 0,
                          "(freed memory the C allocator keeps)", []))
    if effect.writing:
        terms.append(Term("the writer's queue", 0, sum(e.bytes_per_sample for e in entries),
                          "(one more batch of Jacobians in flight)",
                          (["--store compact"] if effect.store == "dense" else [])
                          + layers + float32))
    return terms


def _generic_chunk_size(entries: list[PlanEntry], batch_size: int, itemsize: int,
                        budget: int) -> int | None:
    """Basis vectors the generic path differentiates at once (torch.func's `chunk_size`).

    Each one carries a cotangent (or tangent) through the layer for the whole batch: about
    `GENERIC_ACTIVATIONS * (D_in + D_out)` values per sample. None: all at once fits.
    """
    generic = [e for e in entries if "generic" in e.rule]
    if not generic:
        return None
    widest = max(e.d_in + e.d_out for e in generic)
    basis = max(min(e.d_in, e.d_out) if e.mode != "auto" else max(e.d_in, e.d_out)
                for e in generic)
    per_vector = GENERIC_ACTIVATIONS * widest * batch_size * itemsize
    chunk = max(1, budget // (WORKING_COPIES * per_vector))
    return None if chunk >= basis else int(chunk)


def _working_bytes(entry: PlanEntry, itemsize: int, store: str) -> int:
    """Bytes per sample held while computing: dense results are formed whole."""
    if store == "dense" or entry.structure == "dense":
        return entry.d_out * entry.d_in * itemsize
    return max(entry.bytes_per_sample, entry.d_out * itemsize)
