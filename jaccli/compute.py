"""The `compute` pipeline: load -> plan -> engine -> writer / summary."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import h5py
import numpy as np
import torch
from torch import nn

from . import __version__
from .config import ComputeConfig
from .data import DataSource, load_data
from .device import resolve_device, resolve_dtype
from .engine.batch import check_sample_independence, timed_jacobians
from .engine.generic import MODES, per_sample_frobenius
from .errors import UsageError
from .hashing import sha256_file
from .layers import ForwardRecorder, Trace, run_model, trace_end_to_end, trace_layers
from .memory import memory_budget
from .models import LoadedModel, load_model
from .planner import Plan, make_plan
from .summary import EntrySummary, Summary
from .writer import ResultsWriter

_INDEPENDENCE_SAMPLES = 4


@dataclass
class Prepared:
    """A loaded model and data source with the plan for running over them."""

    config: ComputeConfig
    loaded: LoadedModel
    data: DataSource
    model: nn.Module
    device: torch.device
    dtype: torch.dtype
    plan: Plan


def prepare(config: ComputeConfig) -> Prepared:
    """Load model and data, check them against each other, trace the layers, and plan."""
    device, dtype = _check_options(config)
    loaded = load_model(config.model, arch=config.arch, arch_path=config.arch_path,
                        trust_pickle=config.trust_pickle)
    data = load_data(config.data, key=config.key, offset=config.offset, limit=config.limit)
    data.match_input_shape(loaded.input_shape)
    data.check_finite()
    model = _frozen(loaded.module.to(device=device, dtype=dtype))
    example = _to_tensor(data.read(0, min(len(data), _INDEPENDENCE_SAMPLES)), device, dtype)
    trace = _trace(config, loaded, model, example)
    check_sample_independence(model, example)
    budget, source = memory_budget(device, config.max_memory)
    plan = make_plan(trace, n_samples=len(data), end_to_end=config.end_to_end,
                     include_layers=config.include_layers, dtype=dtype, device=device,
                     budget=budget, budget_source=source, batch_size=config.batch_size,
                     mode=config.mode)
    return Prepared(config, loaded, data, model, device, dtype, plan)


def inspect_model(config: ComputeConfig, input_shape: tuple[int, ...] | None) -> Plan:
    """Plan for `config` without computing: the layers, their shapes and Jacobian sizes.

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
    model = _frozen(loaded.module.to(device=device, dtype=dtype))
    example = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    trace = _trace(config, loaded, model, example)
    return make_plan(trace, n_samples=n_samples, end_to_end=config.end_to_end,
                     include_layers=config.include_layers, dtype=dtype, device=device,
                     budget=2**62, budget_source="not applied by inspect",
                     batch_size=config.batch_size or 1, mode=config.mode)


def _check_options(config: ComputeConfig) -> tuple[torch.device, torch.dtype]:
    if config.mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    if not config.include_layers and not config.end_to_end:
        raise UsageError("nothing to compute: --no-layers and --no-end-to-end together")
    return resolve_device(config.device), resolve_dtype(config.dtype)


def _trace(config: ComputeConfig, loaded: LoadedModel, model: nn.Module,
           example: torch.Tensor) -> Trace:
    if not config.include_layers:
        return trace_end_to_end(model, example)
    return trace_layers(model, example, type_name=loaded.type_name, hookable=loaded.hookable,
                        granularity=config.granularity, patterns=config.layers)


def run_compute(config: ComputeConfig, *, on_batch: Callable[[int], None] | None = None,
                prepared: Prepared | None = None) -> Summary:
    """Compute every planned Jacobian for every sample; write them if `config.output` is set.

    on_batch: called with the number of samples after each batch (for progress bars).
    """
    started = time.perf_counter()
    p = prepared or prepare(config)
    plan, data = p.plan, p.data
    recorder = ForwardRecorder(p.model, p.loaded.hookable) if config.include_layers else None
    norms = {e.name: np.empty(len(data)) for e in plan.entries}
    seconds = dict.fromkeys(norms, 0.0)
    np_dtype = np.float64 if p.dtype == torch.float64 else np.float32
    writer = (ResultsWriter(config.output, kind="jacobians", sample_index=data.indices,
                            attrs=_provenance(p), compression=config.compression,
                            compression_level=config.compression_level)
              if config.output is not None else nullcontext())
    with writer:
        datasets = _create_datasets(writer, plan, np_dtype) if config.output else {}
        for start, rows in data.batches(plan.batch_size):
            x = _to_tensor(rows, p.device, p.dtype)
            records = {}
            if recorder is not None:
                _, calls = run_model(recorder, x)
                records = {r.site: r for r in calls}
            for entry, jac, spent in timed_jacobians(plan.entries, p.model, records, x):
                seconds[entry.name] += spent
                jac = jac.detach()
                frob = per_sample_frobenius(jac).cpu().numpy()
                norms[entry.name][start:start + len(rows)] = frob
                if datasets:
                    jac_ds, frob_ds = datasets[entry.name]
                    jac_ds[start:start + len(rows)] = jac.cpu().numpy()
                    frob_ds[start:start + len(rows)] = frob
            if on_batch is not None:
                on_batch(len(rows))
        if config.output is not None:
            for entry in plan.entries:
                datasets[entry.name][0].parent.attrs["seconds"] = seconds[entry.name]
            writer.finish({"seconds": time.perf_counter() - started})
    entries = [EntrySummary.from_norms(name=e.name, kind=e.kind, type_name=e.type_name,
                                       d_in=e.d_in, d_out=e.d_out, frobenius=norms[e.name],
                                       seconds=seconds[e.name]) for e in plan.entries]
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


def _create_datasets(writer: ResultsWriter, plan: Plan, np_dtype) -> dict:
    datasets = {}
    for entry in plan.entries:
        group = writer.create_group(entry.name, end_to_end=entry.layer is None, attrs={
            "type": entry.type_name, "modules": list(entry.layer.module_names)
            if entry.layer else [], "input_shape": list(entry.input_shape),
            "output_shape": list(entry.output_shape), "d_in": entry.d_in,
            "d_out": entry.d_out, "mode": entry.mode})
        n = plan.n_samples
        datasets[entry.name] = (
            writer.create_dataset(group, "jacobian", (n, entry.d_out, entry.d_in), np_dtype),
            writer.create_dataset(group, "frobenius", (n,), np.float64))
    return datasets


def _provenance(p: Prepared) -> dict:
    c = p.config
    return {
        "jaccli_version": __version__, "torch_version": torch.__version__,
        "h5py_version": h5py.__version__, "hdf5_version": h5py.version.hdf5_version,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": c.command_line, "device": p.plan.device, "dtype": p.plan.dtype,
        "granularity": c.granularity if c.include_layers else "",
        "chain": p.plan.chain, "batch_size": p.plan.batch_size,
        "model_path": str(c.model), "model_format": p.loaded.source,
        "model_sha256": sha256_file(c.model),
        "data_path": str(c.data), "data_key": p.data.key or "", "data_offset": p.data.offset,
        "data_sha256": sha256_file(c.data), "n_samples": p.plan.n_samples,
    }


def _frozen(model: nn.Module) -> nn.Module:
    """No parameter gradients: the pipeline differentiates w.r.t. inputs only."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _to_tensor(rows: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch read from disk (possibly a read-only memory map) as a tensor of `dtype`."""
    host = np.array(rows, dtype=np.float64 if dtype == torch.float64 else np.float32)
    return torch.from_numpy(host).to(device=device)
