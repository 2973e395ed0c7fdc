"""The `compute` pipeline: load -> plan -> engine -> writer / summary."""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from . import __version__
from .background import BackgroundWriter
from .config import ComputeConfig
from .data import DataSource, load_data
from .device import resolve_device, resolve_dtype
from .engine.engine import JacobianEngine
from .engine.generic import MODES
from .engine.independence import check_sample_independence
from .engine.structures import Matrix, Structured
from .errors import OutOfMemoryError, ShapeMismatchError, UnsupportedModuleError, UsageError
from .hashing import sha256_file
from .layers import (
    ForwardRecorder,
    Trace,
    is_out_of_memory,
    run_model,
    trace_end_to_end,
    trace_layers,
)
from .memory import check_trace_fits, memory_budget
from .models import LoadedModel, load_model
from .output_guard import check_output
from .planner import STORES, Plan, PlanEntry, make_plan
from .summary import EntrySummary, Summary
from .writer import SHARED_DATASETS, ResultsWriter

_INDEPENDENCE_SAMPLES = 4
_PARENTS = {"layer": "layers", "end_to_end": "end_to_end", "param": "params"}
FLATTENED = "(flattened)"


@dataclass
class Inputs:
    """A loaded model and data source, checked against each other, with the traced layers."""

    config: ComputeConfig
    loaded: LoadedModel
    data: DataSource
    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    trace: Trace


@dataclass
class ParamSetup:
    """What `--wrt params` differentiates: the parameters, the objective, the targets."""

    params: list
    objective: Callable
    targets: DataSource | None
    outputs: int  # C: per-sample outputs of the objective (1 for a scalar)


@dataclass
class Prepared(Inputs):
    """Inputs with the engine and the plan for running over them."""

    engine: JacobianEngine = None
    plan: Plan = None
    param_setup: ParamSetup | None = None


def load_inputs(config: ComputeConfig) -> Inputs:
    """Load model and data, check them against each other, and trace the layers."""
    device, dtype = _check_options(config)
    if config.output is not None:  # before any heavy work
        check_output(config.output, run_inputs(config))
    loaded = load_model(config.model, arch=config.arch, arch_path=config.arch_path,
                        trust_pickle=config.trust_pickle)
    data = load_data(config.data, key=config.key, offset=config.offset, limit=config.limit)
    data.match_input_shape(loaded.input_shape)
    data.check_finite()
    model = frozen(loaded.module.to(device=device, dtype=dtype))
    example = to_tensor(data.read(0, min(len(data), _INDEPENDENCE_SAMPLES)), device, dtype)
    trace = trace_model(config, loaded, model, example)
    check_sample_independence(model, example)
    return Inputs(config, loaded, data, model, device, dtype, trace)


def run_inputs(config: ComputeConfig) -> list:
    """Every file the run reads; the output may be none of them."""
    arch = config.arch if config.arch and Path(config.arch).is_file() else None
    return [config.model, config.data, config.targets, getattr(config, "vectors", None), arch]


def prepare(config: ComputeConfig) -> Prepared:
    """Load and check the inputs, build the engine, and plan the run."""
    if "params" not in config.wrt and (config.loss or config.targets or config.params
                                       or config.output_index is not None or config.flatten):
        raise UsageError("--params, --loss, --targets, --output-index and --flatten go with "
                         "--wrt params")
    inputs = load_inputs(config)
    engine = make_engine(config, inputs.model, inputs.trace, len(inputs.data))
    setup = _param_setup(config, inputs) if "params" in config.wrt else None
    budget, source = memory_budget(inputs.device, config.max_memory)
    itemsize = torch.empty((), dtype=inputs.dtype).element_size()
    extra = [] if setup is None else [
        PlanEntry(p.name, f"param of {type(p.module).__name__}", p.shape, (setup.outputs,),
                  "outer product" if p.structured else "generic", "dense",
                  "-" if p.structured else "rev", setup.outputs * math.prod(p.shape) * itemsize,
                  param_shape=p.shape) for p in setup.params]
    if setup is not None and config.flatten:
        total = sum(math.prod(p.shape) for p in setup.params)
        extra.append(PlanEntry(FLATTENED, "all selected parameters", (total,),
                               (setup.outputs,), "concatenated", "dense", "-",
                               setup.outputs * total * itemsize, param_shape=(total,)))
    plan = make_plan(engine, n_samples=len(inputs.data), dtype=inputs.dtype,
                     device=inputs.device, budget=budget, budget_source=source,
                     store=config.store, batch_size=config.batch_size, extra=extra)
    return Prepared(**vars(inputs), engine=engine, plan=plan, param_setup=setup)


