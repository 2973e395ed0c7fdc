"""The `jvp` / `vjp` pipelines: J v or uᵀ J for every sample, never forming J."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..errors import ShapeMismatchError, UsageError
from ..io.data import load_data
from ..io.models import ModelFormat
from ..io.results.writer import ResultsWriter
from ..params.jacobians import param_jvp, param_vjp, select_params
from ..params.objectives import objective
from ..reports.stats import aggregate
from ..settings import LayerSelection, ProductSettings
from .common import (
    Inputs,
    check_independence,
    guard_output,
    load_inputs,
    load_targets,
    product_batch_size,
    provenance,
)
from .engines import END_TO_END, Engine, GraphRun, make_engine


def run_products(settings: ProductSettings) -> dict:
    """J v (jvp) or uᵀ J (vjp) for every sample; written when an output is set."""
    s = settings
    if s.layer is not None and s.wrt == "params":
        raise UsageError("--layer goes with --wrt inputs")
    if s.wrt == "params" and (s.model.inputs or s.model.constants):
        raise UsageError("jvp/vjp --wrt params take models of one input; --input and --const "
                         "go with --wrt inputs or --wrt NAME")
    guard_output(s.output, s.model, s.data, s.vectors)
    inputs = load_inputs(s.model, s.data, s.run)
    n = len(inputs.data)
    started = time.perf_counter()
    engine = make_engine(inputs, LayerSelection(end_to_end=s.layer is None), s.run)
    name = _entry_name(s, engine)
    entry = next((e for e in engine.entries if e.name == name), None) if name else None
    params = _params(s, inputs, engine) if s.wrt == "params" else None
    vectors = _vectors(s, n)
    d_in, d_out = (entry.d_in, entry.d_out) if entry else (
        math.prod(engine.input_shape), math.prod(engine.output_shape))
    batch = product_batch_size(s.run, inputs, d_in, d_out)
    check_independence(inputs, batch)
    products = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        x, held = inputs.batch(start, stop)
        v = vectors[start:stop] if vectors.shape[0] == n else vectors
        product = (_param_product(s, inputs, engine, params, x, v) if params is not None
                   else _input_product(s, engine, entry, x, v, held))
        products.append(product.detach().cpu())
    result = torch.cat(products).to(torch.float64).numpy()
    norms = np.linalg.norm(result.reshape(n, -1), axis=1)
    summary = {"schema": "jaccli/products-summary", "schema_version": 1,
               "command": s.direction, "wrt": s.wrt, "layer": s.layer or (
                   END_TO_END if s.wrt == "inputs" else "parameters"),
               "model": str(s.model.path), "data": str(s.data.path), "n_samples": n,
               "shape": list(result.shape), "norm": aggregate(norms), "output": None,
               "engine": engine.path, "seconds": time.perf_counter() - started}
    if s.output.path is not None:
        with ResultsWriter(s.output.path, kind="products", sample_index=inputs.data.indices,
                           attrs=provenance(s.command_line, inputs, engine=engine.path)
                           ) as writer:
            group = writer.create_group("product", parent="products", attrs={
                "direction": s.direction, "wrt": s.wrt, "layer": summary["layer"]})
            group.create_dataset("product", data=result.astype(
                np.float64 if inputs.dtype == torch.float64 else np.float32))
            group.create_dataset("norm", data=norms)
            writer.finish({"batch_size": batch, "seconds": summary["seconds"]})
        summary["output"] = str(s.output.path)
    return summary


def _entry_name(settings: ProductSettings, engine: Engine) -> str | None:
    """The entry whose Jacobian is multiplied: `--layer`, or the end-to-end one."""
    if settings.wrt == "params":
        return None
    if settings.layer is None:
        return END_TO_END
    names = [e.name for e in engine.entries if e.kind == "layer"]
    if settings.layer not in names:
        raise UsageError(f"--layer {settings.layer} is not a layer; layers: "
                         f"{', '.join(names)}")
    return settings.layer


def _params(settings: ProductSettings, inputs: Inputs, engine: Engine):
    """The selected parameters: graph names for a TorchScript model (torch.func cannot call
    it), module parameters otherwise."""
    if inputs.loaded.format is ModelFormat.TORCHSCRIPT:
        if not isinstance(engine, GraphRun):
            raise UsageError("--wrt params of a TorchScript model needs its operator graph, "
                             f"and {engine.note}")
        from ..graph.params import select_parameters

        chosen = select_parameters(engine.graph, settings.params)
        return [(q, tuple(engine.graph.state[node][1].shape)) for q, node in chosen.items()]
    return select_params(inputs.model, settings.params)


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


def _input_product(settings: ProductSettings, engine: Engine, entry, x, v, held
                   ) -> torch.Tensor:
    b = x.shape[0]
    v = v.to(device=x.device, dtype=x.dtype)
    expected = entry.d_in if settings.direction == "jvp" else entry.d_out
    if v.shape[-1] != expected:
        raise ShapeMismatchError(f"--vectors have {v.shape[-1]} entries per sample; "
                                 f"{settings.direction} needs {expected}")
    apply_j, apply_jt = engine.operator(entry.name, x, held)
    block = (v.expand(b, -1) if v.shape[0] == 1 else v)[:, :, None]
    return (apply_j if settings.direction == "jvp" else apply_jt)(block)[:, :, 0]


def _param_product(settings: ProductSettings, inputs: Inputs, engine: Engine, params, x, v
                   ) -> torch.Tensor:
    """Parameter tangents (jvp) or output cotangents (vjp), per sample. A TorchScript model
    goes through its operator graph (for jvp: its per-sample parameter Jacobians, contracted)."""
    b = x.shape[0]
    v = v.to(device=x.device, dtype=x.dtype)
    shapes = [tuple(p.shape) if hasattr(p, "shape") else p[1] for p in params]
    names = [p.name if hasattr(p, "name") else p[0] for p in params]
    sizes = [math.prod(s) for s in shapes]
    graph_only = inputs.loaded.format is ModelFormat.TORCHSCRIPT
    if settings.direction == "jvp":
        flat = v.reshape(-1)
        if flat.numel() != sum(sizes):
            raise ShapeMismatchError(f"--vectors has {flat.numel()} entries; the selected "
                                     f"parameters have {sum(sizes)}")
        tangents = dict(zip(names, torch.split(flat, sizes), strict=True))
        if graph_only:
            jac = engine.engine.param_jacobians(x, None, names)
            return sum(jac[q].reshape(b, jac[q].shape[1], -1) @ t for q, t in tangents.items())
        return param_jvp(inputs.model, x, objective(), {
            q: t.reshape(s) for (q, t), s in zip(tangents.items(), shapes, strict=True)})
    u = v.expand(b, -1) if v.shape[0] == 1 else v
    if graph_only:
        jac = engine.engine.param_jacobians(x, None, names)
        grads = {q: torch.einsum("bc,bcp->bp", u, jac[q].reshape(b, u.shape[1], -1))
                 for q in names}
    else:
        grads = param_vjp(inputs.model, x, objective(), u, params=params)
    return torch.cat([g.reshape(b, -1) for g in grads.values()], dim=1)
