"""The `jvp` / `vjp` pipelines: J v or uᵀ J for every sample, never forming J."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ShapeMismatchError, UsageError
from ..io.data import load_data
from ..io.hashing import sha256_file
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


@dataclass
class PreparedProducts:
    """Checked inputs, the engine, what is multiplied (entry or parameters), the vectors
    `(1 | N, D)` and the batch size."""

    settings: ProductSettings
    inputs: Inputs
    engine: Engine
    entry: object
    params: list | None
    vectors: torch.Tensor
    batch: int


def prepare_products(settings: ProductSettings) -> PreparedProducts:
    """Load and check the inputs and vectors, and build the engine."""
    s = settings
    if s.layer is not None and s.wrt == "params":
        raise UsageError("--layer goes with --wrt inputs")
    guard_output(s.output, s.model, s.data, s.vectors)
    inputs = load_inputs(s.model, s.data, s.run)
    n = len(inputs.data)
    engine = make_engine(inputs, LayerSelection(end_to_end=s.layer is None), s.run)
    name = _entry_name(s, engine)
    entry = next((e for e in engine.entries if e.name == name), None) if name else None
    params = _params(s, inputs, engine) if s.wrt == "params" else None
    vectors = _vectors(s, n)
    d_in, d_out = (entry.d_in, entry.d_out) if entry else (
        math.prod(engine.input_shape), math.prod(engine.output_shape))
    batch = product_batch_size(s.run, inputs, d_in, d_out)
    check_independence(inputs, batch)
    return PreparedProducts(s, inputs, engine, entry, params, vectors, batch)


def run_products(settings: ProductSettings) -> dict:
    """J v (jvp) or uᵀ J (vjp) for every sample; written when an output is set."""
    p = prepare_products(settings)
    started = time.perf_counter()
    result = product_values(p)
    norms = np.linalg.norm(result.reshape(len(result), -1), axis=1)
    seconds = time.perf_counter() - started
    if settings.output.path is not None:
        write_products(p, settings.output.path, result, norms, seconds=seconds)
    return products_summary(p, norms, result.shape[1:], seconds=seconds)


def product_values(p: PreparedProducts) -> np.ndarray:
    """The products of every sample, `(N, D)` in float64."""
    s, inputs, n = p.settings, p.inputs, len(p.inputs.data)
    products = []
    for start in range(0, n, p.batch):
        stop = min(start + p.batch, n)
        x, held = inputs.batch(start, stop)
        v = p.vectors[start:stop] if p.vectors.shape[0] == n else p.vectors
        product = (_param_product(s, inputs, p.engine, p.params, x, v, held)
                   if p.params is not None
                   else _input_product(s, p.engine, p.entry, x, v, held))
        products.append(product.detach().cpu())
    return torch.cat(products).to(torch.float64).numpy()


def layer_label(settings: ProductSettings) -> str:
    return settings.layer or (END_TO_END if settings.wrt == "inputs" else "parameters")


def products_summary(p: PreparedProducts, norms: np.ndarray, sample_shape, *,
                     seconds: float) -> dict:
    """The summary over the samples whose product norms are `norms` `(N,)`."""
    s = p.settings
    return {"schema": "jaccli/products-summary", "schema_version": 1,
            "command": s.direction, "wrt": s.wrt, "layer": layer_label(s),
            "model": str(s.model.path), "data": str(s.data.path), "n_samples": len(norms),
            "shape": [len(norms), *sample_shape], "norm": aggregate(norms),
            "output": None if s.output.path is None else str(s.output.path),
            "engine": p.engine.path, "seconds": seconds}


def products_attrs(p: PreparedProducts) -> dict:
    """The root attributes (provenance) of this run's products file."""
    from .compute import options_fingerprint

    return provenance(p.settings.command_line, p.inputs, engine=p.engine.path,
                      options_sha256=options_fingerprint(p.settings),
                      vectors_sha256=sha256_file(p.settings.vectors))


def write_products(p: PreparedProducts, path, result: np.ndarray, norms: np.ndarray,
                   attrs: dict | None = None, *, seconds: float) -> None:
    """The products file (docs/FORMAT.md, `kind = "products"`)."""
    s = p.settings
    with ResultsWriter(path, kind="products", sample_index=p.inputs.data.indices,
                       attrs=products_attrs(p) if attrs is None else attrs) as writer:
        group = writer.create_group("product", parent="products", attrs={
            "direction": s.direction, "wrt": s.wrt, "layer": layer_label(s)})
        group.create_dataset("product", data=result.astype(
            np.float64 if p.inputs.dtype == torch.float64 else np.float32))
        group.create_dataset("norm", data=norms)
        writer.finish({"batch_size": p.batch, "seconds": seconds})


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


def _graph_only(inputs: Inputs) -> bool:
    """Parameter products on the operator graph: a TorchScript model (torch.func cannot
    call it), or a forward whose other inputs `--input`/`--const` hold fixed."""
    return inputs.loaded.format is ModelFormat.TORCHSCRIPT or inputs.call is not None


def _params(settings: ProductSettings, inputs: Inputs, engine: Engine):
    """The selected parameters: graph names where the products run on the operator graph
    (`_graph_only`), module parameters otherwise."""
    if _graph_only(inputs):
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


def _param_product(settings: ProductSettings, inputs: Inputs, engine: Engine, params, x, v,
                   held: tuple = ()) -> torch.Tensor:
    """Parameter tangents (jvp) or output cotangents (vjp), per sample. A TorchScript model,
    or one called with inputs held fixed (`held`, rows `(B, ...)`), goes through its operator
    graph (its per-sample parameter Jacobians, contracted)."""
    b = x.shape[0]
    v = v.to(device=x.device, dtype=x.dtype)
    shapes = [tuple(p.shape) if hasattr(p, "shape") else p[1] for p in params]
    names = [p.name if hasattr(p, "name") else p[0] for p in params]
    sizes = [math.prod(s) for s in shapes]
    graph_only = _graph_only(inputs)
    if settings.direction == "jvp":
        flat = v.reshape(-1)
        if flat.numel() != sum(sizes):
            raise ShapeMismatchError(f"--vectors has {flat.numel()} entries; the selected "
                                     f"parameters have {sum(sizes)}")
        tangents = dict(zip(names, torch.split(flat, sizes), strict=True))
        if graph_only:
            jac = engine.engine.param_jacobians(x, None, names, held=held)
            return sum(jac[q].reshape(b, jac[q].shape[1], -1) @ t for q, t in tangents.items())
        return param_jvp(inputs.model, x, objective(), {
            q: t.reshape(s) for (q, t), s in zip(tangents.items(), shapes, strict=True)})
    u = v.expand(b, -1) if v.shape[0] == 1 else v
    if graph_only:
        jac = engine.engine.param_jacobians(x, None, names, held=held)
        grads = {q: torch.einsum("bc,bcp->bp", u, jac[q].reshape(b, u.shape[1], -1))
                 for q in names}
    else:
        grads = param_vjp(inputs.model, x, objective(), u, params=params)
    return torch.cat([g.reshape(b, -1) for g in grads.values()], dim=1)