def _param_setup(config: ComputeConfig, inputs: Inputs) -> ParamSetup:
    from .objectives import objective
    from .params import select_params

    targets = None
    if config.loss is not None and config.targets is None:
        raise UsageError("--loss needs --targets FILE")
    if config.targets is not None:
        if config.loss is None:
            raise UsageError("--targets needs --loss (cross-entropy, nll, mse, bce-logits)")
        targets = load_data(config.targets, key=config.targets_key, offset=config.offset,
                            limit=config.limit, key_option="--targets-key")
        if len(targets) != len(inputs.data):
            raise ShapeMismatchError(f"{config.targets} has {len(targets)} targets for "
                                     f"{len(inputs.data)} samples; they must match")
    fn = objective(output_index=config.output_index, loss=config.loss)
    example = to_tensor(inputs.data.read(0, 1), inputs.device, inputs.dtype)
    example_targets = (None if targets is None
                       else torch.from_numpy(np.array(targets.read(0, 1))).to(inputs.device))
    with torch.no_grad():
        value = fn(inputs.model(example), example_targets)
    outputs = 1 if value.ndim == 1 else value.shape[1]
    return ParamSetup(select_params(inputs.model, config.params), fn, targets, outputs)


def inspect_model(config: ComputeConfig, input_shape: tuple[int, ...] | None) -> Plan:
    """Plan for `config` without computing: the layers, their rules, shapes and sizes.

    The input shape comes from `input_shape`, else from the data file (`config.data`, may be
    None), else from the model file; the model runs once on zeros of that shape.
    """
    device, dtype = _check_options(config)
    loaded = load_model(config.model, arch=config.arch, arch_path=config.arch_path,
                        trust_pickle=config.trust_pickle)
    n_samples = 1
    if input_shape is None and config.data is not None:
        data = load_data(config.data, key=config.key, offset=config.offset, limit=config.limit)
        data.match_input_shape(loaded.input_shape)
        input_shape, n_samples = data.sample_shape, len(data)
    input_shape = input_shape or loaded.input_shape
    if input_shape is None:
        raise UsageError("the model file does not declare its input shape; pass --input-shape "
                         "(e.g. 1,28,28) or --data FILE")
    budget, source = memory_budget(device, config.max_memory)
    check_trace_fits(tuple(input_shape), torch.empty((), dtype=dtype).element_size(), budget,
                     source)
    model = frozen(loaded.module.to(device=device, dtype=dtype))
    example = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    engine = make_engine(config, model, trace_model(config, loaded, model, example),
                         n_samples)
    return make_plan(engine, n_samples=n_samples, dtype=dtype, device=device, budget=2**62,
                     budget_source="not applied by inspect", store=config.store,
                     batch_size=config.batch_size or 1)


def run_compute(config: ComputeConfig, *, on_batch: Callable[[int], None] | None = None,
                prepared: Prepared | None = None) -> Summary:
    """Compute every planned Jacobian for every sample; write them if `config.output` is set.

    on_batch: called with the number of samples after each batch (for progress bars).
    """
    started = time.perf_counter()
    p = prepared or prepare(config)
    plan, data = p.plan, p.data
    recorder = ForwardRecorder(p.model, p.loaded.hookable) if p.engine.needs_records else None
    norms = {e.name: np.full(len(data), np.nan) for e in plan.entries}
    seconds = dict.fromkeys(norms, 0.0)
    writer = (ResultsWriter(config.output, kind="jacobians", sample_index=data.indices,
                            attrs=provenance(config, p.loaded, data, plan, p.device),
                            compression=config.compression,
                            compression_level=config.compression_level,
                            expected_bytes=plan.output_bytes)
              if config.output is not None else nullcontext())
    with writer, tf32_mode(config.tf32):
        sink = _ResultSink(writer if config.output else None, plan, norms, config.store,
                           np.float64 if p.dtype == torch.float64 else np.float32)
        try:
            for start, x in _batches(data, plan, p):
                for part_start, count, results, spent in _compute_batch(p, recorder, start, x):
                    for name, value in spent.items():
                        seconds[name] += value
                    sink.submit(part_start, count, results)
                    if on_batch is not None:
                        on_batch(count)
        finally:
            sink.close()
        if config.output is not None:
            sink.set_seconds(seconds)
            writer.finish({"seconds": time.perf_counter() - started})
    entries = [EntrySummary.from_norms(name=e.name, kind=e.kind, type_name=e.type_name,
                                       d_in=e.d_in, d_out=e.d_out, frobenius=norms[e.name],
                                       seconds=seconds[e.name], structure=e.structure,
                                       rule=e.rule) for e in plan.entries]
    return Summary(
        model=str(config.model), model_format=p.loaded.source, data=str(config.data),
        n_samples=len(data), device=plan.device, dtype=plan.dtype,
        granularity=config.granularity, batch_size=plan.batch_size, chain=plan.chain,
        entries=entries,
        skipped=[{"name": s.name, "type": s.type_name, "reason": s.skip_reason or ""}
                 for s in plan.skipped],
        output=str(config.output) if config.output else None,
        output_bytes=config.output.stat().st_size if config.output else 0,
        seconds=time.perf_counter() - started)


