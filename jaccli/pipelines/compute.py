"""The `compute` pipeline: load -> plan -> engine (and parameter Jacobians) -> writer / summary."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.structures import Matrix, Structured
from ..errors import OutOfMemoryError, UsageError, is_out_of_memory
from ..graph.params import select_parameters
from ..io.data import DataSource
from ..io.results.writer import ResultsWriter
from ..params.jacobians import ParamInfo, param_jacobians, select_params
from ..params.objectives import check_targets, objective
from ..reports.summary import EntrySummary, Summary
from ..settings import ComputeSettings
from .common import (
    Inputs,
    check_independence,
    guard_output,
    load,
    load_inputs,
    load_targets,
    provenance,
    to_tensor,
)
from .engines import Engine, GraphRun, make_engine
from .planner import Plan, PlanEntry, check_disk, in_effect, make_plan
from .resources import (
    baseline_memory,
    check_trace_fits,
    memory_budget,
    resolve_device,
    resolve_dtype,
    tf32_mode,
)
from .sink import ResultSink

FLATTENED = "(flattened)"


@dataclass
class ParamTarget:
    """One selected parameter: qualified name, shape, owner's type, and how it is done."""

    name: str
    shape: tuple[int, ...]
    owner: str
    rule: str


@dataclass
class ParamSetup:
    """What `--wrt params` differentiates: the parameters, the objective, the targets.
    modules: the module-level selection when the run has no operator graph."""

    params: list[ParamTarget]
    objective: Callable
    targets: DataSource | None
    outputs: int  # C: per-sample outputs of the objective (1 for a scalar)
    modules: list[ParamInfo] | None = None


@dataclass
class Prepared:
    """Checked inputs, the engine and the plan for running over them."""

    settings: ComputeSettings
    inputs: Inputs
    engine: Engine
    plan: Plan
    param_setup: ParamSetup | None = None


def prepare(settings: ComputeSettings) -> Prepared:
    """Load and check the inputs, build the engine, and plan the run."""
    s = settings
    if "params" not in s.wrt and (s.params.loss or s.params.targets or s.params.patterns
                                  or s.params.output_index is not None or s.params.flatten):
        raise UsageError("--params, --loss, --targets, --output-index and --flatten go with "
                         "--wrt params")
    if "inputs" in s.wrt and not s.layers.include_layers and not s.layers.end_to_end:
        raise UsageError("nothing to compute: --no-layers and --no-end-to-end together")
    guard_output(s.output, s.model, s.data, s.params.targets)
    inputs = load_inputs(s.model, s.data, s.run)
    engine = make_engine(inputs, s.layers, s.run, inputs_wrt="inputs" in s.wrt)
    setup = _param_setup(s, inputs, engine) if "params" in s.wrt else None
    budget, source = memory_budget(inputs.device, s.run.max_memory)
    plan = make_plan(engine, n_samples=len(inputs.data), dtype=inputs.dtype,
                     device=inputs.device, budget=budget, budget_source=source, store=s.store,
                     batch_size=s.run.batch_size, extra=_param_entries(s, setup, inputs.dtype),
                     in_effect=in_effect(s, inputs, writing=s.output.path is not None),
                     baseline=baseline_memory(inputs.device))
    if s.output.path is not None:
        plan.disk = check_disk(plan, s.output.path, max_output=s.output.max_output,
                               compressed=s.output.compression != "none",
                               suggestions=_smaller_output(s))
    check_independence(inputs, plan.batch_size)
    return Prepared(s, inputs, engine, plan, setup)


def _smaller_output(settings: ComputeSettings) -> list[str]:
    """The options that would shrink this run's output file."""
    options = ["--layers", "--limit"]
    if settings.store == "dense":
        options.append("--store compact")
    if settings.layers.granularity == "module" and settings.layers.include_layers:
        options.append("--granularity block")
    if settings.layers.end_to_end:
        options.append("--no-end-to-end")
    return options + ["--compression gzip", "`jaccli spectrum` (spectra, not Jacobians)"]


