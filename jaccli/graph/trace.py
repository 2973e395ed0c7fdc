"""One forward pass through an `OpGraph`, recording the value of every node for a batch.

A program with a static batch B0 runs B0 samples at a time (the last chunk padded with copies
of its last sample); values with a batch axis are concatenated, padding dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils import _pytree as pytree

from ..errors import ModelRunError
from .opgraph import (
    BATCHED,
    CONSTANT,
    INPUT,
    MULTI,
    STATE,
    SYMBOLIC,
    OpGraph,
    OpNode,
    Ref,
)

_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def op_target(node: OpNode):
    """The callable to run for a node: its op, with `view` run as `reshape`."""
    return torch.ops.aten.reshape.default if node.target in _VIEWS else node.target


def call_node(node: OpNode, lookup: Callable[[str], object]) -> object:
    """Run one op node, reading its arguments through `lookup(name)`.

    `view` becomes `reshape`: a replay feeds tensors laid out differently from the recorded
    run (slices, vmapped samples), and the program has no mutation left to alias.
    """
    args, kwargs = pytree.tree_map(lambda a: lookup(a.name) if isinstance(a, Ref) else a,
                                   (node.args, node.kwargs),
                                   is_leaf=lambda a: isinstance(a, Ref))
    result = op_target(node)(*args, **kwargs)
    return result if node.output_index is None else result[node.output_index]


def state_value(graph: OpGraph, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A parameter/buffer/constant, floating ones cast to the run's dtype."""
    value = graph.state[name][1]
    return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value


def evaluate(graph: OpGraph, x: torch.Tensor, held: tuple[torch.Tensor, ...] = ()
             ) -> dict[str, object]:
    """Every node's value for x (one run of the program as it is); held: the values of the
    inputs held fixed (`graph.held`), `(B, ...)` each."""
    env: dict[str, object] = dict(zip(graph.held, held, strict=True))
    for node in graph.nodes.values():
        if node.name in env:
            continue
        if node.kind == INPUT:
            env[node.name] = x
        elif node.kind in STATE and node.name in graph.state:
            env[node.name] = state_value(graph, node.name, x.dtype)
        elif node.kind == CONSTANT:
            env[node.name] = node.args[0]
        elif node.source is not None and node.source in env:
            env[node.name] = env[node.source][node.output_index]
        else:
            env[node.name] = call_node(node, env.__getitem__)
    return env


def pad_chunks(n: int, size: int) -> list[tuple[int, int]]:
    """(start, count) of consecutive chunks of `size` rows covering n rows."""
    return [(start, min(size, n - start)) for start in range(0, n, size)]


def take_chunk(t: torch.Tensor, axis: int, start: int, count: int, size: int) -> torch.Tensor:
    """Rows start..start+count along `axis`, padded to `size` with copies of the last row."""
    piece = t.narrow(axis, start, count)
    if count == size:
        return piece
    last = piece.narrow(axis, count - 1, 1)
    repeats = [1] * t.ndim
    repeats[axis] = size - count
    return torch.cat([piece, last.repeat(*repeats)], dim=axis)


class Trace:
    """The values of every node for a batch `x (B, *in_shape)` and the inputs held fixed
    `held` (`graph.held`, each `(B, ...)`).

    values: node -> value (tensors with a batch axis hold all B samples). sample_scalars:
    the value of each batch-dependent scalar for ONE sample (used when replaying an op on a
    single sample: `view(x, [B, 48])` becomes `view(x, [1, 48])`).
    """

    def __init__(self, graph: OpGraph, x: torch.Tensor, held: tuple[torch.Tensor, ...] = ()):
        if tuple(x.shape[1:]) != graph.input_shape:
            raise ModelRunError(f"the input's per-sample shape {tuple(x.shape[1:])} differs "
                                f"from the captured one {graph.input_shape}")
        held = tuple(held)
        if len(held) != len(graph.held) or any(h.shape[0] != x.shape[0] for h in held):
            raise ModelRunError(f"the model takes {len(graph.held)} input(s) held fixed with "
                                f"the {x.shape[0]} samples; got "
                                f"{[tuple(h.shape) for h in held]}")
        self.graph, self.x, self.batch, self.dtype = graph, x, x.shape[0], x.dtype
        self.unit_batch = graph.static_batch or 1
        if graph.static_batch is None:
            self.values = evaluate(graph, x, held)
        else:
            self.values = self._evaluate_chunks(x, held)
        self.sample_scalars = self._sample_scalars()

    def _evaluate_chunks(self, x: torch.Tensor, held: tuple) -> dict[str, object]:
        size = self.graph.static_batch
        runs = [evaluate(self.graph, take_chunk(x, 0, start, count, size),
                         tuple(take_chunk(h, 0, start, count, size) for h in held))
                for start, count in pad_chunks(x.shape[0], size)]
        counts = [count for _, count in pad_chunks(x.shape[0], size)]
        values = dict(runs[0])
        for node in self.graph.nodes.values():
            if node.kind in BATCHED:
                if node.batch_axis is None:
                    values[node.name] = None  # merged batch: only meaningful inside a chunk
                else:
                    values[node.name] = torch.cat(
                        [r[node.name].narrow(node.batch_axis, 0, c)
                         for r, c in zip(runs, counts, strict=True)], dim=node.batch_axis)
            elif node.kind == MULTI:
                values[node.name] = None
        return values

    def _sample_scalars(self) -> dict[str, object]:
        out = {}
        symbol = self.graph.batch_symbol
        for node in self.graph.nodes.values():
            if node.kind != SYMBOLIC:
                continue
            if str(node.sym_expr) == symbol:  # the batch size itself: 1 for one sample
                out[node.name] = 1
                continue
            import sympy  # only for size expressions (costs ~1 s of start-up)

            subs = {s: 1 for s in node.sym_expr.free_symbols if str(s) == symbol}
            value = sympy.sympify(node.sym_expr.xreplace(subs))
            if value.free_symbols:
                raise ModelRunError(f"{node.name} depends on sizes other than the batch "
                                    f"({node.sym_expr}); jaccli cannot replay it per sample")
            out[node.name] = bool(value) if isinstance(value, sympy.logic.boolalg.Boolean) \
                else int(value) if value.is_integer else float(value)
        return out

    def lookup(self, name: str, *, per_sample: bool = False) -> object:
        if per_sample and name in self.sample_scalars:
            return self.sample_scalars[name]
        return self.values[name]
