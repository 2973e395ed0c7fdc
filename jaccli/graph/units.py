"""Units of differentiation: one op node, or a region where the batch axis is lost.

Every activation is produced by exactly one unit. A unit is one op node, differentiated by
the rule for each of its differentiated arguments; or, where tensors merge the batch with
another axis (`nn.MultiheadAttention`'s `view(L, N*H, hd)`), a region: the connected nodes
around such tensors, whose boundary tensors keep a batch axis, differentiated per sample by
the generic route. For each (unit, input) the plan knows the rule names, structure tag and
mode before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UnsupportedModuleError
from . import algebra
from .opgraph import ACTIVATION, BATCHED, DIFFERENTIATED, MULTI, SYMBOLIC, OpGraph
from .rules import rule_for
from .rules.generic import choose_mode


@dataclass
class InputPlan:
    """How a unit is differentiated w.r.t. one input: rules per argument position, or generic."""

    positions: list[int]
    rules: list[str]
    tag: str
    mode: str  # "rule" for structured ones, "fwd"/"rev" for the generic route
    note: str = ""


@dataclass
class Unit:
    name: str  # the activation it produces
    nodes: list[str]  # the op nodes it runs (a multi-output op before its getitems)
    inputs: list[str]  # differentiated nodes it reads
    region: int | None = None
    plans: dict[str, InputPlan] = field(default_factory=dict)

    @property
    def generic(self) -> bool:
        return any(p.mode != "rule" for p in self.plans.values())


def _regions(graph: OpGraph) -> list[list[str]]:
    """Groups of op nodes connected through tensors with a merged batch axis."""
    merged = [n.name for n in graph.nodes.values()
              if n.kind in BATCHED and n.batch_axis is None and n.target is not None]
    parent = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for name in merged:
        find(name)
        for consumer in graph.consumers[name]:
            if graph[consumer].kind not in (SYMBOLIC, MULTI):
                parent[find(consumer)] = find(name)
            elif graph[consumer].kind == MULTI:
                for getter in graph.consumers[consumer]:
                    if graph[getter].source == consumer:
                        parent[find(getter)] = find(name)
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(find(name), []).append(name)
    order = {name: i for i, name in enumerate(graph.nodes)}
    return [sorted(g, key=order.__getitem__) for g in groups.values()]


def _with_sources(graph: OpGraph, names: list[str]) -> list[str]:
    """Add the multi-output op each getitem reads (once, before it)."""
    out: list[str] = []
    for name in names:
        source = graph[name].source
        if source is not None and source not in out:
            out.append(source)
        if name not in out:
            out.append(name)
    return out


def find_units(graph: OpGraph) -> dict[str, Unit]:
    """Every activation's unit, keyed by the activation, in topological order."""
    region_of: dict[str, int] = {}
    regions = _regions(graph)
    for index, members in enumerate(regions):
        for name in members:
            region_of[name] = index
    for name in graph.outputs.values():
        if name in region_of and graph[name].batch_axis != 0:
            raise UnsupportedModuleError(
                f"the model output {name} does not keep the batch on axis 0")
    units: dict[str, Unit] = {}
    for node in graph.nodes.values():
        if node.kind != ACTIVATION:
            continue
        if node.name in region_of and node.batch_axis is None:
            continue  # inside a region only
        if node.name in region_of:
            members = regions[region_of[node.name]]
            inputs = _inputs(graph, members)
            units[node.name] = Unit(node.name, _with_sources(graph, members), inputs,
                                    region_of[node.name])
        else:
            inputs = _inputs(graph, [node.name])
            units[node.name] = Unit(node.name, _with_sources(graph, [node.name]), inputs)
    for unit in units.values():
        unit.plans = {i: _plan(graph, unit, i) for i in unit.inputs}
    return units


def _inputs(graph: OpGraph, members: list[str]) -> list[str]:
    inside = set(members)
    out: dict[str, None] = {}
    for name in members:
        for ref in graph[name].refs():
            if ref not in inside and graph[ref].kind in DIFFERENTIATED:
                out[ref] = None
    return list(out)


def _plan(graph: OpGraph, unit: Unit, source: str) -> InputPlan:
    node = graph[unit.name]
    d_in, d_out = graph[source].numel, node.numel
    if unit.region is not None:
        return InputPlan([], ["generic"], "dense", choose_mode(d_in, d_out),
                         "batch merged with another axis inside: region differentiated "
                         "per sample")
    leaves = node.leaves()[0]
    positions = [i for i, leaf in enumerate(leaves) if getattr(leaf, "name", None) == source]
    rules = [rule_for(node, graph, p) for p in positions]
    if all(r is not None for r in rules):
        tags = [r.structure(node, graph, p) for r, p in zip(rules, positions, strict=True)]
        tag = tags[0]
        for other in tags[1:]:
            tag = algebra.add_tag(tag, other)
        return InputPlan(positions, [r.name for r in rules], tag, "rule")
    note = "no rule for this op" if not any(rules) else "the rule does not apply here"
    if any(graph[r].kind in BATCHED and graph[r].batch_axis not in (0, None)
           for r in node.refs()) or node.batch_axis != 0:
        note = "batch not on axis 0"
    return InputPlan(positions, ["generic"], "dense", choose_mode(d_in, d_out), note)
