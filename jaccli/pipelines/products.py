"""The `jvp` / `vjp` pipelines: J v or uᵀ J for every sample, never forming J."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..engine.engine import JacobianEngine
from ..errors import ShapeMismatchError, UsageError
from ..io.data import load_data
from ..io.results.writer import ResultsWriter
from ..params.jacobians import param_jvp, param_vjp, select_params
from ..params.objectives import objective
from ..reports.stats import aggregate
from ..settings import ProductSettings
from ..tracing.recorder import ForwardRecorder, run_model
from .common import (
    Inputs,
    check_independence,
    guard_output,
    load_inputs,
    load_targets,
    product_batch_size,
    provenance,
    to_tensor,
)


def run_products(settings: ProductSettings) -> dict:
    """J v (jvp) or uᵀ J (vjp) for every sample; written when an output is set."""
    s = settings
    if s.layer is not None and s.wrt == "params":
        raise UsageError("--layer goes with --wrt inputs")
    guard_output(s.output, s.model, s.data, s.vectors)
    inputs = load_inputs(s.model, s.data, s.run)
    n = len(inputs.data)
    started = time.perf_counter()
    engine = layer = None
    if s.wrt == "inputs":
        engine, layer = _operator_engine(s, inputs)
    params = select_params(inputs.model, s.params) if s.wrt == "params" else None
    vectors = _vectors(s, n)
    batch = product_batch_size(s.run, inputs)
    check_independence(inputs, batch)
    products = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        x = to_tensor(inputs.data.read(start, stop), inputs.device, inputs.dtype)
        v = vectors[start:stop] if vectors.shape[0] == n else vectors
        products.append(_product(s, inputs, engine, layer, params, x, v).detach().cpu())
    result = torch.cat(products).to(torch.float64).numpy()
    norms = np.linalg.norm(result.reshape(n, -1), axis=1)
    summary = {"schema": "jaccli/products-summary", "schema_version": 1,
               "command": s.direction, "wrt": s.wrt, "layer": s.layer or (
                   "(end-to-end)" if s.wrt == "inputs" else "parameters"),
               "model": str(s.model.path), "data": str(s.data.path), "n_samples": n,
               "shape": list(result.shape), "norm": aggregate(norms), "output": None,
               "seconds": time.perf_counter() - started}
    if s.output.path is not None:
        with ResultsWriter(s.output.path, kind="products", sample_index=inputs.data.indices,
                           attrs=provenance(s.command_line, inputs)) as writer:
            group = writer.create_group("product", parent="products", attrs={
                "direction": s.direction, "wrt": s.wrt, "layer": summary["layer"]})
            group.create_dataset("product", data=result.astype(
                np.float64 if inputs.dtype == torch.float64 else np.float32))
            group.create_dataset("norm", data=norms)
            writer.finish({"batch_size": batch})
        summary["output"] = str(s.output.path)
    return summary


def _operator_engine(settings: ProductSettings, inputs: Inputs):
    trace = inputs.trace
    layer = None
    if settings.layer is not None:
        matches = [c for c in trace.all_layers if c.name == settings.layer]
        if not matches:
            raise UsageError(f"--layer {settings.layer} is not a layer; layers: "
                             f"{', '.join(c.name for c in trace.all_layers)}")
        layer = matches[0]
    engine = JacobianEngine(inputs.model, trace, layers=[layer] if layer else [],
                            end_to_end=layer is None, n_samples=len(inputs.data),
                            mode=settings.run.mode)
    return engine, layer


def _vectors(settings: ProductSettings, n: int) -> torch.Tensor:
    """One vector for all samples (a 1-D array or a single row), or one per data-file row,
    selected by the same --offset/--limit as the data: `(1 | n, D)`."""
    if settings.vectors is None:
        raise UsageError("--vectors FILE is required")
    whole = load_data(settings.vectors, key=settings.vectors_key, key_option="--vectors-key")
    if len(whole.array.shape) == 1 or whole.array.shape[0] == 1:
        whole.check_finite()
        return torch.from_numpy(np.array(whole.read(0, len(whole)))).reshape(1, -1)
    source = load_targets(settings.vectors, settings.vectors_key, settings.data, n,
                          what="vectors")
    source.check_finite()
    array = np.array(source.read(0, n))
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ShapeMismatchError(f"--vectors holds {array.dtype} values; give real numbers")
    return torch.from_numpy(array.reshape(n, -1))


def _product(settings: ProductSettings, inputs, engine, layer, params, x, v) -> torch.Tensor:
    b = x.shape[0]
    v = v.to(device=x.device, dtype=x.dtype)
    if params is not None:
        fn = objective()
        if settings.direction == "jvp":
            sizes = [math.prod(p.shape) for p in params]
            flat = v.reshape(-1)
            if flat.numel() != sum(sizes):
                raise ShapeMismatchError(f"--vectors has {flat.numel()} entries; the selected "
                                         f"parameters have {sum(sizes)}")
            tangents = {p.name: part.reshape(p.shape)
                        for p, part in zip(params, torch.split(flat, sizes), strict=True)}
            return param_jvp(inputs.model, x, fn, tangents)
        u = v.expand(b, -1) if v.shape[0] == 1 else v
        grads = param_vjp(inputs.model, x, fn, u, params=params)
        return torch.cat([g.reshape(b, -1) for g in grads.values()], dim=1)
    recorder = ForwardRecorder(inputs.model, inputs.loaded.hookable, inputs.trace.positions)
    _, calls = run_model(recorder, x)
    records = {r.site: r for r in calls}
    apply_j, apply_jt = (engine.layer_operator(layer, records) if layer is not None
                         else engine.end_to_end_operator(x, records))
    d_in = layer.d_in if layer else math.prod(inputs.trace.input_shape)
    d_out = layer.d_out if layer else math.prod(inputs.trace.output_shape)
    expected = d_in if settings.direction == "jvp" else d_out
    if v.shape[-1] != expected:
        raise ShapeMismatchError(f"--vectors have {v.shape[-1]} entries per sample; "
                                 f"{settings.direction} needs {expected}")
    block = (v.expand(b, -1) if v.shape[0] == 1 else v)[:, :, None]
    return (apply_j if settings.direction == "jvp" else apply_jt)(block)[:, :, 0]


