"""The operator-graph Jacobian engine: capture a model as ATen ops, one rule per op.

    graph = capture(model, example)          # eager module, ExportedProgram or TorchScript
    engine = GraphEngine(graph, granularity="module")
    engine.plan()                            # per layer: rules, structure, mode
    engine.compute(x)                        # {layer name: Structured, "(end-to-end)": ...}
"""

from .capture import capture
from .engine import END_TO_END, GraphEngine
from .opgraph import OpGraph

__all__ = ["END_TO_END", "GraphEngine", "OpGraph", "capture"]
