"""The Jacobian engine a run uses — the operator-graph engine for every model it can capture,
forward hooks as the fallback — behind the one interface the planner and pipelines read."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.structures import Structured
from ..errors import UnsupportedModuleError, UsageError, is_out_of_memory
from ..graph import GraphEngine, algebra, capture
from ..graph import accumulate as acc
from ..graph.engine import END_TO_END, LayerPlan
from ..graph.opgraph import BATCHED, OpGraph
from ..io.models import ModelFormat
from ..settings import LayerSelection, RunOptions
from ..tracing.layers import Layer
from . import graph_cache
from .convolution_layers import convolution_kernel

# A product along a path holds its operand and result, and applying a convolution to them
# (as a transposed convolution) an im2col workspace several times as large.
PRODUCT_COPIES = 16

Apply = Callable[[torch.Tensor], torch.Tensor]  # (B, D, b) -> (B, D', b): blocks of vectors


@dataclass
class EntryPlan:
    """One Jacobian the engine computes, known before anything runs: a layer's or the
    end-to-end one. rule: how (rule names, `generic`, ...); structure: its exact compact
    form; mode: `fwd`/`rev` for generic parts, `-` otherwise; members: module names;
    module: the module object when it is one leaf module (for methods that need it)."""

    name: str
    kind: str
    type_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    rule: str
    structure: str
    mode: str
    members: tuple[str, ...] = ()
    note: str = ""
    module: nn.Module | None = None
    kernel: int | None = None  # weight values, for a layer that is one convolution

    @property
    def d_in(self) -> int:
        return math.prod(self.input_shape)

    @property
    def d_out(self) -> int:
        return math.prod(self.output_shape)


class Engine:
    """What every engine gives a pipeline.

    path: which engine and capture (`graph: export-dynamic`, `hooks`); note: why.
    entries: the plan of every Jacobian; chain: input -> output is one chain (the Lipschitz
    product of layer norms is a bound only then); chain_costs: the end-to-end ordering costs.
    """

    path: str
    note: str
    entries: list[EntryPlan]
    chain: bool
    chain_costs: dict[str, float] | None = None
    skipped: list[Layer] = []
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    last_seconds: dict[str, float]

    def compute(self, x: torch.Tensor, *, names: set[str] | None = None,
                chunk_size: int | None = None, held: tuple = ()) -> dict[str, Structured]:
        """`{entry name: structured Jacobian}` for a batch `x (B, *in_shape)`; held: the
        values `(B, ...)` of the model inputs held fixed (graph engine only), here and in
        every method taking a batch."""
        raise NotImplementedError

    def operator(self, name: str, x: torch.Tensor, held: tuple = ()) -> tuple[Apply, Apply]:
        """`(V ↦ J V, U ↦ Jᵀ U)` for entry `name` at `x`, on blocks `(B, D, b)`."""
        raise NotImplementedError

    def cumulative(self, x: torch.Tensor, held: tuple = ()
                   ) -> Iterator[tuple[str, torch.Tensor]]:
        """`(layer, J_{1:l})`: each layer output's Jacobian w.r.t. the model input."""
        raise NotImplementedError

    def route_of(self, name: str) -> str:
        return ""

    def clear_cache(self) -> None:
        """Forget the shared Jacobians, so the next batch computes them again."""

    def held_values(self, names: set[str] | None = None) -> HeldValues:
        """Values per sample a batch holds beyond the Jacobians themselves, for the planner.

        This estimate (for engines without an operator graph): the recording keeps each
        layer's input and output; the end-to-end product's intermediates are as wide as its
        smaller side times the widest layer (`PRODUCT_COPIES` times).
        """
        chosen = [e for e in self.entries if names is None or e.name in names]
        layers = [e for e in self.entries if e.kind == "layer"]
        recorded = math.prod(self.input_shape) + sum(e.d_in + e.d_out for e in layers)
        widest = max((e.d_out for e in layers), default=0)
        widths = {e.name: PRODUCT_COPIES * min(e.d_in, e.d_out) * max(widest, e.d_in, e.d_out)
                  for e in chosen if e.kind == "end_to_end" and len(layers) > 1}
        return HeldValues(recorded, 0, widths)


@dataclass
class HeldValues:
    """What computing a batch holds per sample, in values (multiply by the item size).

    recorded: the forward pass's saved tensors; units: the per-op Jacobians kept while the
    batch is computed (beyond the entries' own); accumulation: per entry, the widest
    intermediates of forming it from its parts (products along its paths), 0 for none.
    """

    recorded: int
    units: int
    accumulation: dict[str, int]


