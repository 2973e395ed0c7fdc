"""Find a model's layers from one recorded forward pass, and whether they form a chain.

A *layer* is one call site (`granularity="module"`) or an affine/conv site followed by the
elementwise activations (and eval-mode normalizations / dropouts) applied directly to its output
(`granularity="block"`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ModelRunError, UsageError, is_out_of_memory
from .recorder import (
    CallRecord,
    ForwardRecorder,
    first_tensor,
    model_error,
    run_model,
    site_function,
)

GRANULARITIES = ("module", "block")

AFFINE_TYPES = frozenset({
    "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
    "ConvTranspose3d", "LazyLinear", "LazyConv1d", "LazyConv2d", "LazyConv3d",
})
ELEMENTWISE_TYPES = frozenset({
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU",
    "Mish", "Tanh", "Sigmoid", "Softplus", "Softsign", "Hardtanh", "Hardswish", "Hardsigmoid",
    "Hardshrink", "Softshrink", "Tanhshrink", "LogSigmoid", "Threshold",
})
# Modules that may sit between an affine layer and its activation inside one block.
_BLOCK_FOLLOWERS = ELEMENTWISE_TYPES | {
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Dropout", "Dropout1d", "Dropout2d",
    "Dropout3d", "AlphaDropout", "Identity",
}


@dataclass
class Layer:
    """A unit whose Jacobian jaccli computes: one call site or a block of consecutive sites.

    input_shape / output_shape: per-sample shapes (without the batch axis).
    """

    name: str
    sites: tuple[str, ...]
    module_names: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    type_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    skip_reason: str | None = None
    has_extra_inputs: bool = False

    @property
    def d_in(self) -> int:
        return math.prod(self.input_shape)

    @property
    def d_out(self) -> int:
        return math.prod(self.output_shape)

    def function(self, record: CallRecord) -> Callable[..., torch.Tensor]:
        """`f(x, *batched_extras) -> y`: the layer's map from a batch of inputs to outputs.

        record: the first site's call record; its batched extra arguments (see
        `batched_extras`) are the trailing arguments of `f`, the rest stay fixed.
        """
        first = site_function(record)

        def apply(x: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
            out = first(x, *extras)
            for module in self.modules[1:]:
                out = first_tensor(module(out))
            return out

        return apply


@dataclass
class Trace:
    """The layers of a model and how they connect, from one forward pass.

    chain: True when the layers run one after another (each consumes the previous one's
        output, the first consumes the model input, the last produces the model output), so
        the end-to-end Jacobian is the product of the layer Jacobians.
    positions: for each call site, which extra arguments are per-sample (decided here, once;
        pass it to every later `ForwardRecorder`).
    """

    layers: list[Layer]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    chain: bool
    skipped: list[Layer] = field(default_factory=list)
    all_layers: list[Layer] = field(default_factory=list)
    positions: dict[str, tuple] = field(default_factory=dict)


def trace_layers(model: nn.Module, example: torch.Tensor, *, type_name: Callable[[str, nn.Module],
                 str] | None = None, hookable: bool = True, granularity: str = "module",
                 patterns: Sequence[str] | None = None) -> Trace:
    """Find the layers of `model` by running it once on `example` (shape (B, *in_shape)).

    type_name: maps (qualified name, module) to a layer type name (default: the class name).
    patterns: glob patterns on layer names (or member module names); None selects all.
    """
    if granularity not in GRANULARITIES:
        raise UsageError(f"--granularity must be one of {', '.join(GRANULARITIES)}, "
                         f"not {granularity!r}")
    type_name = type_name or (lambda name, m: getattr(m, "original_name", type(m).__name__))
    recorder = ForwardRecorder(model, hookable)
    output, records = run_model(recorder, example)
    positions = {r.site: r.batched for r in records}
    groups = _group(records, type_name, granularity)
    layers, skipped = [], []
    for group in groups:
        layer = _make_layer(group, type_name)
        (skipped if layer.skip_reason else layers).append(layer)
    selected = select_layers(layers, patterns)
    # An output changed in place before the next module read it (`h *= 2`, `out += x`)
    # keeps its identity but not its value: the product of layer Jacobians would be wrong.
    chain = _is_chain(groups, layers, recorder.last_input, output) and not recorder.mutated
    return Trace(selected, tuple(example.shape[1:]), tuple(output.shape[1:]), chain, skipped,
                 layers, positions)


def trace_end_to_end(model: nn.Module, example: torch.Tensor) -> Trace:
    """A trace with no layers: just the model's input and output shapes."""
    try:
        with torch.no_grad():
            out = first_tensor(model(example))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if is_out_of_memory(exc):
            raise
        raise model_error(exc, example) from exc
    if out is None:
        raise ModelRunError("the model's output is not a tensor (nor a tuple holding one)")
    return Trace([], tuple(example.shape[1:]), tuple(out.shape[1:]), chain=False)


def select_layers(layers: list[Layer], patterns: Iterable[str] | None) -> list[Layer]:
    """The layers matching any glob pattern (on the layer name or a member module name)."""
    if patterns is None:
        return list(layers)
    patterns = list(patterns)
    chosen = [layer for layer in layers if any(
        fnmatch.fnmatchcase(name, p) for p in patterns
        for name in (layer.name, *layer.sites, *layer.module_names))]
    if not chosen:
        names = ", ".join(layer.name for layer in layers) or "(none)"
        raise UsageError(f"--layers {' '.join(patterns)} matches no layer; layers are: {names}")
    return chosen


def _group(records: list[CallRecord], type_name, granularity: str) -> list[list[CallRecord]]:
    groups: list[list[CallRecord]] = []
    for record in records:
        kind = type_name(record.module_name, record.module)
        if (granularity == "block" and groups and kind in _BLOCK_FOLLOWERS
                and type_name(groups[-1][0].module_name, groups[-1][0].module) in AFFINE_TYPES
                and record.input_ref is groups[-1][-1].output_ref
                and record.input_ref is not None):
            groups[-1].append(record)
        else:
            groups.append([record])
    return groups


def _make_layer(group: list[CallRecord], type_name) -> Layer:
    first, last = group[0], group[-1]
    kinds = [type_name(r.module_name, r.module) for r in group]
    name = "+".join(r.site for r in group) or "(model)"
    skip = None
    if first.input is None:
        skip = "input is not a tensor"
    elif not torch.is_floating_point(first.input):
        skip = f"input is {first.input.dtype} (not differentiable)"
    elif last.output_ref is None:
        skip = "output is not a tensor"
    in_shape = tuple(first.input.shape[1:]) if first.input is not None else ()
    out_shape = tuple(last.output_ref.shape[1:]) if last.output_ref is not None else ()
    has_extra = bool(first.extra_args or first.extra_kwargs)
    return Layer(name, tuple(r.site for r in group), tuple(r.module_name for r in group),
                 tuple(r.module for r in group), "+".join(kinds), in_shape, out_shape, skip,
                 has_extra)


def _is_chain(groups, layers, example, output) -> bool:
    if not layers or len(groups) != len(layers):
        return False
    if any(layer.has_extra_inputs for layer in layers):
        return False
    if groups[0][0].input_ref is not example or groups[-1][-1].output_ref is not output:
        return False
    pairs = zip(groups, groups[1:], strict=False)
    return all(nxt[0].input_ref is prev[-1].output_ref for prev, nxt in pairs)
