"""Floating dtypes baked into captured graphs (torch.export, fx) follow the run's --dtype.

A torch.export archive records the dtype of every tensor its forward creates (e.g. an LSTM's
zero initial state, `aten.zeros(..., dtype=torch.float32)`). Converting the parameters with
`module.to(dtype)` leaves those constants behind, and the first matmul between a float64
parameter and a float32 state fails. `retarget_dtype` rewrites the `dtype=` keyword of every
graph node that creates a floating tensor, so the whole program runs in the chosen dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def retarget_dtype(module: nn.Module, dtype: torch.dtype) -> int:
    """Rewrite floating `dtype=` keywords in every fx graph under `module` to `dtype`.

    Integer and boolean dtypes are left alone (indices, masks). Returns how many graph nodes
    changed; modules without an fx graph (eager, TorchScript) are untouched (0).
    """
    if not dtype.is_floating_point:
        return 0
    changed = 0
    for sub in module.modules():
        if isinstance(sub, torch.jit.ScriptModule):  # its graph is TorchScript IR, not fx
            continue
        graph = getattr(sub, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        touched = 0
        for node in graph.nodes:
            wanted = node.kwargs.get("dtype")
            if isinstance(wanted, torch.dtype) and wanted.is_floating_point and wanted != dtype:
                node.kwargs = {**node.kwargs, "dtype": dtype}
                touched += 1
        if touched and isinstance(sub, torch.fx.GraphModule):
            sub.recompile()
        changed += touched
    return changed
