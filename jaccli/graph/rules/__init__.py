"""Rules keyed on ATen operators; `rule_for` picks the one for a node and argument.

Importing this package registers every family: pointwise (any op tagged
`torch.Tag.pointwise`, plus PReLU, hardswish...), linear, linear maps (convolutions,
pooling), movement, norm, softmax, attention. An op with no rule that applies goes through
the generic per-op route (`generic.op_jacobian_generic`).
"""

from __future__ import annotations

import torch

from ..opgraph import BATCHED, OpGraph, OpNode, Ref
from . import attention, linear, linear_maps, movement, norm, pointwise, softmax  # noqa: F401
from .registry import OpRule, registered, registered_ops

__all__ = ["OpRule", "rule_for", "registered_ops"]


def rule_for(node: OpNode, graph: OpGraph, position: int) -> OpRule | None:
    """The rule that differentiates `node` w.r.t. argument `position`, or None (generic)."""
    rule = registered(node.target)
    if rule is None and torch.Tag.pointwise in getattr(node.target, "tags", ()):
        rule = pointwise.POINTWISE
    if rule is None:
        return None
    if not rule.any_batch_axis:
        refs = [leaf.name for leaf in node.leaves()[0] if isinstance(leaf, Ref)]
        if node.batch_axis != 0 or any(graph[r].kind in BATCHED and graph[r].batch_axis != 0
                                       for r in refs):
            return None
    return rule if rule.applies(node, graph, position) else None