def _batches(data: DataSource, plan: Plan, p: Prepared) -> Iterator[tuple[int, torch.Tensor]]:
    """Batches of the planned size; the size shrinks for good after an out-of-memory retry."""
    start = 0
    while start < len(data):
        stop = min(start + plan.batch_size, len(data))
        yield start, to_tensor(data.read(start, stop), p.device, p.dtype)
        start = stop


def _compute_batch(p: Prepared, recorder: ForwardRecorder | None, start: int, x: torch.Tensor
                   ) -> Iterator[tuple[int, int, dict[str, Structured], dict[str, float]]]:
    """Yield `(start, count, Jacobians, seconds)` for the batch `x` (B, *in_shape).

    When memory runs out, the batch is halved (for the rest of the run too) and retried.
    """
    try:
        begin = time.perf_counter()
        records = {}
        if recorder is not None:
            _, calls = run_model(recorder, x)
            records = {r.site: r for r in calls}
        forward = time.perf_counter() - begin
        results = p.engine.compute(x, records)
        spent = dict(p.engine.last_seconds)
        if p.param_setup is not None:
            begin = time.perf_counter()
            params = _param_batch(p, start, x)
            each = (time.perf_counter() - begin) / len(params)
            results |= params
            spent |= dict.fromkeys(params, each)
        # The one forward pass is shared by all entries: charge it to them equally.
        spent = {name: seconds + forward / len(results) for name, seconds in spent.items()}
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        if x.shape[0] == 1:
            raise OutOfMemoryError("out of memory on a single sample; select fewer layers "
                                   "with --layers or use --store compact") from exc
        results = None
    if results is not None:
        yield start, x.shape[0], results, spent
        return
    if x.is_cuda:
        torch.cuda.empty_cache()
    half = x.shape[0] // 2
    p.plan.batch_size = min(p.plan.batch_size, half)
    yield from _compute_batch(p, recorder, start, x[:half])
    yield from _compute_batch(p, recorder, start + half, x[half:])


def _param_batch(p: Prepared, start: int, x: torch.Tensor) -> dict[str, Structured]:
    """Per-sample parameter Jacobians of one batch, as `(B, C, D)` matrices."""
    from .params import param_jacobians

    setup = p.param_setup
    targets = None
    if setup.targets is not None:
        targets = torch.from_numpy(np.array(setup.targets.read(start, start + x.shape[0])))
        targets = targets.to(x.device)
    jacobians = param_jacobians(p.model, x, setup.objective, targets, setup.params)
    result = {name: Matrix(jac.reshape(x.shape[0], setup.outputs, -1))
              for name, jac in jacobians.items()}
    if p.config.flatten:  # one (B, C, D) matrix over all selected parameters, in order
        result[FLATTENED] = Matrix(torch.cat([m.matrix for m in result.values()], dim=2))
    return result


class _ResultSink:
    """Hands each batch's Jacobians to the writer thread: norms, host copies, HDF5 writes."""

    def __init__(self, writer: ResultsWriter | None, plan: Plan, norms: dict[str, np.ndarray],
                 store: str, np_dtype):
        self.writer, self.plan, self.norms, self.store = writer, plan, norms, store
        self.np_dtype = np_dtype
        self.entries = {e.name: e for e in plan.entries}
        self.groups: dict[str, h5py.Group] = {}
        self.background = BackgroundWriter()

    def submit(self, start: int, count: int, results: dict[str, Structured]) -> None:
        for name, jac in results.items():
            self.background.submit(lambda n=name, j=jac: self._write(n, start, count, j))

    def close(self) -> None:
        self.background.close()

    def set_seconds(self, seconds: dict[str, float]) -> None:
        for name, group in self.groups.items():
            group.attrs["seconds"] = seconds[name]

    def _write(self, name: str, start: int, count: int, jac: Structured) -> None:
        frob = jac.frobenius(count).detach().to("cpu", torch.float64).numpy()
        self.norms[name][start:start + count] = frob
        if self.writer is None:
            return
        entry = self.entries[name]
        arrays = ({"jacobian": jac.dense(count)} if self.store == "dense" else jac.compact())
        encoding = "dense" if self.store == "dense" else jac.tag
        group = self.groups.get(name)
        if group is None:
            group = self._create(entry, encoding, arrays)
        elif group.attrs["encoding"] != encoding:
            raise RuntimeError(f"{name}: structure changed from {group.attrs['encoding']} "
                               f"to {encoding} between batches")
        for key, value in arrays.items():
            if key in SHARED_DATASETS.get(encoding, ()):
                continue
            group[key][start:start + count] = _host(value, self.np_dtype)
        group["frobenius"][start:start + count] = frob
        self.writer.check()  # a full disk stops the run now, not after the last batch

    def _create(self, entry, encoding: str, arrays: dict) -> h5py.Group:
        writer, n = self.writer, self.plan.n_samples
        group = writer.create_group(entry.name, parent=_PARENTS[entry.kind], attrs={
            "type": entry.type_name, "param_shape": list(entry.param_shape or ()),
            "modules": list(entry.layer.module_names) if entry.layer else [],
            "input_shape": list(entry.input_shape), "output_shape": list(entry.output_shape),
            "d_in": entry.d_in, "d_out": entry.d_out, "mode": entry.mode, "rule": entry.rule,
            "encoding": encoding})
        for key, value in arrays.items():
            host = _host(value, self.np_dtype)
            if key in SHARED_DATASETS.get(encoding, ()):
                group.create_dataset(key, data=host)
            else:
                writer.create_dataset(group, key, (n, *host.shape[1:]), host.dtype)
        writer.create_dataset(group, "frobenius", (n,), np.float64)
        self.groups[entry.name] = group
        return group


