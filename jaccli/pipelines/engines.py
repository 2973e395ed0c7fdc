"""The Jacobian engine a run uses — the operator-graph engine for every model it can capture,
forward hooks as the fallback — behind the one interface the planner and pipelines read."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.engine import JacobianEngine
from ..engine.structures import Structured
from ..errors import UnsupportedModuleError, UsageError, is_out_of_memory
from ..graph import GraphEngine, capture
from ..graph.engine import END_TO_END, LayerPlan
from ..graph.opgraph import OpGraph
from ..io.models import LoadedModel, ModelFormat
from ..settings import LayerSelection, RunOptions
from ..tracing.layers import Layer, Trace, trace_end_to_end, trace_layers
from ..tracing.recorder import ForwardRecorder, run_model

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
                chunk_size: int | None = None) -> dict[str, Structured]:
        """`{entry name: structured Jacobian}` for a batch `x (B, *in_shape)`."""
        raise NotImplementedError

    def operator(self, name: str, x: torch.Tensor) -> tuple[Apply, Apply]:
        """`(V ↦ J V, U ↦ Jᵀ U)` for entry `name` at `x`, on blocks `(B, D, b)`."""
        raise NotImplementedError

    def cumulative(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """`(layer, J_{1:l})`: each layer output's Jacobian w.r.t. the model input."""
        raise NotImplementedError

    def route_of(self, name: str) -> str:
        return ""

    def clear_cache(self) -> None:
        """Forget the shared Jacobians, so the next batch computes them again."""


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
        self.entries = [_entry(row, module) for row in rows]
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

    def compute(self, x, *, names=None, chunk_size=None):
        result = self.engine.compute(x, names)
        self.last_seconds = dict(self.engine.last_seconds)
        return result

    def operator(self, name, x):
        op = (self.engine.end_to_end_operator(x) if name == END_TO_END
              else self.engine.layer_operator(name, x))
        return op.jvp, op.vjp

    def cumulative(self, x):
        yield from self.engine.cumulative(x)

    def route_of(self, name):
        return self.engine.route_of(name)

    def clear_cache(self):
        self.engine._shared.clear()


def _entry(row: LayerPlan, module: nn.Module | None) -> EntryPlan:
    rules = list(dict.fromkeys(r for op in row.ops for r in (op.rules or [op.op])))
    generic = [op for op in row.ops if op.mode != "rule"]
    modes = sorted({op.mode for op in generic})
    rule = "+".join(rules) or "identity"
    if row.name == END_TO_END:
        rule = "chain product" if row.chain else "DAG accumulation"
    if generic:
        rule = f"{rule} (generic: {', '.join(dict.fromkeys(op.op for op in generic))})"
    leaf = None
    if module is not None and len(row.members) == 1:
        try:
            leaf = module.get_submodule(row.members[0])
        except AttributeError:  # a name the module tree does not have (converted models)
            leaf = None
    kind = "end_to_end" if row.name == END_TO_END else "layer"
    return EntryPlan(row.name, kind, row.type, tuple(row.input_shape), tuple(row.output_shape),
                     rule, row.structure, "/".join(modes) or "-", tuple(row.members),
                     row.note, leaf)


