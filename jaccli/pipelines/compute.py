"""The `compute` pipeline: load -> plan -> engine (and parameter Jacobians) -> writer / summary."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.structures import Structured
from ..errors import OutOfMemoryError, UsageError, is_out_of_memory
from ..io.data import DataSource
from ..io.results.writer import ResultsWriter
from ..reports.summary import EntrySummary, Summary
from ..settings import ComputeSettings
from .common import (
    Inputs,
    check_independence,
    frozen,
    guard_output,
    load,
    load_inputs,
    provenance,
)
from .compute_params import ParamSetup, param_batch, param_entries, param_setup
from .engines import Engine, make_engine
from .planner import Plan, check_disk, in_effect, make_plan
from .resources import (
    baseline_memory,
    check_trace_fits,
    memory_budget,
    resolve_device,
    resolve_dtype,
    tf32_mode,
)
from .sink import ResultSink


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
    setup = param_setup(s, inputs, engine) if "params" in s.wrt else None
    budget, source = memory_budget(inputs.device, s.run.max_memory)
    plan = make_plan(engine, n_samples=len(inputs.data), dtype=inputs.dtype,
                     device=inputs.device, budget=budget, budget_source=source, store=s.store,
                     batch_size=s.run.batch_size, extra=param_entries(s, setup, inputs.dtype),
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
    source = settings.model
    if source.inputs or source.constants or source.wrt_input is not None:
        from .inspect_call import inspect_call

        return inspect_call(settings, loaded, input_shape, device, dtype)
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
    model = frozen(loaded.module.to(device=device, dtype=dtype))
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


@dataclass
class Outcome:
    """What one process computed: per-sample Frobenius norms `{entry: (N,)}`, seconds spent
    per entry, and the batch size used (smaller than planned after running out of memory)."""

    norms: dict[str, np.ndarray]
    seconds: dict[str, float]
    batch_size: int


def run_compute(settings: ComputeSettings, *, on_batch: Callable[[int], None] | None = None,
                prepared: Prepared | None = None) -> Summary:
    """Compute every planned Jacobian for every sample; write them if an output is set.

    on_batch: called with the number of samples after each batch (for progress bars).
    """
    started = time.perf_counter()
    p = prepared or prepare(settings)
    outcome = compute_outcome(p, on_batch=on_batch, started=started)
    path = settings.output.path
    return summarize(p, outcome, n_samples=len(p.inputs.data), device=p.plan.device,
                     output_bytes=path.stat().st_size if path else 0,
                     seconds=time.perf_counter() - started)


def results_attrs(p: Prepared) -> dict:
    """The root attributes (provenance) of this run's results file."""
    settings, inputs, plan = p.settings, p.inputs, p.plan
    layers = settings.layers
    return provenance(settings.command_line, inputs, tf32=bool(
        settings.run.tf32 and inputs.device.type == "cuda"), store=settings.store,
        granularity=layers.granularity if layers.include_layers else "",
        chain=plan.chain, engine=plan.engine, engine_note=plan.engine_note,
        options_sha256=options_fingerprint(settings))


