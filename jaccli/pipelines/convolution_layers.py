"""Which planned layers are one convolution, stored by compute as the convolution's kernel
(encoding `convolution`) instead of its matrix."""

from __future__ import annotations

import math

from ..graph.engine import LayerPlan
from ..graph.opgraph import OpGraph
from ..graph.rules.registry import leaf_node


def convolution_kernel(graph: OpGraph, row: LayerPlan) -> int | None:
    """The number of weight values of a layer that is one convolution of a fixed weight with
    only identities around it and the convolution's own input and output shapes (stored as
    its kernel, encoding `convolution`); None for any other layer."""
    convolutions = [op for op in row.ops if op.mode == "rule" and "convolution" in op.rules]
    if len(convolutions) != 1 or any(op.structure != "identity" for op in row.ops
                                     if op is not convolutions[0]):
        return None
    node = graph[convolutions[0].node]
    leaves = node.leaves()[0]
    source, weight = leaf_node(node, graph, 0), leaf_node(node, graph, 1)
    if (source is None or weight is None or any(isinstance(a, str) and a == "same"
                                                 for a in leaves)
            or tuple(source.shape) != tuple(row.input_shape)
            or tuple(node.shape) != tuple(row.output_shape)):
        return None
    return math.prod(weight.shape)
