"""The Python API: per-sample Jacobians of an in-memory model, no files involved."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .engine.engine import END_TO_END, JacobianEngine
from .engine.generic import per_sample_jacobian
from .engine.structures import Structured
from .layers import ForwardRecorder, Layer, first_tensor, run_model, trace_layers
from .models import LoadedModel


def _unwrap(model: nn.Module | LoadedModel) -> tuple[nn.Module, bool, object]:
    if isinstance(model, LoadedModel):
        return model.module, model.hookable, model.type_name
    return model, True, None


def list_layers(model: nn.Module | LoadedModel, x: torch.Tensor, *, granularity: str = "module",
                layers: Sequence[str] | None = None) -> list[Layer]:
    """The layers jaccli finds in `model` when run on `x` (shape (N, *in_shape))."""
    module, hookable, type_name = _unwrap(model)
    return trace_layers(module, x, type_name=type_name, hookable=hookable,
                        granularity=granularity, patterns=layers).layers


def layer_jacobians(model: nn.Module | LoadedModel, x: torch.Tensor, *,
                    granularity: str = "module", layers: Sequence[str] | None = None,
                    end_to_end: bool = False, structured: bool = False, mode: str = "auto",
                    ) -> dict[str, torch.Tensor | Structured]:
    """Per-sample Jacobian of every layer's output w.r.t. its input, from one forward pass.

    x: `(N, *in_shape)`. Returns `{layer name: (N, D_out, D_in)}` in execution order, plus
    `"(end-to-end)"`: `(N, D_out_model, D_in_model)` when `end_to_end` is true (formed from the
    layer Jacobians when the layers are a chain). With `structured=True` the values are the
    exact compact forms (`jaccli.engine.structures`) instead of dense tensors.
    The model should be in eval mode (`load_model` does that).
    """
    module, hookable, type_name = _unwrap(model)
    trace = trace_layers(module, x, type_name=type_name, hookable=hookable,
                         granularity=granularity, patterns=layers)
    engine = JacobianEngine(module, trace, layers=trace.layers, end_to_end=end_to_end,
                            n_samples=x.shape[0], mode=mode)
    _, calls = run_model(ForwardRecorder(module, hookable), x)
    result = engine.compute(x, {r.site: r for r in calls})
    if structured:
        return result
    return {name: jac.dense(x.shape[0]) for name, jac in result.items()}


def end_to_end_jacobian(model: nn.Module | LoadedModel, x: torch.Tensor, *,
                        mode: str = "auto") -> torch.Tensor:
    """Per-sample Jacobian of the model output w.r.t. its input: `(N, D_out, D_in)`.

    Computed directly by torch.func (`layer_jacobians(..., end_to_end=True)` reuses the
    layer Jacobians instead).
    """
    module, _, _ = _unwrap(model)
    return per_sample_jacobian(lambda xb: first_tensor(module(xb)), x, mode=mode)


__all__ = ["END_TO_END", "end_to_end_jacobian", "layer_jacobians", "list_layers"]
