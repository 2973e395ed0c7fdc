"""Layers are the user's modules: ∂(module output)/∂(module input) at module-call boundaries.

Granularities:
    module  every leaf module call (no child module calls), named as in the state_dict
            (`features.0`, `layer1.0.conv1`; the calls of a module called twice:
            `layer1.0.relu#0`, `layer1.0.relu#1`)
    block   an affine/conv module call plus the elementwise activations, eval BatchNorms and
            Dropouts that directly and only consume its output (named `a+b+c`)
    op      every unit (op or region): `layer1.0/add`, `features.0/convolution`, `view#1`
Functional ops outside any leaf module (`F.relu(out)` in a ResNet block) are in the graph,
and so in the end-to-end Jacobian, but are no leaf layer. A module with several inputs or
outputs is reported through one pair (the first input read, the last output produced), said
in the layer's `note`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ..errors import UsageError
from .accumulate import Paths, paths
from .opgraph import OpGraph
from .rules import rule_for
from .units import Unit

GRANULARITIES = ("module", "block", "op")
_CONVOLUTIONS = ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d",
                 "conv_transpose2d", "conv_transpose3d")
_BATCH_NORMS = ("_native_batch_norm_legit_no_training", "batch_norm", "native_batch_norm")
_ABSORBED_FAMILIES = ("pointwise", "norm-eval")


@dataclass
class Layer:
    """name, type (module class, `A+B` for a block, op name), member module calls, the units
    it spans, its input and output activations and the units between them."""

    name: str
    type: str
    members: list[str]
    units: set[str]
    input: str
    output: str
    paths: Paths
    note: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def op_label(graph: OpGraph, unit: Unit) -> str:
    """The op's name, the same in every format (`conv2d` and `convolution` alike)."""
    if unit.region is not None:
        return "region"
    name = graph[unit.name].op_name
    if name in _CONVOLUTIONS:
        return "convolution"
    if name in _BATCH_NORMS:
        return "batch_norm"
    return name


def _calls(graph: OpGraph, units: dict[str, Unit]) -> dict[str, tuple[str, set[str]]]:
    """Leaf module calls: call name -> (class name, units inside)."""
    parents = {f.call for u in units for f in graph[u].stack[:-1]}
    out: dict[str, tuple[str, set[str]]] = {}
    for name in units:
        stack = graph[name].stack
        if stack and stack[-1].call not in parents:
            out.setdefault(stack[-1].call, (stack[-1].type, set()))[1].add(name)
    return out


def _boundary(graph: OpGraph, units: dict[str, Unit], inside: set[str]
              ) -> tuple[list[str], list[str]]:
    """(inputs read from outside, outputs read outside or returned), topological order."""
    order = list(units)
    inputs: dict[str, None] = {}
    for name in order:
        if name in inside:
            for source in units[name].inputs:
                if source not in inside:
                    inputs[source] = None
    returned = set(graph.outputs.values())
    outputs = [n for n in order if n in inside and (n in returned or any(
        c in units and c not in inside for c in graph.consumers[n]))]
    return list(inputs), outputs


def _layer(graph, units, name, type_name, members, inside) -> Layer | None:
    """The layer for these units: the first input read and the last output produced that
    are connected (None when no input reaches an output)."""
    inputs, outputs = _boundary(graph, units, inside)
    for source in inputs:
        for target in reversed(outputs):
            p = paths(units, source, target, inside)
            if not p.units:
                continue
            note = ""
            if len(inputs) > 1 or len(outputs) > 1:
                note = (f"{len(inputs)} inputs, {len(outputs)} outputs: reported {source} -> "
                        f"{target}")
            return Layer(name, type_name, members, inside, source, target, p, note, inputs,
                         outputs)
    return None


def _family(graph: OpGraph, units: dict[str, Unit], name: str) -> str:
    unit = units[name]
    if unit.region is not None or len(unit.inputs) != 1:
        return "other"
    node = graph[name]
    position = unit.plans[unit.inputs[0]].positions
    rule = rule_for(node, graph, position[0]) if len(position) == 1 else None
    if rule is None:
        return "other"
    if rule.family == "norm" and node.op_name in _BATCH_NORMS:
        return "norm-eval"
    return rule.family


def find_layers(graph: OpGraph, units: dict[str, Unit], granularity: str = "module",
                patterns: list[str] | None = None) -> list[Layer]:
    """The layers at `granularity`, in execution order, filtered by glob `patterns`."""
    if granularity not in GRANULARITIES:
        raise UsageError(f"granularity must be one of {', '.join(GRANULARITIES)}, "
                         f"not {granularity!r}")
    layers = (_op_layers(graph, units) if granularity == "op"
              else _module_layers(graph, units, granularity == "block"))
    if patterns:
        layers = [layer for layer in layers
                  if any(fnmatch.fnmatchcase(layer.name, p) for p in patterns)]
    return layers


def _op_layers(graph, units) -> list[Layer]:
    out, seen = [], {}
    for name, unit in units.items():
        stack = graph[name].stack
        label = op_label(graph, unit)
        base = f"{stack[-1].call}/{label}" if stack else label
        count = seen.get(base, 0)
        seen[base] = count + 1
        layer = _layer(graph, units, base if count == 0 else f"{base}#{count}",
                       label, [], {name})
        if layer is not None:
            out.append(layer)
    return out


def _module_layers(graph, units, blocks: bool) -> list[Layer]:
    order = {name: i for i, name in enumerate(units)}
    calls = sorted(_calls(graph, units).items(), key=lambda c: min(order[u] for u in c[1][1]))
    groups: list[list[tuple[str, str, set[str]]]] = []
    for call, (type_name, inside) in calls:
        if blocks and groups and _absorbs(graph, units, groups[-1], inside):
            groups[-1].append((call, type_name, inside))
        else:
            groups.append([(call, type_name, inside)])
    out = []
    for group in groups:
        inside = set().union(*(g[2] for g in group))
        layer = _layer(graph, units, "+".join(g[0] for g in group),
                       "+".join(g[1] for g in group), [g[0] for g in group], inside)
        if layer is not None:
            out.append(layer)
    return out


def _absorbs(graph, units, group, inside: set[str]) -> bool:
    """Whether a block `group` takes in the next leaf call (units `inside`)."""
    first = group[0][2]
    if not any(_family(graph, units, u) == "affine" for u in first):
        return False
    if not all(_family(graph, units, u) in _ABSORBED_FAMILIES for u in inside):
        return False
    block = set().union(*(g[2] for g in group))
    _, outputs = _boundary(graph, units, block)
    inputs, _ = _boundary(graph, units, inside)
    if len(outputs) != 1 or inputs != outputs:
        return False
    readers = [c for c in graph.consumers[outputs[0]] if c in units]
    return all(r in inside for r in readers) and outputs[0] not in graph.outputs.values()
