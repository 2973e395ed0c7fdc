"""Re-running recorded op nodes on new values: for a whole batch, or for one sample.

`Replay` runs a set of nodes (one op, or a region) with new values for some of the tensors
they read. `batched` replays every sample at once (chunks of B0 for a static program);
`per_sample` builds a function of ONE sample's tensors for `torch.vmap`, in which each
batch-dependent scalar takes its one-sample value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils import _pytree as pytree

from ..errors import UnsupportedModuleError
from .opgraph import BATCHED, OpGraph, Ref
from .trace import Trace, call_node, op_target, pad_chunks, take_chunk


class Replay:
    """Run `nodes` (topological order) given new values of `inputs`, returning `outputs`.

    Every other batched tensor the nodes read is taken from the trace (per sample: the
    sample's slice). All batched tensors involved must have a known batch axis.
    """

    def __init__(self, graph: OpGraph, nodes: Sequence[str], inputs: Sequence[str],
                 outputs: Sequence[str]):
        self.graph, self.nodes = graph, list(nodes)
        self.inputs, self.outputs = list(inputs), list(outputs)
        internal = set(self.nodes)
        reads: dict[str, None] = {}
        for name in self.nodes:
            node = graph[name]
            for ref in node.refs() + ([node.source] if node.source else []):
                if ref not in internal:
                    reads[ref] = None
        self.batched_reads = [r for r in reads if graph[r].kind in BATCHED
                              and r not in self.inputs]
        for name in self.inputs + self.batched_reads + self.outputs:
            if graph[name].batch_axis is None:
                raise UnsupportedModuleError(
                    f"{name} has no batch axis jaccli can follow; it cannot be replayed alone")

    def _run(self, lookup: Callable[[str], object], provided: dict[str, object]) -> list:
        env = dict(provided)

        def read(name: str) -> object:
            return env[name] if name in env else lookup(name)

        for name in self.nodes:
            node = self.graph[name]
            if node.source is not None and node.source in env:
                env[name] = env[node.source][node.output_index]
            else:
                env[name] = call_node(node, read)
        return [env[o] for o in self.outputs]

    def batched(self, trace: Trace, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """All samples at once, with `values` (native layout) for the inputs."""
        size = self.graph.static_batch
        if size is None:
            return self._run(trace.lookup, dict(zip(self.inputs, values, strict=True)))
        names = self.inputs + self.batched_reads
        tensors = list(values) + [trace.values[r] for r in self.batched_reads]
        axes = [self.graph[n].batch_axis for n in names]
        pieces = []
        for start, count in pad_chunks(trace.batch, size):
            chunk = {n: take_chunk(t, a, start, count, size)
                     for n, t, a in zip(names, tensors, axes, strict=True)}
            outs = self._run(trace.lookup, chunk)
            pieces.append([o.narrow(self.graph[n].batch_axis, 0, count)
                           for o, n in zip(outs, self.outputs, strict=True)])
        return [torch.cat(parts, dim=self.graph[n].batch_axis)
                for parts, n in zip(zip(*pieces, strict=True), self.outputs, strict=True)]

    def per_sample(self, trace: Trace, fixed: Sequence[str] = ()
                   ) -> tuple[Callable, list[torch.Tensor], list[int]]:
        """`(fn, args, in_dims)`: `vmap(fn, in_dims)(*args)` runs every sample alone.

        args: the recorded values of the inputs, then of the other batched tensors read,
        each with its batch axis; fn takes one sample of each (batch axis removed) and returns
        a tuple of the outputs for that sample. `fixed`: names of unbatched nodes (such as
        parameters) whose values fn takes first, before the samples: `fn(*fixed, *samples)`.
        """
        names = self.inputs + self.batched_reads
        unit = trace.unit_batch

        def fn(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            provided = dict(zip(fixed, values[:len(fixed)], strict=True))
            sample_values = values[len(fixed):]
            for name, value in zip(names, sample_values, strict=True):
                axis = self.graph[name].batch_axis
                value = value.unsqueeze(axis)
                if unit > 1:
                    value = value.expand(*value.shape[:axis], unit, *value.shape[axis + 1:])
                provided[name] = value
            outs = self._run(lambda n: trace.lookup(n, per_sample=True), provided)
            return tuple(o.select(self.graph[n].batch_axis, 0)
                         for o, n in zip(outs, self.outputs, strict=True))

        args = [trace.values[n] for n in names]
        return fn, args, [self.graph[n].batch_axis for n in names]


class OpCall:
    """One recorded op node, as rules see it.

    leaves: the flat arguments (pytree of `(args, kwargs)`); values: their recorded values
    (all samples); positions: the leaves that are differentiated tensors (activations or the
    input). Shapes are per sample.
    """

    def __init__(self, graph: OpGraph, trace: Trace, name: str):
        self.graph, self.trace, self.node = graph, trace, graph[name]
        self.leaves, self.spec = self.node.leaves()
        self.values = [trace.values[leaf.name] if isinstance(leaf, Ref) else leaf
                       for leaf in self.leaves]
        self.output = trace.values[name]
        self.batch = trace.batch

    def ref(self, position: int):
        leaf = self.leaves[position]
        return self.graph[leaf.name] if isinstance(leaf, Ref) else None

    def in_shape(self, position: int) -> tuple[int, ...]:
        return self.ref(position).shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.node.shape

    def arguments(self, replace: dict[int, object] | None = None, *, per_sample: bool = False,
                  overrides: dict[int, object] | None = None):
        """(args, kwargs) with some leaves replaced (per_sample: one-sample scalars) and some
        top-level arguments overridden (`overrides`: argument index, or keyword, -> value)."""
        values = list(self.values)
        if per_sample:
            for i, leaf in enumerate(self.leaves):
                if isinstance(leaf, Ref) and leaf.name in self.trace.sample_scalars:
                    values[i] = self.trace.sample_scalars[leaf.name]
        for position, value in (replace or {}).items():
            values[position] = value
        args, kwargs = pytree.tree_unflatten(values, self.spec)
        positional = {k: v for k, v in (overrides or {}).items() if isinstance(k, int)}
        if positional:
            args = list(args) + [None] * max(0, max(positional) + 1 - len(args))
            for index, value in positional.items():
                args[index] = value
            args = tuple(args)
        keywords = {k: v for k, v in (overrides or {}).items() if isinstance(k, str)}
        return args, {**kwargs, **keywords}

    def arg(self, index: int, name: str, default=None):
        """Argument `index` (or keyword `name`, or the default), with node values."""
        args, kwargs = self.arguments()
        return args[index] if len(args) > index else kwargs.get(name, default)

    def run(self, replace: dict[int, torch.Tensor], overrides: dict | None = None
            ) -> torch.Tensor:
        """The op on every sample with the given leaves replaced (same batch layout)."""
        size, node = self.graph.static_batch, self.node
        if size is None:
            args, kwargs = self.arguments(replace, overrides=overrides)
            return _select(node, op_target(node)(*args, **kwargs))
        positions = list(replace) + [i for i in self.batched_positions() if i not in replace]
        tensors = [replace[i] if i in replace else self.values[i] for i in positions]
        axes = [self.ref(i).batch_axis for i in positions]
        pieces = []
        for start, count in pad_chunks(self.batch, size):
            chunk = {p: take_chunk(t, a, start, count, size)
                     for p, t, a in zip(positions, tensors, axes, strict=True)}
            args, kwargs = self.arguments(chunk, overrides=overrides)
            pieces.append(_select(node, op_target(node)(*args, **kwargs))
                          .narrow(node.batch_axis, 0, count))
        return torch.cat(pieces, dim=node.batch_axis)

    def run_unit(self, replace: dict[int, torch.Tensor], overrides: dict | None = None
                 ) -> torch.Tensor:
        """The op on ONE sample (one-sample scalars), `replace` giving every batched leaf as
        a one-sample tensor with its batch axis kept; returns the output without batch axis."""
        unit = self.trace.unit_batch
        expanded = {}
        for position, value in replace.items():
            ref = self.ref(position)
            if unit > 1 and ref is not None and ref.kind in BATCHED:
                axis = ref.batch_axis
                value = value.expand(*value.shape[:axis], unit, *value.shape[axis + 1:])
            expanded[position] = value
        args, kwargs = self.arguments(expanded, per_sample=True, overrides=overrides)
        return _select(self.node, op_target(self.node)(*args, **kwargs)).select(
            self.node.batch_axis, 0)

    def batched_positions(self) -> list[int]:
        return [i for i, leaf in enumerate(self.leaves)
                if isinstance(leaf, Ref) and self.graph[leaf.name].kind in BATCHED]


def _select(node, result):
    return result if node.output_index is None else result[node.output_index]
