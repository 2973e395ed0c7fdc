"""Data movement (views, permutes, slices, concatenations, padding, gathers...) and max pooling.

A data-movement op copies entries; pushing the tensor of entry numbers `arange(D_in)` through
the op (every other floating operand filled with -1) tells which input entry each output
entry copies, -1 meaning "from elsewhere" (a zero row: padding, another operand of a `cat`).
The result is a `Gather` with weights 1 and 0, shared when no index tensor depends on the
input. Reshape-like views keep row-major order: the identity. Max pooling selects the entry
its indices name: a per-sample `Selection`.
"""

from __future__ import annotations

import torch

from ...engine.structures import Selection
from ..opgraph import ACTIVATION, BATCH_SHAPED, BATCH_VALUE, DIFFERENTIATED, INPUT
from ..replay import OpCall
from ..structures import Gather, Identity
from .registry import OpRule, apply_structured, leaf_node, register

aten = torch.ops.aten

RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default,
            aten.flatten.using_ints, aten.unflatten.int, aten.unsqueeze.default,
            aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
MOVES = (aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default,
         aten.slice.Tensor, aten.select.int, aten.cat.default, aten.stack.default,
         aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
         aten.unbind.int, aten.constant_pad_nd.default, aten.narrow.default,
         aten.repeat.default, aten.flip.default, aten.roll.default, aten.movedim.int,
         aten.slice_scatter.default, aten.select_scatter.default, aten.copy.default,
         aten.index_select.default, aten.gather.default, aten.index.Tensor,
         aten.diagonal.default, aten.pixel_shuffle.default, aten.pixel_unshuffle.default,
         aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec,
         aten.upsample_nearest3d.vec, aten.upsample_nearest1d.default,
         aten.upsample_nearest2d.default, aten.upsample_nearest3d.default,
         aten.unfold.default, aten.channel_shuffle.default, aten.tile.default,
         aten.pad.default, aten.reflection_pad1d.default, aten.reflection_pad2d.default,
         aten.reflection_pad3d.default, aten.replication_pad1d.default,
         aten.replication_pad2d.default, aten.replication_pad3d.default,
         aten._pad_circular.default)


def _is_reshape(node) -> bool:
    return node.op_key in {str(op) for op in RESHAPES}


class MovementRule(OpRule):
    name = "data-movement"
    family = "movement"
    any_batch_axis = True

    def applies(self, node, graph, position):
        # every floating operand must be replaceable by index numbers: no op arithmetic
        return node.dtype is not None and node.dtype.is_floating_point

    def _shared(self, node, graph) -> bool:
        """No index tensor (or other non-floating argument) varies with the sample."""
        return not any(graph[r].kind == BATCH_VALUE or (
            graph[r].kind == BATCH_SHAPED and not graph[r].dtype.is_floating_point)
            for r in node.refs())

    def structure(self, node, graph, position):
        if _is_reshape(node):
            return "identity"
        return "shared-gather" if self._shared(node, graph) else "gather"

    def _replacements(self, call: OpCall, position: int, batch: int) -> dict[int, torch.Tensor]:
        """Entry numbers for `position`, -1 for every other floating tensor, in the layout the
        op expects with `batch` samples (1: one sample)."""
        replace = {}
        for i, value in enumerate(call.values):
            ref = call.ref(i)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            if ref is not None and ref.kind in (INPUT, ACTIVATION, BATCH_SHAPED):
                shape = list(ref.shape)
                shape.insert(ref.batch_axis, batch)
            else:
                shape = list(value.shape)
            if i == position:
                per_sample = torch.arange(ref.numel, dtype=torch.float64).reshape(ref.shape)
                replace[i] = per_sample.unsqueeze(ref.batch_axis).expand(shape)
            else:
                replace[i] = torch.full(shape, -1.0, dtype=torch.float64)
        return replace

    def _entries(self, call: OpCall, position: int) -> torch.Tensor:
        """The entry each output entry copies (-1: none), `(1|B, D_out)` as float."""
        # constant padding writes its fill value: make it -1, not an entry number
        overrides = None
        if call.node.op_key == "aten.constant_pad_nd.default":
            overrides = {2: -1.0}
        elif call.node.op_key == "aten.pad.default" and call.arg(2, "mode",
                                                                 "constant") == "constant":
            by_keyword = "value" in call.node.kwargs or "mode" in call.node.kwargs
            overrides = {"value": -1.0} if by_keyword else {2: "constant", 3: -1.0}
        if self._shared(call.node, call.graph):
            out = call.run_unit(self._replacements(call, position, 1), overrides)
            return out.reshape(1, -1)
        out = call.run(self._replacements(call, position, call.batch), overrides)
        return out.movedim(call.node.batch_axis, 0).reshape(call.batch, -1)

    def jacobian(self, call, position):
        if _is_reshape(call.node):
            return Identity(call.node.numel, call.output.dtype, call.output.device)
        entries = self._entries(call, position)
        copied = entries >= 0
        index = torch.where(copied, entries, torch.zeros_like(entries)).long()
        return Gather(index, copied.to(call.output.dtype), call.ref(position).numel)

    def jvp(self, call, position, v):
        if _is_reshape(call.node):
            return v.reshape(*v.shape[:2], *call.out_shape)
        return apply_structured(self.jacobian(call, position), v, call.out_shape)

    def vjp(self, call, position, u):
        if _is_reshape(call.node):
            return u.reshape(*u.shape[:2], *call.in_shape(position))
        b, k = u.shape[:2]
        out = self.jacobian(call, position).left_apply(u.reshape(b, k, -1))
        return out.expand(b, k, out.shape[2]).reshape(b, k, *call.in_shape(position))


