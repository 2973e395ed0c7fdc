"""The `ntk` pipeline, its set-up: load model and data (and DATA2 for a cross kernel), find
each parameter's factors (operator graph, else module hooks), and plan the blocks over
sample pairs from the cost model and the memory budget (`ntk_memory`; `ntk_run` then
computes them).

Shapes: N samples of DATA, M of DATA2 (M = N without it), C model outputs (flattened),
B samples per block. Kernel: full `(N, M, C, C)`, trace `(N, M)`, diagonal `(N, C, C)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..errors import ShapeMismatchError, UsageError
from ..io.data import DataSource, load_data
from ..io.models import ModelFormat
from ..params.ntk import Factor, factor_costs, factor_route, layer_of
from ..params.ntk_hooks import hook_factors
from ..settings import LayerSelection
from .common import Inputs, check_independence, guard_output, load_inputs
from .engines import GraphRun, make_engine
from .ntk_memory import BlockPlan, plan_blocks
from .ntk_settings import NtkSettings
from .resources import memory_budget


@dataclass
class ParamPlan:
    """One parameter: its route (`gram`, `jacobian` or `generic`), what the cost model
    predicts per pair of samples (multiply-adds) and per sample (bytes of its factors)."""

    name: str
    layer: str
    shape: tuple[int, ...]
    route: str
    how: str
    pair_multiply_adds: float
    bytes_per_sample: float


@dataclass
class NtkRun:
    settings: NtkSettings
    inputs: Inputs
    second: DataSource | None
    factors: Callable[..., dict[str, Factor]]  # (x (B, ...), held rows (B, ...)) -> factors
    engine_path: str
    engine_note: str
    params: list[ParamPlan]
    layers: list[str]
    n_outputs: int
    model_output: str
    blocks: BlockPlan
    budget: int
    budget_source: str

    @property
    def symmetric(self) -> bool:
        """Θ(X, X) in full or trace mode: blocks above the diagonal are mirrored."""
        return self.second is None and self.settings.mode != "diagonal"

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        n, c = len(self.inputs.data), self.n_outputs
        m = len(self.second) if self.second is not None else n
        mode = self.settings.mode
        return (n, c, c) if mode == "diagonal" else (n, m) if mode == "trace" else (n, m, c, c)

    @property
    def kernel_bytes(self) -> int:
        return math.prod(self.kernel_shape) * self.inputs.dtype.itemsize


def prepare_ntk(settings: NtkSettings) -> NtkRun:
    """Load, find the factors of every parameter on one sample, and plan the blocks."""
    guard_output(settings.output, settings.model, settings.data, settings.data2)
    if settings.data2 is not None and settings.model.inputs:
        raise UsageError("--input gives per-sample inputs that go with DATA's rows, and "
                         "DATA2 has none: the cross kernel takes --const only; drop DATA2")
    inputs = load_inputs(settings.model, settings.data, settings.run)
    second = _second_data(settings, inputs) if settings.data2 is not None else None
    factors, path, note, hows, chosen = _factor_source(inputs, settings)
    one = factors(inputs.example[:1], tuple(h[:1] for h in inputs.held_example))
    if not one:
        raise UsageError("no parameter moves the model's outputs: its NTK is zero")
    itemsize = inputs.dtype.itemsize
    params = [_param_plan(name, f, settings.mode, itemsize, hows.get(name, ""), path)
              for name, f in one.items()]
    layers = list(dict.fromkeys(f.layer or layer_of(n) for n, f in one.items()))
    first = next(iter(one.values()))
    c = (first.cotangents if first.kind == "gram" else first.jacobian).shape[1]
    budget, source = memory_budget(inputs.device, settings.run.max_memory)
    n = len(inputs.data)
    m = len(second) if second is not None else n
    run = NtkRun(settings, inputs, second, factors, path, note, params, layers, c, chosen,
                 None, budget, source)  # type: ignore[arg-type]
    run.blocks = plan_blocks(run, _activation_bytes(inputs, c, itemsize), n, m)
    check_independence(inputs, run.blocks.block_size)
    return run


def with_block_size(run: NtkRun, block_size: int) -> NtkRun:
    """`run` planned again with blocks of `block_size` samples (under torchrun: the
    smallest any rank's memory allows, so that every rank splits the kernel alike)."""
    settings = replace(run.settings, run=replace(run.settings.run, batch_size=block_size))
    run = replace(run, settings=settings)
    n = len(run.inputs.data)
    m = len(run.second) if run.second is not None else n
    run.blocks = plan_blocks(run, _activation_bytes(run.inputs, run.n_outputs,
                                                    run.inputs.dtype.itemsize), n, m)
    return run


def _second_data(settings: NtkSettings, inputs: Inputs) -> DataSource:
    """DATA2, selected by the same --key/--offset/--limit; its samples must be shaped as
    DATA's."""
    selection = settings.data
    second = load_data(settings.data2, key=selection.key, offset=selection.offset,
                       limit=selection.limit)
    if second.sample_shape != inputs.data.sample_shape:
        raise ShapeMismatchError(
            f"DATA2 samples have shape {second.sample_shape} but DATA samples have shape "
            f"{inputs.data.sample_shape}; a cross kernel needs inputs of the same shape")
    second.match_input_shape(inputs.loaded.input_shape)
    second.check_finite()
    return second


def _factor_source(inputs: Inputs, settings: NtkSettings):
    """`(x (B, *in_shape), held) -> {param: Factor}` (held: the rows `(B, ...)` of the
    inputs `--input` holds fixed), on the operator graph or by module hooks; the
    engine's path and note; `{param: how}` in words (graph route); the model output(s) the
    kernel is of, in words (`--model-output`, chosen as `compute` chooses it)."""
    engine = make_engine(inputs, LayerSelection(include_layers=False, end_to_end=False,
                                                output=settings.model_output),
                         settings.run, inputs_wrt=False)
    if isinstance(engine, GraphRun):
        from ..graph.ntk import ntk_factors, param_routes

        routes = param_routes(engine.engine)
        if not routes:
            raise UsageError("the model has no parameters: its NTK is zero")

        def on_graph(x, held=()):
            with torch.no_grad():
                return ntk_factors(engine.engine, x, routes, held)

        return (on_graph, engine.path, engine.note, {r.name: r.how for r in routes},
                _chosen_output(list(engine.graph.outputs), [
                    n for n, node in engine.graph.outputs.items()
                    if node in engine.engine.outputs]))
    loaded = inputs.loaded
    if not loaded.hookable or loaded.format is ModelFormat.TORCHSCRIPT:
        raise UsageError(f"ntk needs the operator graph or module hooks, and {engine.note}")
    linear = frozenset(name for name, m in inputs.model.named_modules()
                       if loaded.type_name(name, m) == "Linear")
    return ((lambda x, held=(): hook_factors(inputs.model, x, linear)), engine.path,
            engine.note, {},
            _hook_output(inputs))


def _chosen_output(names: list[str], chosen: list[str]) -> str:
    """The summary's `output: ...` for a graph run: which of the model's outputs Θ is of."""
    if len(names) == 1:
        return "the model's output"
    if len(chosen) == 1:
        return f"{chosen[0]} (of the model's {len(names)} outputs {', '.join(names)})"
    return (f"all {len(names)} outputs ({', '.join(names)}), flattened and concatenated in "
            "order (choose one with --model-output)")


def _hook_output(inputs: Inputs) -> str:
    """The hook route differentiates the first tensor the model returns."""
    with torch.no_grad():
        value = inputs.model(inputs.example[:1])
    if isinstance(value, torch.Tensor):
        return "the model's output"
    return ("its first tensor output (the operator graph could not be captured: module "
            "hooks take the first tensor the model returns)")


def _param_plan(name: str, factor: Factor, mode: str, itemsize: int, how: str, path: str
                ) -> ParamPlan:
    best = factor_route(factor, mode)
    if factor.kind == "gram":
        route = best.route
        how = how or "nn.Linear weight: Gram factors"
        if route == "jacobian":
            how += "; cheaper formed as its per-sample Jacobian"
    elif "generic" in how or (not how and not path.startswith("graph")
                              and not name.endswith(".bias")):
        route, how = "generic", how or "torch.func VJP of its module, per sample"
    else:
        route, how = "jacobian", how or "Σ_t G_t of its Linear module"
    shape = tuple(factor.jacobian.shape[2:]) if factor.kind == "jacobian" else (
        factor.cotangents.shape[3], factor.inputs.shape[2])
    cost = next(c for c in factor_costs(factor, mode, itemsize) if c.route == best.route)
    return ParamPlan(name, factor.layer or layer_of(name), shape, route, how,
                     float(best.pair_flops), float(cost.sample_bytes))


def _activation_bytes(inputs: Inputs, c: int, itemsize: int) -> float:
    """Per sample, what the forward and the reverse pass with C cotangents hold at once
    (estimated from the graph: every activation once, the widest C times over three times:
    the cotangents flowing back, a residual branch's pending ones, and a closed form's
    working copy of them, e.g. the im2col product's)."""
    graph = inputs.graph
    if graph is None:
        return 4.0 * c * inputs.example[0].numel() * itemsize
    sizes = [graph[a].numel for a in graph.activations()]
    return float(itemsize * (sum(sizes) + 3 * c * max(sizes, default=0)))


def ntk_plan(run: NtkRun) -> dict:
    """The `--dry-run` document: each parameter's route and predicted cost, the blocks."""
    settings, blocks = run.settings, run.blocks
    multiply_adds = sum(p.pair_multiply_adds for p in run.params) * blocks.pairs
    copies = 1 + (len(run.layers) if settings.per_layer else 0)
    return {
        "schema": "jaccli/ntk-plan", "schema_version": 1, "command": "ntk",
        "model": str(settings.model.path), "data": str(settings.data.path),
        "data2": None if settings.data2 is None else str(settings.data2),
        "engine": run.engine_path, "engine_note": run.engine_note, "mode": settings.mode,
        "cross": run.second is not None, "per_layer": settings.per_layer,
        "n_samples": len(run.inputs.data),
        "m_samples": len(run.second) if run.second is not None else len(run.inputs.data),
        "n_outputs": run.n_outputs, "model_output": run.model_output,
        "kernel_shape": list(run.kernel_shape),
        "kernel_bytes": run.kernel_bytes, "output_bytes": run.kernel_bytes * copies,
        "params": [{"name": p.name, "layer": p.layer, "shape": list(p.shape),
                    "route": p.route, "how": p.how,
                    "pair_multiply_adds": p.pair_multiply_adds,
                    "bytes_per_sample": p.bytes_per_sample} for p in run.params],
        "layers": run.layers, "multiply_adds": multiply_adds, "pairs": blocks.pairs,
        "block_size": blocks.block_size, "blocks": blocks.computed_blocks,
        "factor_passes": blocks.factor_passes, "cache_factors": blocks.cache_factors,
        "bytes_per_sample": blocks.bytes_per_sample, "bytes_per_pair": blocks.bytes_per_pair,
        "peak_bytes": blocks.peak_bytes, "memory_budget_bytes": run.budget,
        "memory_budget_source": run.budget_source, "memory_terms": blocks.terms,
        "baseline_bytes": blocks.baseline_bytes, "baseline_source": blocks.baseline_source,
        "device": str(run.inputs.device), "ranks": 1,
        "dtype": str(run.inputs.dtype).removeprefix("torch."),
    }