class GraphRun(Engine):
    """The operator-graph engine (`jaccli.graph`) on a captured graph."""

    def __init__(self, graph: OpGraph, *, granularity: str, patterns: list[str] | None,
                 include_layers: bool, end_to_end: bool, output: str | int | None = None,
                 module: nn.Module | None = None, samples: int = 64):
        self.graph = graph
        self.engine = GraphEngine(graph, granularity=granularity, end_to_end=end_to_end,
                                  output=output, samples=samples)
        everything = [layer.name for layer in self.engine.layers]
        if not include_layers:
            self.engine.layers = []
        elif patterns:
            self.engine = GraphEngine(graph, granularity=granularity, layer_patterns=patterns,
                                      end_to_end=end_to_end, output=output, samples=samples)
            if not self.engine.layers:
                raise UsageError(f"--layers {' '.join(patterns)} matches no layer; layers "
                                 f"are: {', '.join(everything) or '(none)'}")
        self.path, self.note = f"graph: {graph.capture_path}", graph.capture_note
        plan = self.engine.plan()
        rows = plan.layers + ([plan.end_to_end] if plan.end_to_end else [])
        self.entries = [_entry(row, module, convolution_kernel(graph, row)) for row in rows]
        names = list(graph.outputs)
        if len(names) > 1 and self.entries and self.entries[-1].kind == "end_to_end":
            chosen = [n for n, node in graph.outputs.items() if node in self.engine.outputs]
            self.entries[-1].note = (
                f"the model returns {len(names)} outputs ({', '.join(names)}): "
                + (f"output {chosen[0]} is differentiated" if len(chosen) == 1 else
                   "all are differentiated, flattened and concatenated in order "
                   "(choose one with --model-output)"))
        self.chain = self.engine.is_chain()
        self.chain_costs = self.engine.chain_costs() if end_to_end else None
        self.input_shape = graph.input_shape
        shapes = [graph[name].shape for name in self.engine.outputs]
        self.output_shape = tuple(shapes[0]) if len(shapes) == 1 else (
            sum(math.prod(s) for s in shapes),)
        self.last_seconds = {}

    def compute(self, x, *, names=None, chunk_size=None, held=()):
        result = self.engine.compute(x, names, held)
        self.last_seconds = dict(self.engine.last_seconds)
        return result

    def operator(self, name, x, held=()):
        op = (self.engine.end_to_end_operator(x, held) if name == END_TO_END
              else self.engine.layer_operator(name, x, held))
        return op.jvp, op.vjp

    def cumulative(self, x, held=()):
        yield from self.engine.cumulative(x, held)

    def route_of(self, name):
        return self.engine.route_of(name)

    def clear_cache(self):
        self.engine._shared.clear()

    def held_values(self, names=None):
        """From the graph: every per-sample node's value is recorded; the unit Jacobians on
        the selected paths are kept for the batch; products along a path hold intermediates
        as wide as its smaller end times the widest node on it (operand, result and the op's
        workspace: `PRODUCT_COPIES` times)."""
        graph, engine = self.graph, self.engine
        recorded = sum(node.numel for node in graph.nodes.values()
                       if node.kind in BATCHED and node.target is not None) \
            + graph[graph.input].numel
        wanted = {layer.name: layer.paths for layer in engine.layers
                  if names is None or layer.name in names}
        if engine.end_to_end and (names is None or END_TO_END in names):
            for i, p in enumerate(engine._paths()):
                wanted[END_TO_END if i == 0 else f"{END_TO_END}#{i}"] = p
        units, seen, widths = 0, set(), {}
        for name, p in wanted.items():
            sizes = acc.sizes_of(graph, p)
            entry = END_TO_END if name.startswith(END_TO_END) else name
            if len(p.units) > 1:
                width = (PRODUCT_COPIES * min(sizes[p.source], graph[p.target].numel)
                         * max(sizes.values()))
                widths[entry] = widths.get(entry, 0) + width
                for unit in p.units:  # each (unit, input) Jacobian is kept for the batch
                    for source in p.edges[unit]:
                        if (unit, source) not in seen:
                            seen.add((unit, source))
                            tag = engine.units[unit].plans[source].tag
                            units += _unit_values(tag, sizes[unit], sizes[source])
        return HeldValues(recorded, units, widths)


def _unit_values(tag: str, d_out: int, d_in: int) -> int:
    """Values per sample of one op's Jacobian in memory, by its structure tag (shared ones
    are counted with the shared matrices)."""
    if tag in algebra.SHARED_TAGS:
        return 0
    if tag in ("diagonal", "row-scaled"):
        return d_out
    if tag in ("selection", "gather"):
        return 2 * d_out  # an int64 index (and a weight)
    return d_out * d_in


def _entry(row: LayerPlan, module: nn.Module | None, kernel: int | None = None) -> EntryPlan:
    rules = list(dict.fromkeys(r for op in row.ops for r in (op.rules or [op.op])))
    generic = [op for op in row.ops if op.mode != "rule"]
    modes = sorted({op.mode for op in generic})
    rule = ("chain product" if row.chain else "DAG accumulation") if row.name == END_TO_END \
        else "+".join(rules) or "identity"
    if generic:
        rule = f"{rule} (generic: {', '.join(dict.fromkeys(op.op for op in generic))})"
    leaf = None
    if module is not None and len(row.members) == 1:
        with contextlib.suppress(AttributeError):  # a name converted models may not have
            leaf = module.get_submodule(row.members[0])
    kind = "end_to_end" if row.name == END_TO_END else "layer"
    return EntryPlan(row.name, kind, row.type, tuple(row.input_shape), tuple(row.output_shape),
                     rule, row.structure, "/".join(modes) or "-", tuple(row.members),
                     row.note, leaf, kernel)