def _host(value: torch.Tensor, np_dtype) -> np.ndarray:
    host = value.detach().cpu().numpy()
    return host if host.dtype.kind in "iu" else host.astype(np_dtype, copy=False)


@contextmanager
def tf32_mode(enabled: bool):
    """TF32 matmuls/convolutions on CUDA only when asked: they round to ~10 mantissa bits."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _check_options(config: ComputeConfig) -> tuple[torch.device, torch.dtype]:
    if config.mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    if config.store not in STORES:
        raise UsageError(f"--store must be one of {', '.join(STORES)}")
    if not set(config.wrt) <= {"inputs", "params"} or not config.wrt:
        raise UsageError("--wrt takes inputs and/or params")
    if "inputs" in config.wrt and not config.include_layers and not config.end_to_end:
        raise UsageError("nothing to compute: --no-layers and --no-end-to-end together")
    return resolve_device(config.device), resolve_dtype(config.dtype)


def trace_model(config: ComputeConfig, loaded: LoadedModel, model: nn.Module,
                example: torch.Tensor) -> Trace:
    """The model's layers (as `config` selects them), from one forward pass on `example`."""
    if config.include_layers:
        return trace_layers(model, example, type_name=loaded.type_name,
                            hookable=loaded.hookable, granularity=config.granularity,
                            patterns=config.layers)
    try:  # layers are still traced, to form the end-to-end Jacobian by chain products
        trace = trace_layers(model, example, type_name=loaded.type_name,
                             hookable=loaded.hookable, granularity=config.granularity)
    except UnsupportedModuleError:
        return trace_end_to_end(model, example)
    trace.layers = []
    return trace


def make_engine(config: ComputeConfig, model: nn.Module, trace: Trace,
                n_samples: int) -> JacobianEngine:
    inputs = "inputs" in config.wrt
    return JacobianEngine(model, trace, layers=trace.layers if inputs else [],
                          end_to_end=config.end_to_end and inputs, n_samples=n_samples,
                          strict=config.strict_rules, mode=config.mode)


def provenance(config: ComputeConfig, loaded: LoadedModel, data: DataSource, plan: Plan,
               device: torch.device) -> dict:
    """Root attributes of a results file: versions, command, inputs and their hashes."""
    c = config
    return {
        "jaccli_version": __version__, "torch_version": torch.__version__,
        "h5py_version": h5py.__version__, "hdf5_version": h5py.version.hdf5_version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": c.command_line, "device": plan.device, "dtype": plan.dtype,
        "tf32": bool(c.tf32 and device.type == "cuda"), "store": c.store,
        "granularity": c.granularity if c.include_layers else "",
        "chain": plan.chain, "batch_size": plan.batch_size,
        "model_path": str(c.model), "model_format": loaded.source,
        "model_sha256": sha256_file(c.model),
        "data_path": str(c.data), "data_key": data.key or "", "data_offset": data.offset,
        "data_sha256": data.sha256 or sha256_file(c.data), "n_samples": plan.n_samples,
    }


def frozen(model: nn.Module) -> nn.Module:
    """No parameter gradients: the pipeline differentiates w.r.t. inputs only."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def to_tensor(rows: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch read from disk (possibly a read-only memory map) as a tensor of `dtype`."""
    host = np.array(rows, dtype=np.float64 if dtype == torch.float64 else np.float32)
    return torch.from_numpy(host).to(device=device)
