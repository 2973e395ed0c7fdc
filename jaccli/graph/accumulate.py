"""Jacobians between two activations of any DAG, by structured accumulation.

The units on a path from the source to the target form a DAG (residual adds, concatenations,
shared modules called twice, several heads; branches that do not reach the target are
ignored). Runs of units with one way in and one way out are chain segments, multiplied in
the cheapest order (`jaccli.engine.chain.cheapest_order`, shared factors once per run); the
segments then meet at branch and merge points, accumulated from the output side (reverse)
or the input side (forward), whichever side is smaller. The same walk over structure tags
predicts the result's tag before anything runs. Matrix-free JVP/VJP operators push blocks of
vectors through the same units without forming any Jacobian.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..engine.chain import cheapest_order
from ..engine.structures import Structured, chain_product
from . import algebra
from .opgraph import OpGraph
from .structures import Identity
from .units import Unit


@dataclass
class Paths:
    """The units between `source` and `target`: `units` in topological order, and for each
    unit the inputs among the source and those units (`edges[unit] = [inputs]`)."""

    source: str
    target: str
    units: list[str]
    edges: dict[str, list[str]]

    def readers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {self.source: []} | {u: [] for u in self.units}
        for unit in self.units:
            for source in self.edges[unit]:
                out[source].append(unit)
        return out


def paths(units: dict[str, Unit], source: str, target: str,
          within: set[str] | None = None) -> Paths:
    """Units on some path source -> target (restricted to the unit names in `within`)."""
    allowed = [u for u in units if within is None or u in within]
    if source == target:
        return Paths(source, target, [], {})
    reaches = {source}
    for name in allowed:
        if any(i in reaches for i in units[name].inputs):
            reaches.add(name)
    if target not in reaches:
        return Paths(source, target, [], {})
    needed = {target}
    for name in reversed(allowed):
        if name in needed:
            needed.update(i for i in units[name].inputs if i in reaches)
    chosen = [u for u in allowed if u in reaches and u in needed]
    edges = {u: [i for i in units[u].inputs if i in needed and (i == source or i in chosen)]
             for u in chosen}
    return Paths(source, target, chosen, edges)


def is_chain(p: Paths) -> bool:
    """Whether the units between source and target form a single chain (no branch)."""
    readers = p.readers()
    return bool(p.units) and all(len(p.edges[u]) == 1 for u in p.units) and all(
        len(readers[n]) == 1 for n in [p.source] + p.units if n != p.target)


class _Walk:
    """What accumulation needs from an algebra: real structures, or their tags."""

    def identity(self, name: str):
        raise NotImplementedError

    def edge(self, unit: str, source: str):
        raise NotImplementedError

    def compose(self, a, b):
        raise NotImplementedError

    def add(self, a, b):
        raise NotImplementedError

    def tag(self, item) -> str:
        raise NotImplementedError

    def product(self, items: list, order: list[tuple[int, int, int]], tag: str):
        """The chain product of `items` (execution order) in the planned order."""
        raise NotImplementedError


def _segments(p: Paths) -> tuple[list[str], list[tuple[str, str, list[tuple[str, str]]]]]:
    """(junctions, segments): junctions are the source, the target and every node with
    several ways in or out; a segment `(start, end, [(unit, its input), ...])` runs between
    two junctions through single-in single-out units."""
    readers = p.readers()
    junctions = [n for n in [p.source] + p.units
                 if n in (p.source, p.target) or len(readers[n]) != 1
                 or (n != p.source and len(p.edges[n]) != 1)]
    segments = []
    for start in junctions:
        for first in readers[start]:
            steps, node, prev = [], first, start
            while True:
                steps.append((node, prev))
                if node in junctions:
                    break
                prev, node = node, readers[node][0]
            segments.append((start, node, steps))
    return junctions, segments


def accumulate(p: Paths, walk: _Walk, sizes: dict[str, int], samples: int):
    """The source -> target Jacobian (or its tag).

    From the smaller side (reverse: from the target), each segment is multiplied together
    with what has been accumulated at its far end, so the chain ordering sees the whole
    product (`A_end · J_k ... J_1` stays thin when the target is small); junctions sum the
    segments that meet there.
    """
    junctions, segments = _segments(p)
    forward = sizes[p.source] < sizes[p.target]
    seed = p.source if forward else p.target
    acc = {seed: walk.identity(seed)}
    for node in junctions if forward else reversed(junctions):
        for start, end, steps in segments:
            if (start if forward else end) != node:
                continue
            items = [walk.edge(unit, source) for unit, source in steps]
            dims = [sizes[start]] + [sizes[unit] for unit, _ in steps]
            if forward:
                items, dims, key = [acc[start]] + items, [sizes[p.source]] + dims, end
            else:
                items, dims, key = items + [acc[end]], dims + [sizes[p.target]], start
            term = _product(walk, items, dims, samples)
            acc[key] = term if key not in acc else walk.add(acc[key], term)
    return acc[p.target if forward else p.source]


def _product(walk: _Walk, items: list, dims: list[int], samples: int):
    if len(items) == 1:
        return items[0]
    plan = cheapest_order([walk.tag(i) for i in items], dims, samples,
                          tag_rule=algebra.compose_tag, cost_rule=algebra.compose_cost)
    return walk.product(items, plan.order, plan.tag)


class StructureWalk(_Walk):
    def __init__(self, jacobian: Callable[[str, str], Structured], sizes: dict[str, int],
                 dtype: torch.dtype, device):
        self.jacobian, self.sizes, self.dtype, self.device = jacobian, sizes, dtype, device

    def identity(self, name):
        return Identity(self.sizes[name], self.dtype, self.device)

    def edge(self, unit, source):
        return self.jacobian(unit, source)

    def compose(self, a, b):
        return algebra.compose(a, b)

    def add(self, a, b):
        return algebra.add(a, b)

    def tag(self, item):
        return item.tag

    def product(self, items, order, tag):
        return chain_product(items, order, compose_fn=algebra.compose)


class TagWalk(_Walk):
    def __init__(self, tag: Callable[[str, str], str]):
        self.edge_tag = tag

    def identity(self, name):
        return "identity"

    def edge(self, unit, source):
        return self.edge_tag(unit, source)

    def compose(self, a, b):
        return algebra.compose_tag(a, b)

    def add(self, a, b):
        return algebra.add_tag(a, b)

    def tag(self, item):
        return item

    def product(self, items, order, tag):
        return tag


def sizes_of(graph: OpGraph, p: Paths) -> dict[str, int]:
    return {n: graph[n].numel for n in [p.source] + p.units}


def push_forward(p: Paths, jvp: Callable, v: torch.Tensor) -> torch.Tensor:
    """Tangent blocks `(B, k, *source)` -> `(B, k, *target)` through the units."""
    tangents = {p.source: v}
    for unit in p.units:
        out = None
        for source in p.edges[unit]:
            part = jvp(unit, source, tangents[source])
            out = part if out is None else out + part
        tangents[unit] = out
    return tangents[p.target]


def pull_back(p: Paths, vjp: Callable, u: torch.Tensor) -> torch.Tensor:
    """Cotangent blocks `(B, k, *target)` -> `(B, k, *source)` through the units."""
    cotangents = {p.target: u}
    for unit in reversed(p.units):
        if unit not in cotangents:
            continue
        for source in p.edges[unit]:
            part = vjp(unit, source, cotangents[unit])
            cotangents[source] = part if source not in cotangents else cotangents[source] + part
    return cotangents[p.source]
