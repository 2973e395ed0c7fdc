"""What each parameter contributes to the neural tangent kernel, read off the op graph.

For C model outputs, parameter P's block of the per-sample Jacobian J_P(x) `(C, P)` enters
Θ = Σ_P J_P(x) J_P(x')ᵀ. A weight read by one `linear` op (input a `(T, i)`, output `(T, o)`,
T token positions) is kept as its factors: a `(B, T, i)` and the output cotangents
G `(B, C, T, o)` of one reverse pass with the C unit vectors (J_P = Σ_t G_t ⊗ a_t, never
formed here). Every other parameter (biases, convolution weights, PReLU slopes, norm
weights, parameters read by several ops or through derived tensors) comes as its per-sample
Jacobian `(B, C, P)`: the rule's closed form or the generic per-op VJP, summed over every op
that reads it. A 2-D convolution's weight read by that op alone is formed from its im2col
patches p `(B, i·k, T)` and output cotangents G `(B, C, o, T)` (J = G pᵀ per sample and
group: one batched matmul, instead of a VJP per sample); an eval batch norm's weight and
bias from G and the normalised input x̂ (Σ_t G_t x̂_t, Σ_t G_t), instead of the generic VJP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    closed: str = ""  # "im2col" (conv2d weight), "batch_norm" (eval BatchNorm weight, bias)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def param_routes(engine: GraphEngine, patterns=None) -> list[ParamRoute]:
    """Every selected parameter's route, in graph order (found once per engine and
    selection: they depend on shapes alone)."""
    key = (tuple(patterns) if patterns else None, tuple(engine.outputs))
    known = engine.__dict__.setdefault("_ntk_routes", {})
    if key not in known:
        known[key] = _routes(engine, patterns)
    return known[key]


def _routes(engine: GraphEngine, patterns) -> list[ParamRoute]:
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
        elif _im2col(engine, readers, node):
            route.closed, route.how = "im2col", "conv2d weight: Σ_t G_t ⊗ patch_t (im2col)"
        elif _batch_norm(engine, readers, node):
            route.closed, route.how = "batch_norm", "eval BatchNorm: Σ_t G_t x̂_t, Σ_t G_t"
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


def _im2col(engine: GraphEngine, readers: list[str], node: str) -> bool:
    """Whether the weight is the W `(o, i/g, kh, kw)` of exactly one 2-D, not transposed
    `convolution(x, W, ...)` op (x per sample)."""
    if len(readers) != 1:
        return False
    unit = engine.units[readers[0]]
    graph = engine.graph
    op = graph[unit.name]
    if unit.region is not None or op.op_key not in _CONV_ARGS:
        return False
    leaves = op.leaves()[0]
    if len(leaves) < 2 or getattr(leaves[1], "name", None) != node or any(
            getattr(leaf, "name", None) == node for i, leaf in enumerate(leaves) if i != 1):
        return False
    if _derivation(graph, [unit.name], node) or rule_for(op, graph, 0) is None:
        return False
    x = graph[leaves[0].name] if getattr(leaves[0], "name", None) else None
    transposed = (False if op.op_key == "aten.conv2d.default" else op.args[6]
                  if len(op.args) > 6 else op.kwargs.get("transposed", True))
    return (x is not None and x.kind in ("input", "activation") and len(x.shape) == 3
            and len(graph.state[node][1].shape) == 4 and transposed is False)


_BATCH_NORM = "aten._native_batch_norm_legit_no_training.default"


def _batch_norm(engine: GraphEngine, readers: list[str], node: str) -> bool:
    """Whether the parameter is the weight or the bias of exactly one eval-mode batch norm
    `(x, weight, bias, running_mean, running_var, momentum, eps)` (x per sample)."""
    if len(readers) != 1:
        return False
    unit = engine.units[readers[0]]
    graph = engine.graph
    op = graph[unit.name]
    if unit.region is not None or op.op_key != _BATCH_NORM:
        return False
    leaves = op.leaves()[0]
    names = [getattr(leaf, "name", None) for leaf in leaves]
    if names.count(node) != 1 or names.index(node) not in (1, 2) or names[0] is None:
        return False
    x = graph[names[0]]
    return (not _derivation(graph, [unit.name], node) and x.kind in ("input", "activation")
            and len(x.shape) >= 1)


def _batch_norm_jacobian(call, node: str, u: torch.Tensor, b: int, c: int
                         ) -> torch.Tensor | None:
    """J `(B, C, channels)` of an eval batch norm's weight (Σ over positions of G · x̂,
    x̂ = (x - mean)/√(var + eps)) or bias (Σ of G), from u `(B, C, channels, *spatial)`."""
    position = 1 if getattr(call.leaves[1], "name", None) == node else 2
    g = u.reshape(b, c, u.shape[2], -1)
    if position == 2:
        return g.sum(3)
    x = call.values[0].to(u.dtype).movedim(call.ref(0).batch_axis, 0)
    mean, var = call.arg(3, "running_mean"), call.arg(4, "running_var")
    eps = float(call.arg(6, "eps"))
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return None
    normal = (x.reshape(b, x.shape[1], -1) - mean.to(u.dtype)[:, None]) * torch.rsqrt(
        var.to(u.dtype)[:, None] + eps)
    return torch.einsum("bcht,bht->bch", g, normal)


# op -> argument index of stride, padding, dilation, groups (defaults 1, 0, 1, 1)
_CONV_ARGS = {"aten.conv2d.default": (3, 4, 5, 6), "aten.convolution.default": (3, 4, 5, 8)}


def _pair(value) -> tuple[int, int]:
    value = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def _conv_jacobian(call, u: torch.Tensor, b: int, c: int) -> torch.Tensor | None:
    """J `(B, C, o·(i/g)·kh·kw)` of a 2-D convolution's weight from the im2col patches of
    its input and the output cotangents u `(B, C, o, H', W')`; None when the shapes do not
    line up (the rule's VJP then)."""
    weight = call.values[1]
    o, per_group, kh, kw = weight.shape
    stride, padding, dilation, groups = _CONV_ARGS[call.node.op_key]
    padding = call.arg(padding, "padding", 0)
    if isinstance(padding, str):  # "same" / "valid": the rule's VJP
        return None
    groups = int(call.arg(groups, "groups", 1))
    x = call.values[0].to(u.dtype).movedim(call.ref(0).batch_axis, 0)
    patches = F.unfold(x, (kh, kw), dilation=_pair(call.arg(dilation, "dilation", 1)),
                       padding=_pair(padding), stride=_pair(call.arg(stride, "stride", 1)))
    t = patches.shape[-1]
    if u.shape[3:].numel() != t or x.shape[1] != per_group * groups:
        return None
    g = u.reshape(b, c, groups, o // groups, t)
    p = patches.reshape(b, groups, per_group * kh * kw, t)
    return torch.einsum("bcgot,bgkt->bcgok", g, p).reshape(b, c, -1)


def output_count(engine: GraphEngine) -> int:
    """C: the selected outputs' entries per sample, flattened and concatenated."""
    return sum(engine.graph[o].numel for o in engine.outputs)


def ntk_factors(engine: GraphEngine, x: torch.Tensor, routes: list[ParamRoute],
                held: tuple = ()) -> dict[str, Factor]:
    """Every route's factors for a batch `x (B, *in_shape)`: one forward, one reverse pass
    with the C unit cotangents (`{qualified name: Factor}`). held: the batch's rows `(B, ...)`
    of the graph's inputs held fixed (`graph.held`: a forward of several arguments)."""
    diff = engine._differentiator(x, held)
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
            part = (_conv_jacobian(diff.call(unit.name), u, b, c) if route.closed == "im2col"
                    else _batch_norm_jacobian(diff.call(unit.name), route.node, u, b, c)
                    if route.closed == "batch_norm" else None)
            if part is None:
                part = param_vjp(diff, unit, route.node, u).reshape(b, c, -1)
            old = found.get(route.name)
            found[route.name] = Factor(JACOBIAN, part if old is None else old.jacobian + part,
                                       layer=route.layer)
    for route in routes:
        if route.name not in found:  # unused by the outputs
            found[route.name] = Factor(JACOBIAN, x.new_zeros(b, c, route.numel),
                                       layer=route.layer)
    return found
