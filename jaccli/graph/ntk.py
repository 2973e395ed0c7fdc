"""What each parameter contributes to the neural tangent kernel, read off the op graph.

For C model outputs, parameter P's block of the per-sample Jacobian J_P(x) `(C, P)` enters
Θ = Σ_P J_P(x) J_P(x')ᵀ. A weight read by one `linear` op (input a `(T, i)`, output `(T, o)`,
T token positions) is kept as its factors: a `(B, T, i)` and the output cotangents
G `(B, C, T, o)` of one reverse pass with the C unit vectors (J_P = Σ_t G_t ⊗ a_t, never
formed here). Every other parameter (biases, convolution weights, PReLU slopes, norm
weights, parameters read by several ops or through derived tensors) comes as its per-sample
Jacobian `(B, C, P)`: the rule's closed form (conv: the weight VJP per sample) or the generic
per-op VJP, summed over every op that reads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..engine.ntk_factor import GRAM, JACOBIAN, Factor, layer_of
from .engine import GraphEngine
from .params import (
    _derivation,
    _reads,
    param_vjp,
    select_parameters,
    upstream_of,
    walk_back,
)
from .rules import rule_for


@dataclass
class ParamRoute:
    """How one parameter's contribution is computed, known from shapes alone.

    kind: `gram` (linear weight: factors a, G) or `jacobian` (per-sample `(B, C, P)`);
    how: the rule or route in words; tokens, d_in, d_out: T, i, o of a `gram` weight."""

    name: str
    node: str
    shape: tuple[int, ...]
    layer: str
    kind: str
    how: str
    readers: list[str]
    tokens: int = 1
    d_in: int = 0
    d_out: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_routes(engine: GraphEngine, patterns=None) -> list[ParamRoute]:
    """Every selected parameter's route, in graph order."""
    graph, units = engine.graph, engine.units
    chosen = select_parameters(graph, patterns)
    routes = []
    for qualified, node in chosen.items():
        readers = [u.name for u in units.values() if _reads(graph, u.nodes, node)]
        shape = tuple(graph.state[node][1].shape)
        route = ParamRoute(qualified, node, shape, layer_of(qualified), JACOBIAN,
                           _how(engine, readers, node), readers)
        gram = _gram_shape(engine, readers, node)
        if gram is not None:
            route.kind, route.how = GRAM, "linear weight: (aᵢ·aⱼ)(Gᵢ·Gⱼ) factors"
            route.tokens, route.d_in, route.d_out = gram
        routes.append(route)
    return routes


def _how(engine: GraphEngine, readers: list[str], node: str) -> str:
    if not readers:
        return "unused by the outputs (zero)"
    if len(readers) > 1:
        return f"read by {len(readers)} ops: per-sample Jacobians summed"
    unit = engine.units[readers[0]]
    op = engine.graph[unit.name]
    if unit.region is None and node in op.refs() and not _derivation(engine.graph,
                                                                       [unit.name], node):
        for position, leaf in enumerate(op.leaves()[0]):
            if getattr(leaf, "name", None) not in (None, node) and engine.graph[
                    leaf.name].kind in ("input", "activation"):
                rule = rule_for(op, engine.graph, position)
                if rule is not None and type(rule).param_vjp is not _base_param_vjp():
                    return f"{op.op_name}: closed-form per-sample VJP"
    return f"{op.op_name}: generic per-op VJP"


def _base_param_vjp():
    from .rules.registry import OpRule

    return OpRule.param_vjp


def _gram_shape(engine: GraphEngine, readers: list[str], node: str):
    """(T, i, o) when the weight is the W of exactly one `linear(x, W, b)` op (x per sample)."""
    if len(readers) != 1:
        return None
    unit = engine.units[readers[0]]
    graph = engine.graph
    op = graph[unit.name]
    if unit.region is not None or op.op_key != "aten.linear.default":
        return None
    leaves = op.leaves()[0]
    if len(leaves) < 2 or getattr(leaves[1], "name", None) != node or any(
            getattr(leaf, "name", None) == node for i, leaf in enumerate(leaves) if i != 1):
        return None
    if _derivation(graph, [unit.name], node) or rule_for(op, graph, 0) is None:
        return None
    x = graph[leaves[0].name]
    if x.kind not in ("input", "activation"):
        return None
    out_features, in_features = graph.state[node][1].shape
    return math.prod(x.shape[:-1]), in_features, out_features


def output_count(engine: GraphEngine) -> int:
    """C: the selected outputs' entries per sample, flattened and concatenated."""
    return sum(engine.graph[o].numel for o in engine.outputs)


def ntk_factors(engine: GraphEngine, x: torch.Tensor, routes: list[ParamRoute]
                ) -> dict[str, Factor]:
    """Every route's factors for a batch `x (B, *in_shape)`: one forward, one reverse pass
    with the C unit cotangents (`{qualified name: Factor}`)."""
    diff = engine._differentiator(x)
    values = [diff.trace.values[o] for o in engine.outputs]
    b, c = x.shape[0], output_count(engine)
    basis = torch.eye(c, dtype=x.dtype, device=x.device)
    sizes = [v[0].numel() for v in values]
    cotangents = [part.reshape(1, c, *v.shape[1:]).expand(b, c, *v.shape[1:])
                  for part, v in zip(basis.split(sizes, dim=1), values, strict=True)]
    parameters = {r.name: r.node for r in routes}
    by_reader: dict[str, list[ParamRoute]] = {}
    for route in routes:
        for reader in route.readers:
            by_reader.setdefault(reader, []).append(route)
    found: dict[str, Factor] = {}
    wanted = upstream_of(engine.graph, engine.units, parameters)
    for unit, u in walk_back(diff, engine.units, engine.outputs, cotangents, wanted):
        for route in by_reader.get(unit.name, []):
            if route.kind == GRAM:
                call = diff.call(unit.name)
                a = call.values[0].to(u.dtype).movedim(call.ref(0).batch_axis, 0)
                found[route.name] = Factor(GRAM, inputs=a.reshape(b, -1, a.shape[-1]),
                                           cotangents=u.reshape(b, c, -1, u.shape[-1]),
                                           layer=route.layer)
                continue
            part = param_vjp(diff, unit, route.node, u).reshape(b, c, -1)
            old = found.get(route.name)
            found[route.name] = Factor(JACOBIAN, part if old is None else old.jacobian + part,
                                       layer=route.layer)
    for route in routes:
        if route.name not in found:  # unused by the outputs
            found[route.name] = Factor(JACOBIAN, x.new_zeros(b, c, route.numel),
                                       layer=route.layer)
    return found