def capture_graph(model, example: torch.Tensor, device: torch.device, dtype: torch.dtype, *,
                  layout=None, held: tuple = (), cache_key: str | None = None
                  ) -> tuple[OpGraph | None, str]:
    """The operator graph of `model` (module, ExportedProgram or ScriptModule), its state on
    `device` in `dtype`; or None and why it could not be captured. layout / held: how a
    forward taking several arguments is called (`jaccli.graph.capture`). cache_key: the
    graph cache's key for this module and example (`graph_cache.cache_key`), None: no cache."""
    graph = graph_cache.load_graph(cache_key, model)  # model: also an ExportedProgram
    if graph is None:
        try:
            with warnings.catch_warnings():  # torch's deprecation notices are not the user's
                warnings.simplefilter("ignore")
                graph = capture(model, example, layout=layout, held=held)
        except Exception as exc:  # export and conversion fail in many ways
            if is_out_of_memory(exc):
                raise
            return None, f"the operator graph could not be captured ({first_line(exc)})"
        graph_cache.store_graph(cache_key, graph, model)
    graph.state = {name: (qualified, _moved(value, device, dtype))
                   for name, (qualified, value) in graph.state.items()}
    for node in graph.nodes.values():  # tensors the program creates follow --dtype too
        made = node.kwargs.get("dtype")
        if isinstance(made, torch.dtype) and made.is_floating_point and made != dtype:
            node.kwargs = {**node.kwargs, "dtype": dtype}
    return graph, graph.capture_note


def _moved(value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device=device)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
def make_engine(inputs, layers: LayerSelection, run: RunOptions, *, inputs_wrt: bool = True,
                output: str | int | None = None, n_samples: int | None = None) -> Engine:
    """The engine for what `layers` selects (no layers nor end-to-end Jacobian when the run
    differentiates only w.r.t. parameters): on the operator graph when the model can be
    captured, else on module hooks; `engine.path` and `engine.note` say which and why."""
    loaded = inputs.loaded
    include = layers.include_layers and inputs_wrt
    end_to_end = layers.end_to_end and inputs_wrt
    if inputs.graph is None and not inputs.capture_note:
        target = loaded.program if loaded.program is not None else inputs.model
        key = graph_cache.cache_key(inputs.source, loaded, inputs.example, layout=inputs.layout)
        inputs.graph, inputs.capture_note = capture_graph(
            target, inputs.example, inputs.device, inputs.dtype,
            layout=inputs.layout, held=inputs.held_example, cache_key=key)
    if inputs.graph is not None:
        module = None if loaded.format is ModelFormat.TORCHSCRIPT else inputs.model
        engine = GraphRun(inputs.graph, granularity=layers.granularity,
                          patterns=layers.patterns, include_layers=include,
                          end_to_end=end_to_end, output=_output(output or layers.output),
                          module=module,
                          samples=n_samples or len(inputs.data))
        _apply_run_options(engine, run)
        return engine
    if inputs.call is not None:
        raise UnsupportedModuleError(f"--input/--const/--wrt NAME need the operator graph, "
                                     f"and {inputs.capture_note}")
    if layers.output is not None:
        raise UsageError(f"--model-output needs the operator graph, and "
                         f"{inputs.capture_note}")
    if layers.granularity == "op":
        raise UsageError(f"--granularity op needs the operator graph, and "
                         f"{inputs.capture_note}; use module or block")
    if loaded.static_batch is not None:
        raise UnsupportedModuleError(f"{loaded.path} was exported for a batch of "
                                     f"{loaded.static_batch} only, and {inputs.capture_note}")
    from .hook_engine import HookRun, trace_model

    trace = trace_model(layers if inputs_wrt else LayerSelection(include_layers=False,
                                                                   end_to_end=False),
                        loaded, inputs.model, inputs.example)
    return HookRun(inputs.model, trace, hookable=loaded.hookable,
                   layers=trace.layers if include else [], end_to_end=end_to_end,
                   n_samples=n_samples or len(inputs.data), strict=run.strict_rules,
                   mode=run.mode,
                   note=f"{inputs.capture_note}; module hooks instead")


def _output(name: str | int | None) -> str | int | None:
    """`--model-output`: an index when it is a number, else a name."""
    return int(name) if isinstance(name, str) and name.isdigit() else name


def _apply_run_options(engine: GraphRun, run: RunOptions) -> None:
    """`--mode` for the generic per-op route; `--strict-rules` refuses it."""
    if run.mode != "auto":
        for unit in engine.engine.units.values():
            for plan in unit.plans.values():
                if plan.mode in ("fwd", "rev"):
                    plan.mode = run.mode
    if run.strict_rules:
        generic = [e.name for e in engine.entries if "generic" in e.rule]
        if generic:
            raise UnsupportedModuleError(f"--strict-rules: {', '.join(generic)} need the "
                                         "generic torch.func path (an op without a rule)")