class HookRun(Engine):
    """The module-hook engine (`jaccli.engine`): the fallback for models the graph cannot
    capture. It refuses end-to-end products when a module's output was changed in place
    before the next module read it (the trace then is not a chain)."""

    def __init__(self, model: nn.Module, trace: Trace, *, hookable: bool, layers: list[Layer],
                 end_to_end: bool, n_samples: int, strict: bool, mode: str, note: str):
        self.model, self.trace, self.hookable = model, trace, hookable
        self.engine = JacobianEngine(model, trace, layers=layers, end_to_end=end_to_end,
                                     n_samples=n_samples, strict=strict, mode=mode)
        self.path, self.note = "hooks", note
        self.chain, self.skipped = trace.chain, list(trace.skipped)
        self.input_shape, self.output_shape = trace.input_shape, trace.output_shape
        self.entries = self._entries()
        plan = self.engine.chain_plan
        self.chain_costs = None if plan is None else {
            "chosen": plan.cost, "forward": plan.forward_cost, "reverse": plan.reverse_cost}
        self.last_seconds = {}

    def _entries(self) -> list[EntryPlan]:
        engine, out = self.engine, []
        for layer in engine.layers:
            plans = engine.site_plans[layer.name]
            modes = {p.mode for p in plans if p.mode}
            out.append(EntryPlan(
                layer.name, "layer", layer.type_name, layer.input_shape, layer.output_shape,
                "+".join(p.rule_name for p in plans), engine.structure(layer),
                "/".join(sorted(modes)) or "-", layer.module_names,
                module=layer.modules[0] if len(layer.modules) == 1 else None))
        if engine.end_to_end:
            if engine.chain_plan is not None:
                rule, mode = "chain product", "-"
            elif engine.e2e_from_chain:
                rule = engine.end_to_end_method
                mode = "rev" if rule.startswith("reverse") else "fwd"
            else:
                d_in, d_out = math.prod(self.input_shape), math.prod(self.output_shape)
                rule = "generic"
                mode = engine.mode if engine.mode != "auto" else ("fwd" if d_in < d_out
                                                                  else "rev")
            out.append(EntryPlan(END_TO_END, "end_to_end", "model", self.input_shape,
                                 self.output_shape, rule, engine.end_to_end_structure, mode))
        return out

    def _records(self, x):
        if not self.engine.needs_records:
            return {}
        _, calls = run_model(ForwardRecorder(self.model, self.hookable, self.trace.positions),
                             x)
        return {r.site: r for r in calls}

    def compute(self, x, *, names=None, chunk_size=None):
        result = self.engine.compute(x, self._records(x), names=names, chunk_size=chunk_size)
        self.last_seconds = dict(self.engine.last_seconds)
        return result

    def operator(self, name, x):
        records = self._records(x) if name == END_TO_END else self._all_records(x)
        if name == END_TO_END:
            return self.engine.end_to_end_operator(x, records)
        layer = next(layer for layer in self.trace.all_layers if layer.name == name)
        return self.engine.layer_operator(layer, records)

    def _all_records(self, x):
        _, calls = run_model(ForwardRecorder(self.model, self.hookable, self.trace.positions),
                             x)
        return {r.site: r for r in calls}

    def cumulative(self, x):
        yield from self.engine.cumulative(x, self._all_records(x))

    def route_of(self, name):
        return self.engine.route_of(name)

    def clear_cache(self):
        self.engine.clear_cache()


def capture_graph(model, example: torch.Tensor, device: torch.device, dtype: torch.dtype
                  ) -> tuple[OpGraph | None, str]:
    """The operator graph of `model` (module, ExportedProgram or ScriptModule), its state on
    `device` in `dtype`; or None and why it could not be captured."""
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices are not the user's
            warnings.simplefilter("ignore")
            graph = capture(model, example)
    except Exception as exc:  # export and conversion fail in many ways
        if is_out_of_memory(exc):
            raise
        return None, f"the operator graph could not be captured ({first_line(exc)})"
    graph.state = {name: (qualified, _moved(value, device, dtype))
                   for name, (qualified, value) in graph.state.items()}
    return graph, graph.capture_note


def _moved(value: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device=device)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
def trace_model(layers: LayerSelection, loaded: LoadedModel, model: nn.Module,
                example: torch.Tensor) -> Trace:
    """The model's layers (as `layers` selects them), from one forward pass on `example`."""
    if layers.include_layers:
        return trace_layers(model, example, type_name=loaded.type_name,
                            hookable=loaded.hookable, granularity=layers.granularity,
                            patterns=layers.patterns)
    try:  # layers are still traced, to form the end-to-end Jacobian by chain products
        trace = trace_layers(model, example, type_name=loaded.type_name,
                             hookable=loaded.hookable, granularity=layers.granularity)
    except UnsupportedModuleError:
        return trace_end_to_end(model, example)
    trace.layers = []
    return trace




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
        inputs.graph, inputs.capture_note = capture_graph(target, inputs.example,
                                                          inputs.device, inputs.dtype)
    if inputs.graph is not None:
        module = None if loaded.format is ModelFormat.TORCHSCRIPT else inputs.model
        engine = GraphRun(inputs.graph, granularity=layers.granularity,
                          patterns=layers.patterns, include_layers=include,
                          end_to_end=end_to_end, output=_output(output or layers.output),
                          module=module,
                          samples=n_samples or len(inputs.data))
        _apply_run_options(engine, run)
        return engine
    if layers.output is not None:
        raise UsageError(f"--model-output needs the operator graph, and "
                         f"{inputs.capture_note}")
    if layers.granularity == "op":
        raise UsageError(f"--granularity op needs the operator graph, and "
                         f"{inputs.capture_note}; use module or block")
    if loaded.static_batch is not None:
        raise UnsupportedModuleError(f"{loaded.path} was exported for a batch of "
                                     f"{loaded.static_batch} only, and {inputs.capture_note}")
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