def options_fingerprint(settings) -> str:
    """A hash of the options (of any command's settings) that decide what a results file
    holds: not the paths (their contents are hashed apart), sample range, device, batch
    size or memory budget."""
    import dataclasses
    import hashlib
    import json

    from ..io.hashing import sha256_file

    options = dataclasses.asdict(settings)
    for group, names in {"model": ("path",), "data": ("path", "offset", "limit", "shard"),
                         "run": ("device", "batch_size", "max_memory"),
                         "output": ("path", "max_output"), "params": ("targets",)}.items():
        for name in names:
            if isinstance(options.get(group), dict):
                options[group].pop(name, None)
    for name in ("command_line", "resume", "vectors"):  # vectors: hashed by the caller
        options.pop(name, None)
    targets = getattr(getattr(settings, "params", None), "targets", None)
    options["targets_sha256"] = sha256_file(targets) if targets is not None else ""
    text = json.dumps(options, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def compute_outcome(p: Prepared, *, on_batch: Callable[[int], None] | None = None,
                    started: float | None = None, attrs: dict | None = None) -> Outcome:
    """Run `p` over its samples, writing the results file when the settings name one (with
    root attributes `attrs`, by default `results_attrs(p)`)."""
    started = time.perf_counter() if started is None else started
    settings, plan, inputs, output = p.settings, p.plan, p.inputs, p.settings.output
    data = inputs.data
    norms = {e.name: np.full(len(data), np.nan) for e in plan.entries}
    seconds = dict.fromkeys(norms, 0.0)
    writer = (ResultsWriter(
        output.path, kind="jacobians", sample_index=data.indices,
        attrs=results_attrs(p) if attrs is None else attrs,
        compression=output.compression, compression_level=output.compression_level)
        if output.path is not None else nullcontext())
    batching = _Batching(plan.batch_size)
    with writer, tf32_mode(settings.run.tf32):
        sink = ResultSink(writer if output.path else None, plan, norms, settings.store,
                          np.float64 if inputs.dtype == torch.float64 else np.float32)
        try:
            for start, x, held in _batches(data, batching, inputs):
                for part in _compute_batch(p, start, x, held, batching):
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
    return Outcome(norms, seconds, batching.size)


def summarize(p: Prepared, outcome: Outcome, *, n_samples: int, device: str,
              output_bytes: int, seconds: float) -> Summary:
    """The summary of a run of `p`'s plan whose norms (over all `n_samples`) are in
    `outcome`."""
    settings, plan, inputs = p.settings, p.plan, p.inputs
    layers, output = settings.layers, settings.output
    entries = [EntrySummary.from_norms(name=e.name, kind=e.kind, type_name=e.type_name,
                                       d_in=e.d_in, d_out=e.d_out,
                                       frobenius=outcome.norms[e.name],
                                       seconds=outcome.seconds[e.name], structure=e.structure,
                                       rule=e.rule, note=e.note) for e in plan.entries]
    return Summary(
        model=str(settings.model.path), model_format=inputs.loaded.source,
        data=str(settings.data.path), n_samples=n_samples, device=device,
        dtype=plan.dtype, granularity=layers.granularity, batch_size=outcome.batch_size,
        chain=plan.chain, entries=entries, engine=plan.engine,
        skipped=[{"name": s.name, "type": s.type_name, "reason": s.skip_reason or ""}
                 for s in plan.skipped],
        output=str(output.path) if output.path else None, output_bytes=output_bytes,
        seconds=seconds)


def _batches(data: DataSource, batching: _Batching, inputs: Inputs
             ) -> Iterator[tuple[int, torch.Tensor, tuple[torch.Tensor, ...]]]:
    """Batches `(start, x, held)` of the current size (which shrinks for good after an
    out-of-memory retry); held: the rows of the inputs held fixed."""
    start = 0
    while start < len(data):
        stop = min(start + batching.size, len(data))
        yield start, *inputs.batch(start, stop)
        start = stop


def _compute_batch(p: Prepared, start: int, x: torch.Tensor, held: tuple,
                   batching: _Batching
                   ) -> Iterator[tuple[int, int, dict[str, Structured], dict[str, float]]]:
    """Yield `(start, count, Jacobians, seconds)` for the batch `x` (B, *in_shape) with the
    inputs held fixed `held` (B, ...).

    When memory runs out, the batch is halved (for the rest of the run too) and retried.
    """
    try:
        results = p.engine.compute(x, chunk_size=p.plan.chunk_size, held=held) \
            if p.engine.entries else {}
        spent = {name: p.engine.last_seconds.get(name, 0.0) for name in results}
        if p.param_setup is not None:
            begin = time.perf_counter()
            params = param_batch(p, start, x, held)
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
    yield from _compute_batch(p, start, x[:half], tuple(h[:half] for h in held), batching)
    yield from _compute_batch(p, start + half, x[half:], tuple(h[half:] for h in held),
                              batching)

