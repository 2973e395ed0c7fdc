"""Per-unit Jacobians, JVPs and VJPs for one recorded batch, with the structured rules or the
generic per-op route; shared Jacobians are kept across batches.

Blocks of tangents are `(B, k, *shape)` with the batch first and per-sample shapes.
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp

from ..engine.structures import Matrix, Structured
from . import algebra
from .opgraph import OpGraph
from .replay import OpCall, Replay
from .rules import rule_for
from .rules.generic import map_columns, op_jacobian_generic
from .rules.registry import apply_structured
from .trace import Trace
from .units import Unit


class Differentiator:
    """Jacobians of the units of `graph` at the values recorded in `trace`.

    shared_cache: (unit, input, dtype) -> a shared Jacobian, kept by the caller across
    batches (shared Jacobians do not depend on the input). routes: (unit, input) -> the
    generic route taken (see `op_jacobian_generic`).
    """

    def __init__(self, graph: OpGraph, units: dict[str, Unit], trace: Trace,
                 shared_cache: dict | None = None):
        self.graph, self.units, self.trace = graph, units, trace
        self.shared_cache = {} if shared_cache is None else shared_cache
        self.routes: dict[tuple[str, str], str] = {}
        self._cache: dict[tuple[str, str], Structured] = {}
        self._calls: dict[str, OpCall] = {}

    def call(self, name: str) -> OpCall:
        if name not in self._calls:
            self._calls[name] = OpCall(self.graph, self.trace, name)
        return self._calls[name]

    def _rules(self, unit: Unit, source: str):
        plan = unit.plans[source]
        if plan.mode != "rule":
            return None
        node = self.graph[unit.name]
        return [(rule_for(node, self.graph, p), p) for p in plan.positions]

    def jacobian(self, unit: Unit, source: str) -> Structured:
        """∂ unit output / ∂ source, per sample: `(B|1, D_out, D_in)` structured."""
        key = (unit.name, source)
        if key in self._cache:
            return self._cache[key]
        shared_key = (unit.name, source, self.trace.dtype)
        if shared_key in self.shared_cache:
            return self.shared_cache[shared_key]
        rules = self._rules(unit, source)
        if rules is None:
            result = self._generic(unit, source)
        else:
            call = self.call(unit.name)
            result = rules[0][0].jacobian(call, rules[0][1])
            for rule, position in rules[1:]:
                result = algebra.add(result, rule.jacobian(call, position))
        if algebra.is_shared(result):
            self.shared_cache[shared_key] = result
        self._cache[key] = result
        return result

    def _replay(self, unit: Unit, source: str) -> Replay:
        return Replay(self.graph, unit.nodes, [source], [unit.name])

    def _generic(self, unit: Unit, source: str) -> Structured:
        fn, args, in_dims = self._replay(unit, source).per_sample(self.trace)
        mode = unit.plans[source].mode
        jac, route = op_jacobian_generic(fn, args, in_dims, 0, mode=mode)
        self.routes[(unit.name, source)] = route
        return Matrix(jac)

    def jvp(self, unit: Unit, source: str, v: torch.Tensor) -> torch.Tensor:
        """`J v`: v `(B, k, *in)` -> `(B, k, *out)`."""
        rules = self._rules(unit, source)
        if rules is not None:
            call = self.call(unit.name)
            out = None
            for rule, position in rules:
                part = rule.jvp(call, position, v)
                out = part if out is None else out + part
            return out
        replay, graph = self._replay(unit, source), self.graph
        primal = self.trace.values[source]
        in_axis, out_axis = graph[source].batch_axis, graph[unit.name].batch_axis

        def column(c: torch.Tensor) -> torch.Tensor:
            tangent = c.movedim(0, in_axis)
            out = jvp(lambda a: replay.batched(self.trace, [a])[0], (primal,), (tangent,))[1]
            return out.movedim(out_axis, 0)

        try:
            return map_columns(column, v)
        except NotImplementedError:  # an op without forward-mode AD: through J itself
            return apply_structured(self.jacobian(unit, source), v, graph[unit.name].shape)

    def vjp(self, unit: Unit, source: str, u: torch.Tensor) -> torch.Tensor:
        """`Jᵀ u`: u `(B, k, *out)` -> `(B, k, *in)`."""
        rules = self._rules(unit, source)
        if rules is not None:
            call = self.call(unit.name)
            out = None
            for rule, position in rules:
                part = rule.vjp(call, position, u)
                out = part if out is None else out + part
            return out
        replay, graph = self._replay(unit, source), self.graph
        in_axis, out_axis = graph[source].batch_axis, graph[unit.name].batch_axis
        _, pullback = vjp(lambda a: replay.batched(self.trace, [a])[0],
                          self.trace.values[source])
        return map_columns(lambda c: pullback(c.movedim(0, out_axis))[0].movedim(in_axis, 0), u)