def _param_setup(settings: ComputeSettings, inputs: Inputs, engine: Engine) -> ParamSetup:
    options = settings.params
    if options.loss is not None and options.targets is None:
        raise UsageError("--loss needs --targets FILE")
    targets = None
    if options.targets is not None:
        if options.loss is None:
            raise UsageError("--targets needs --loss (cross-entropy, nll, mse, bce-logits)")
        targets = load_targets(options.targets, options.targets_key, settings.data,
                               len(inputs.data))
    fn = objective(output_index=options.output_index, loss=options.loss)
    example = to_tensor(inputs.data.read(0, 1), inputs.device, inputs.dtype)
    with torch.no_grad():
        output = inputs.model(example)
    example_targets = None
    if targets is not None:
        check_targets(options.loss, targets.read(0, len(targets)), tuple(output.shape[1:]))
        example_targets = torch.from_numpy(np.array(targets.read(0, 1))).to(inputs.device)
    with torch.no_grad():
        value = fn(output, example_targets)
    outputs = 1 if value.ndim == 1 else value.shape[1]
    if isinstance(engine, GraphRun):
        graph = engine.graph
        chosen = select_parameters(graph, options.patterns)
        order = {name: i for i, (name, _) in enumerate(inputs.model.named_parameters())}
        params = [ParamTarget(q, tuple(graph.state[node][1].shape), _owner(inputs, q),
                              "per-op rules")
                  for q, node in sorted(chosen.items(), key=lambda c: order.get(c[0], 1e9))]
        return ParamSetup(params, fn, targets, outputs)
    modules = select_params(inputs.model, options.patterns)
    params = [ParamTarget(p.name, p.shape, type(p.module).__name__,
                          "outer product" if p.structured else "generic") for p in modules]
    return ParamSetup(params, fn, targets, outputs, modules)


def _owner(inputs: Inputs, qualified: str) -> str:
    """The class of the module holding parameter `qualified`, when the module tree says."""
    owner = qualified.rpartition(".")[0]
    try:
        module = inputs.model.get_submodule(owner) if owner else inputs.model
    except AttributeError:
        return "?"
    return getattr(module, "original_name", None) or type(module).__name__


def _param_entries(settings: ComputeSettings, setup: ParamSetup | None,
                   dtype: torch.dtype) -> list[PlanEntry]:
    if setup is None:
        return []
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries = [PlanEntry(p.name, f"param of {p.owner}", p.shape, (setup.outputs,), p.rule,
                         "dense", "rev" if p.rule == "generic" else "-",
                         setup.outputs * math.prod(p.shape) * itemsize, param_shape=p.shape)
               for p in setup.params]
    if settings.params.flatten:
        total = sum(math.prod(p.shape) for p in setup.params)
        entries.append(PlanEntry(FLATTENED, "all selected parameters", (total,),
                                 (setup.outputs,), "concatenated", "dense", "-",
                                 setup.outputs * total * itemsize, param_shape=(total,)))
    return entries


def inspect_model(settings: ComputeSettings, input_shape: tuple[int, ...] | None) -> Plan:
    """Plan for `settings` without computing: the layers, their rules, shapes and sizes.

    The input shape comes from `input_shape`, else from the data file (may be absent), else
    from the model file; the model runs once on zeros of that shape.
    """
    from ..io.data import load_data

    device, dtype = resolve_device(settings.run.device), resolve_dtype(settings.run.dtype)
    loaded = load(settings.model)
    n_samples = 1
    selection = settings.data
    if input_shape is None and selection.path is not None:
        data = load_data(selection.path, key=selection.key, offset=selection.offset,
                         limit=selection.limit)
        data.match_input_shape(loaded.input_shape)
        input_shape, n_samples = data.sample_shape, len(data)
    input_shape = input_shape or loaded.input_shape
    if input_shape is None:
        raise UsageError("the model file does not declare its input shape; pass --input-shape "
                         "(e.g. 1,28,28) or --data FILE")
    budget, source = memory_budget(device, settings.run.max_memory)
    check_trace_fits(tuple(input_shape), torch.empty((), dtype=dtype).element_size(), budget,
                     source)
    model = loaded.module.to(device=device, dtype=dtype).requires_grad_(False)
    example = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    inputs = Inputs(settings.model, loaded, None, model, device, dtype, example)
    engine = make_engine(inputs, settings.layers, settings.run, n_samples=n_samples)
    return make_plan(engine, n_samples=n_samples, dtype=dtype, device=device, budget=2**62,
                     budget_source="not applied by inspect", store=settings.store,
                     batch_size=settings.run.batch_size or 1)


class _Batching:
    """The batch size in use: the plan's, halved for the rest of the run after running out
    of memory; the file records the size actually used."""

    def __init__(self, size: int):
        self.size = size


