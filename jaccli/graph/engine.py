"""`GraphEngine`: per-layer and end-to-end Jacobians, operators and parameter Jacobians of an
op graph, with a plan that says before anything runs how each layer is differentiated."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..engine.chain import cheapest_order
from ..engine.structures import Matrix, Structured
from ..errors import UsageError
from . import accumulate as acc
from . import algebra
from .differentiate import Differentiator
from .layers import Layer, find_layers, op_label
from .opgraph import DIFFERENTIATED, OpGraph
from .params import objective_cotangents, param_vjps, select_parameters
from .structures import Identity
from .trace import Trace
from .units import find_units

END_TO_END = "(end-to-end)"


@dataclass
class OpPlan:
    """One unit inside a layer: its op, rules (per argument), structure tag and mode (`rule`,
    or `fwd`/`rev` for the generic route), and why it is generic."""

    node: str
    op: str
    rules: list[str]
    structure: str
    mode: str
    note: str


@dataclass
class LayerPlan:
    name: str
    type: str
    members: list[str]
    input: str
    output: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    ops: list[OpPlan]
    structure: str
    chain: bool
    note: str

    @property
    def mode(self) -> str:
        modes = {op.mode for op in self.ops}
        return modes.pop() if len(modes) == 1 else "mixed"

    @property
    def generic(self) -> bool:
        return any(op.mode != "rule" for op in self.ops)


@dataclass
class EnginePlan:
    capture_path: str
    capture_note: str
    granularity: str
    layers: list[LayerPlan]
    end_to_end: LayerPlan | None


@dataclass
class JacobianOperator:
    """Matrix-free per-sample J: `jvp(V (B, D_in, k)) -> (B, D_out, k)`,
    `vjp(U (B, D_out, k)) -> (B, D_in, k)`."""

    d_in: int
    d_out: int
    jvp: Callable[[torch.Tensor], torch.Tensor]
    vjp: Callable[[torch.Tensor], torch.Tensor]


class GraphEngine:
    """Jacobians of a captured `OpGraph`.

    granularity: `module`, `block` or `op` (see `jaccli.graph.layers`); layer_patterns: globs
    on layer names; end_to_end: also the model input -> output Jacobian; output: the output
    name or index (None: every output, flattened and concatenated in order); samples: how many
    samples a run holds (the chain ordering's cost model).
    """

    def __init__(self, graph: OpGraph, *, granularity: str = "module",
                 layer_patterns: Sequence[str] | None = None, end_to_end: bool = True,
                 output: str | int | None = None, samples: int = 64):
        self.graph, self.granularity, self.end_to_end = graph, granularity, end_to_end
        # The sample count the multiplication order is planned for: fixed for a run, so
        # every batch (the last, smaller one too) factors its Jacobians the same way.
        self.samples = samples
        self.units = find_units(graph)
        self.layers = find_layers(graph, self.units, granularity,
                                  list(layer_patterns) if layer_patterns else None)
        self.outputs = self._outputs(output)
        self.routes: dict[tuple[str, str], str] = {}
        self.last_seconds: dict[str, float] = {}
        self._shared: dict = {}

    def _outputs(self, output) -> list[str]:
        names = list(self.graph.outputs)
        if output is None:
            chosen = names
        elif isinstance(output, int) and 0 <= output < len(names):
            chosen = [names[output]]
        elif output in self.graph.outputs:
            chosen = [output]
        else:
            raise UsageError(f"the model has no output {output!r}; its outputs are: "
                             f"{', '.join(names)}")
        nodes = [self.graph.outputs[n] for n in chosen]
        for name in nodes:
            node = self.graph[name]
            if node.kind not in DIFFERENTIATED or node.batch_axis != 0:
                raise UsageError(f"output {name} is not a floating tensor computed from the "
                                 "input with the batch on axis 0")
        return nodes

    def _paths(self) -> list[acc.Paths]:
        return [acc.paths(self.units, self.graph.input, t) for t in self.outputs]

    def is_chain(self) -> bool:
        """Whether input -> output is one chain: the product of layer norms bounds the
        end-to-end norm only then."""
        paths = self._paths()
        return len(paths) == 1 and acc.is_chain(paths[0])

    def chain_costs(self) -> dict[str, float] | None:
        """For a chain model: multiply-adds of the end-to-end product in the chosen order, and
        of the plain forward and reverse orders (None for other graphs)."""
        if not self.is_chain():
            return None
        p = self._paths()[0]
        tags = [self.units[u].plans[p.edges[u][0]].tag for u in p.units]
        dims = [self.graph[p.source].numel] + [self.graph[u].numel for u in p.units]
        plan = cheapest_order(tags, dims, self.samples, tag_rule=algebra.compose_tag,
                              cost_rule=algebra.compose_cost)
        return {"chosen": plan.cost, "forward": plan.forward_cost,
                "reverse": plan.reverse_cost}

    # ----------------------------------------------------------------- plan
    def plan(self) -> EnginePlan:
        samples = self.samples
        layers = [self._layer_plan(layer, samples) for layer in self.layers]
        end = None
        if self.end_to_end:
            paths = self._paths()
            units = sorted({u for p in paths for u in p.units}, key=list(self.units).index)
            tags = [self._tag(p, samples) for p in paths]
            shape = self.graph[self.outputs[0]].shape if len(self.outputs) == 1 else (
                sum(self.graph[o].numel for o in self.outputs),)
            end = LayerPlan(END_TO_END, "model", [], self.graph.input, ",".join(self.outputs),
                            self.graph.input_shape, tuple(shape), self._ops(units),
                            tags[0] if len(tags) == 1 else _stacked_tag(tags),
                            self.is_chain(), "")
        return EnginePlan(self.graph.capture_path, self.graph.capture_note, self.granularity,
                          layers, end)

    def _ops(self, unit_names) -> list[OpPlan]:
        out = []
        for name in unit_names:
            unit = self.units[name]
            for plan in unit.plans.values():
                out.append(OpPlan(name, op_label(self.graph, unit), plan.rules, plan.tag,
                                  plan.mode, plan.note if plan.mode != "rule" else ""))
        return out

    def _tag(self, p: acc.Paths, samples: int) -> str:
        if not p.units:
            return "shared"
        walk = acc.TagWalk(lambda unit, source: self.units[unit].plans[source].tag)
        return acc.accumulate(p, walk, acc.sizes_of(self.graph, p), samples)

    def _layer_plan(self, layer: Layer, samples: int) -> LayerPlan:
        return LayerPlan(layer.name, layer.type, layer.members, layer.input, layer.output,
                         self.graph[layer.input].shape, self.graph[layer.output].shape,
                         self._ops(layer.paths.units), self._tag(layer.paths, samples),
                         acc.is_chain(layer.paths), layer.note)

    # ----------------------------------------------------------------- compute
    def _differentiator(self, x: torch.Tensor, held: tuple = ()) -> Differentiator:
        diff = Differentiator(self.graph, self.units, Trace(self.graph, x, held), self._shared)
        self.routes = diff.routes
        return diff

    def _jacobian(self, diff: Differentiator, p: acc.Paths) -> Structured:
        trace = diff.trace
        if p.source == p.target:  # a model returning its input
            return Identity(self.graph[p.source].numel, trace.dtype, trace.x.device)
        if not p.units:
            d_out, d_in = self.graph[p.target].numel, self.graph[p.source].numel
            return Matrix(trace.x.new_zeros(1, d_out, d_in), shared=True)
        sizes = acc.sizes_of(self.graph, p)
        walk = acc.StructureWalk(lambda unit, source: diff.jacobian(self.units[unit], source),
                                 sizes, trace.dtype, trace.x.device)
        return acc.accumulate(p, walk, sizes, self.samples)

    def compute(self, x: torch.Tensor, names: set[str] | None = None, held: tuple = ()
                ) -> dict[str, Structured]:
        """Every layer's Jacobian (and `END_TO_END`) for a batch `x (B, *in_shape)`, or only
        those in `names`; `last_seconds` holds the time each took (the forward pass charged
        to the first). held: the values `(B, ...)` of the inputs held fixed (`graph.held`),
        here and in every method taking a batch."""
        begin = time.perf_counter()
        diff = self._differentiator(x, held)
        result, self.last_seconds = {}, {}
        wanted = [layer for layer in self.layers if names is None or layer.name in names]
        for layer in wanted:
            result[layer.name] = self._jacobian(diff, layer.paths)
            begin = self._lap(layer.name, begin, x)
        if self.end_to_end and (names is None or END_TO_END in names):
            result[END_TO_END] = self._end_to_end(diff)
            self._lap(END_TO_END, begin, x)
        return result

    def _lap(self, name: str, begin: float, x: torch.Tensor) -> float:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        now = time.perf_counter()
        self.last_seconds[name] = now - begin
        return now

    def cumulative(self, x: torch.Tensor, held: tuple = ()):
        """Yield `(layer name, J_{1:l})` for each layer: the Jacobian of its output w.r.t. the
        model input, `(B | 1, D_l, D_in)` (the depth profile of a chain model)."""
        diff = self._differentiator(x, held)
        for layer in self.layers:
            p = acc.paths(self.units, self.graph.input, layer.output)
            jac = self._jacobian(diff, p)
            yield layer.name, jac.dense(None if getattr(jac, "shared", False) else x.shape[0])

    def route_of(self, name: str) -> str:
        """The generic routes behind a layer (or `END_TO_END`) in the last run, '' if none."""
        if name == END_TO_END:
            units = {u for p in self._paths() for u in p.units}
        else:
            units = set(next((layer.paths.units for layer in self.layers
                              if layer.name == name), ()))
        return "+".join(sorted({route for (unit, _), route in self.routes.items()
                                if unit in units}))

    def _end_to_end(self, diff: Differentiator) -> Structured:
        parts = [self._jacobian(diff, p) for p in self._paths()]
        if len(parts) == 1:
            return parts[0]
        shared = all(getattr(j, "shared", False) for j in parts)
        n = None if shared else diff.trace.batch
        return Matrix(torch.cat([j.dense(n) for j in parts], dim=1), shared=shared)

    def _operator(self, diff: Differentiator, paths: list[acc.Paths]) -> JacobianOperator:
        graph, units = self.graph, self.units
        source = paths[0].source
        in_shape = graph[source].shape
        out_shapes = [graph[p.target].shape for p in paths]
        d_in = math.prod(in_shape)
        d_outs = [math.prod(s) for s in out_shapes]

        def jvp_block(unit, src, v):
            return diff.jvp(units[unit], src, v)

        def vjp_block(unit, src, u):
            return diff.vjp(units[unit], src, u)

        def apply(v: torch.Tensor) -> torch.Tensor:
            b, _, k = v.shape
            blocks = v.transpose(1, 2).reshape(b, k, *in_shape)
            outs = [acc.push_forward(p, jvp_block, blocks) if p.units or p.source == p.target
                    else blocks.new_zeros(b, k, d) for p, d in zip(paths, d_outs, strict=True)]
            return torch.cat([o.reshape(b, k, -1) for o in outs], dim=2).transpose(1, 2)

        def apply_t(u: torch.Tensor) -> torch.Tensor:
            b, _, k = u.shape
            total = u.new_zeros(b, k, d_in)
            for p, part, shape in zip(paths, u.split(d_outs, dim=1), out_shapes, strict=True):
                if p.units or p.source == p.target:
                    blocks = part.transpose(1, 2).reshape(b, k, *shape)
                    total = total + acc.pull_back(p, vjp_block, blocks).reshape(b, k, d_in)
            return total.transpose(1, 2)

        return JacobianOperator(d_in, sum(d_outs), apply, apply_t)

    def layer_operator(self, name: str, x: torch.Tensor, held: tuple = ()) -> JacobianOperator:
        """J of layer `name` as a matrix-free operator, at the batch `x`."""
        layers = {layer.name: layer for layer in self.layers}
        if name not in layers:
            raise UsageError(f"no layer {name!r}; the layers are: {', '.join(layers)}")
        return self._operator(self._differentiator(x, held), [layers[name].paths])

    def end_to_end_operator(self, x: torch.Tensor, held: tuple = ()) -> JacobianOperator:
        """The model input -> selected output(s) Jacobian as a matrix-free operator."""
        return self._operator(self._differentiator(x, held), self._paths())

    # ----------------------------------------------------------------- parameters
    def param_jacobians(self, x: torch.Tensor, objective: Callable | None = None,
                        param_names: Sequence[str] | None = None,
                        targets: torch.Tensor | None = None, held: tuple = ()
                        ) -> dict[str, torch.Tensor]:
        """Per-sample Jacobians of `objective(output, targets)` w.r.t. parameters.

        objective: `(B, *out) -> (B, C)` or `(B,)` (default: the outputs flattened); with
        several outputs selected it receives them flattened and concatenated, `(B, D)`.
        Returns `{qualified name: (B, C, *shape)}`, or `(B, *shape)` for a scalar objective.
        """
        parameters = select_parameters(self.graph, param_names)
        diff = self._differentiator(x, held)
        values = [diff.trace.values[o] for o in self.outputs]
        out = values[0] if len(values) == 1 else torch.cat(
            [v.reshape(v.shape[0], -1) for v in values], dim=1)
        cot, scalar = objective_cotangents(objective, out, targets)
        if len(values) == 1:
            parts = [cot]
        else:
            b, c = cot.shape[:2]
            sizes = [v[0].numel() for v in values]
            parts = [p.reshape(b, c, *v.shape[1:])
                     for p, v in zip(cot.split(sizes, dim=2), values, strict=True)]
        result = param_vjps(diff, self.units, self.outputs, parts, parameters)
        return {q: (r[:, 0] if scalar else r) for q, r in result.items()}


def _stacked_tag(tags: list[str]) -> str:
    """Several outputs stacked: one matrix, shared when every part is."""
    return "shared" if all(t in algebra.SHARED_TAGS for t in tags) else "dense"