register(*RESHAPES, *MOVES)(MovementRule)

MAX_POOLS = {
    "aten.max_pool1d.default": 1, "aten.max_pool2d.default": 2, "aten.max_pool3d.default": 3,
    "aten.max_pool1d_with_indices.default": 1, "aten.max_pool2d_with_indices.default": 2,
    "aten.max_pool3d_with_indices.default": 3,
    "aten.adaptive_max_pool1d.default": 1, "aten.adaptive_max_pool2d.default": 2,
    "aten.adaptive_max_pool3d.default": 3,
}


@register(*(getattr(aten, key.split(".")[1]).default for key in MAX_POOLS))
class MaxPoolRule(OpRule):
    """Max pooling picks one input entry per output entry: a per-sample selection."""

    name = "max-pool"
    family = "pooling"

    def structure(self, node, graph, position):
        return "selection"

    def applies(self, node, graph, position):
        operand = leaf_node(node, graph, 0)
        return (position == 0 and node.output_index in (None, 0) and node.batch_axis == 0
                and operand.kind in DIFFERENTIATED and operand.batch_axis == 0
                and len(operand.shape) == MAX_POOLS[node.op_key] + 1)

    def indices(self, call: OpCall) -> torch.Tensor:
        """The input entry each output entry takes, per sample: `(B, D_out)`."""
        args, kwargs = call.arguments()
        name = call.node.op_name
        if not name.startswith("adaptive") and not name.endswith("_with_indices"):
            name = name + "_with_indices"
        _, where = getattr(aten, name).default(*args, **kwargs)
        x = args[0]
        spatial = x[0, 0].numel()
        channels = torch.arange(x.shape[1], device=x.device) * spatial
        shape = [1, -1] + [1] * (where.ndim - 2)
        return (where + channels.reshape(shape)).reshape(x.shape[0], -1)

    def jacobian(self, call, position):
        return Selection(self.indices(call), call.ref(0).numel, call.output.dtype)

    def jvp(self, call, position, v):
        index = self.indices(call)[:, None].expand(v.shape[0], v.shape[1], -1)
        return torch.gather(v.flatten(2), 2, index).reshape(*v.shape[:2], *call.out_shape)

    def vjp(self, call, position, u):
        index = self.indices(call)[:, None].expand(u.shape[0], u.shape[1], -1)
        out = u.new_zeros(*u.shape[:2], call.ref(0).numel)
        return out.scatter_add_(2, index, u.flatten(2)).reshape(*u.shape[:2],
                                                                 *call.in_shape(0))