def run_compute(settings: ComputeSettings, *, on_batch: Callable[[int], None] | None = None,
                prepared: Prepared | None = None) -> Summary:
    """Compute every planned Jacobian for every sample; write them if an output is set.

    on_batch: called with the number of samples after each batch (for progress bars).
    """
    started = time.perf_counter()
    p = prepared or prepare(settings)
    plan, inputs, output = p.plan, p.inputs, settings.output
    data = inputs.data
    norms = {e.name: np.full(len(data), np.nan) for e in plan.entries}
    seconds = dict.fromkeys(norms, 0.0)
    layers = settings.layers
    writer = (ResultsWriter(
        output.path, kind="jacobians", sample_index=data.indices,
        attrs=provenance(settings.command_line, inputs, tf32=bool(
            settings.run.tf32 and inputs.device.type == "cuda"), store=settings.store,
            granularity=layers.granularity if layers.include_layers else "",
            chain=plan.chain, engine=plan.engine, engine_note=plan.engine_note),
        compression=output.compression, compression_level=output.compression_level)
        if output.path is not None else nullcontext())
    batching = _Batching(plan.batch_size)
    with writer, tf32_mode(settings.run.tf32):
        sink = ResultSink(writer if output.path else None, plan, norms, settings.store,
                          np.float64 if inputs.dtype == torch.float64 else np.float32)
        try:
            for start, x in _batches(data, batching, inputs):
                for part in _compute_batch(p, start, x, batching):
                    part_start, count, results, spent = part
                    for name, value in spent.items():
                        seconds[name] += value
                    sink.submit(part_start, count, results)
                    if on_batch is not None:
                        on_batch(count)
        finally:
            sink.close()
        if output.path is not None:
            sink.finish_groups(seconds, {e.name: p.engine.route_of(e.name)
                                         for e in plan.entries})
            writer.finish({"seconds": time.perf_counter() - started,
                           "batch_size": batching.size})
    entries = [EntrySummary.from_norms(name=e.name, kind=e.kind, type_name=e.type_name,
                                       d_in=e.d_in, d_out=e.d_out, frobenius=norms[e.name],
                                       seconds=seconds[e.name], structure=e.structure,
                                       rule=e.rule, note=e.note) for e in plan.entries]
    return Summary(
        model=str(settings.model.path), model_format=inputs.loaded.source,
        data=str(settings.data.path), n_samples=len(data), device=plan.device,
        dtype=plan.dtype, granularity=layers.granularity, batch_size=batching.size,
        chain=plan.chain, entries=entries, engine=plan.engine,
        skipped=[{"name": s.name, "type": s.type_name, "reason": s.skip_reason or ""}
                 for s in plan.skipped],
        output=str(output.path) if output.path else None,
        output_bytes=output.path.stat().st_size if output.path else 0,
        seconds=time.perf_counter() - started)


def _batches(data: DataSource, batching: _Batching, inputs: Inputs
             ) -> Iterator[tuple[int, torch.Tensor]]:
    """Batches of the current size (which shrinks for good after an out-of-memory retry)."""
    start = 0
    while start < len(data):
        stop = min(start + batching.size, len(data))
        yield start, to_tensor(data.read(start, stop), inputs.device, inputs.dtype)
        start = stop


def _compute_batch(p: Prepared, start: int, x: torch.Tensor,
                   batching: _Batching
                   ) -> Iterator[tuple[int, int, dict[str, Structured], dict[str, float]]]:
    """Yield `(start, count, Jacobians, seconds)` for the batch `x` (B, *in_shape).

    When memory runs out, the batch is halved (for the rest of the run too) and retried.
    """
    try:
        results = p.engine.compute(x, chunk_size=p.plan.chunk_size) if p.engine.entries \
            else {}
        spent = {name: p.engine.last_seconds.get(name, 0.0) for name in results}
        if p.param_setup is not None:
            begin = time.perf_counter()
            params = _param_batch(p, start, x)
            each = (time.perf_counter() - begin) / len(params)
            results |= params
            spent |= dict.fromkeys(params, each)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        if x.shape[0] == 1:
            advice = ["--layers"] + (["--store compact"] if p.settings.store == "dense"
                                     else [])
            raise OutOfMemoryError("out of memory on a single sample; select fewer layers "
                                   f"with {' or '.join(advice)}") from exc
        results = None
    if results is not None:
        yield start, x.shape[0], results, spent
        return
    if x.is_cuda:
        torch.cuda.empty_cache()
    half = x.shape[0] // 2
    batching.size = min(batching.size, half)
    yield from _compute_batch(p, start, x[:half], batching)
    yield from _compute_batch(p, start + half, x[half:], batching)


def _param_batch(p: Prepared, start: int, x: torch.Tensor) -> dict[str, Structured]:
    """Per-sample parameter Jacobians of one batch, as `(B, C, D)` matrices."""
    setup = p.param_setup
    targets = None
    if setup.targets is not None:
        targets = torch.from_numpy(np.array(setup.targets.read(start, start + x.shape[0])))
        targets = targets.to(x.device)
    if setup.modules is None:
        jacobians = p.engine.engine.param_jacobians(x, setup.objective,
                                                    [q.name for q in setup.params], targets)
    else:
        jacobians = param_jacobians(p.inputs.model, x, setup.objective, targets,
                                    setup.modules)
    result = {p.name: Matrix(jacobians[p.name].reshape(x.shape[0], setup.outputs, -1))
              for p in setup.params}
    if p.settings.params.flatten:  # one (B, C, D) matrix over all selected parameters
        result[FLATTENED] = Matrix(torch.cat([m.matrix for m in result.values()], dim=2))
    return result
