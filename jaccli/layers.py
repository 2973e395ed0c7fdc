"""Find a model's layers and capture each layer's input in one forward pass per batch.

A *call site* is one call of one leaf module during a forward pass (a module used twice, like a
shared activation, gives two sites: ``act#0`` and ``act#1``). A *layer* is one site
(`granularity="module"`) or an affine/conv site followed by the elementwise activations (and
eval-mode normalizations / dropouts) applied directly to its output (`granularity="block"`).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import ModelRunError, UnsupportedModuleError, UsageError

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
class CallRecord:
    """One call of a leaf module, captured during a forward pass.

    input: a copy of the first positional tensor argument, shape (B, *in_shape), taken before
        the call (so in-place modules cannot change it).
    extra_args / extra_kwargs: the other arguments, held fixed when differentiating.
    input_ref / output_ref: the tensor objects themselves, to tell whether calls form a chain.
    """

    site: str
    module_name: str
    module: nn.Module
    input: torch.Tensor | None
    extra_args: tuple
    extra_kwargs: dict
    input_ref: Any
    output_ref: Any


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


def site_function(record: CallRecord) -> Callable[..., torch.Tensor]:
    """`f(x, *batched_extras) -> y` for one recorded call, other arguments held fixed."""
    batched = batched_extra_positions(record)
    args, kwargs = list(record.extra_args), dict(record.extra_kwargs)

    def apply(x: torch.Tensor, *extras: torch.Tensor) -> torch.Tensor:
        call_args, call_kwargs = list(args), dict(kwargs)
        for (where, key), value in zip(batched, extras, strict=True):
            if where == "args":
                call_args[key] = value
            else:
                call_kwargs[key] = value
        return first_tensor(record.module(x, *call_args, **call_kwargs))

    return apply


@dataclass
class Trace:
    """The layers of a model and how they connect, from one forward pass.

    chain: True when the layers run one after another (each consumes the previous one's
        output, the first consumes the model input, the last produces the model output), so
        the end-to-end Jacobian is the product of the layer Jacobians.
    """

    layers: list[Layer]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    chain: bool
    skipped: list[Layer] = field(default_factory=list)
    all_layers: list[Layer] = field(default_factory=list)


def batched_extra_positions(record: CallRecord) -> list[tuple[str, Any]]:
    """Positions (("args", i) or ("kwargs", name)) of extra tensor arguments with a batch axis."""
    batch = record.input.shape[0] if record.input is not None else None
    positions: list[tuple[str, Any]] = []
    for i, value in enumerate(record.extra_args):
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
            positions.append(("args", i))
    for name, value in record.extra_kwargs.items():
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
            positions.append(("kwargs", name))
    return positions


def batched_extras(record: CallRecord) -> list[torch.Tensor]:
    """The extra tensor arguments of `record` that carry a batch axis, in function order."""
    return [record.extra_args[key] if where == "args" else record.extra_kwargs[key]
            for where, key in batched_extra_positions(record)]


def first_tensor(value: Any) -> torch.Tensor | None:
    """`value` if a tensor, else the first tensor in a tuple/list (e.g. an LSTM's output)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                return item
    return None


class ForwardRecorder:
    """Runs the model and records every call of its leaf modules.

    Uses forward hooks; for TorchScript models (which have no hooks) it runs the children of a
    (nested) `Sequential` one by one instead, and refuses other TorchScript models.
    """

    def __init__(self, model: nn.Module, hookable: bool = True):
        self.model = model
        self.hookable = hookable
        self.leaves = [(name, m) for name, m in model.named_modules()
                       if not any(True for _ in m.children())]
        if not hookable and not _is_sequential_tree(model):
            raise UnsupportedModuleError(
                "per-layer Jacobians of this TorchScript model are not available: TorchScript "
                "has no forward hooks and the model is not a Sequential chain; use "
                "--no-layers for the end-to-end Jacobian, or load it as a state_dict with "
                "--arch or as a torch.export archive")
        self._records: list[CallRecord] = []
        self._counts: dict[str, int] = {}
        self._multi: set[str] = set()
        self._pending: dict[int, list[tuple]] = {}

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, list[CallRecord]]:
        """Run `model(x)`; return its output and the call records, in call order."""
        self._records, self._counts = [], {}
        with torch.no_grad():
            output = self._run_hooked(x) if self.hookable else self._run_sequential(x)
        counts = self._counts
        for record in self._records:
            if counts[record.module_name] > 1:
                self._multi.add(record.module_name)
        for record in self._records:
            if record.module_name in self._multi:
                record.site = f"{record.module_name}#{record.site}"
            else:
                record.site = record.module_name
        out = first_tensor(output)
        if out is None:
            raise ModelRunError("the model's output is not a tensor (nor a tuple holding one)")
        return out, self._records

    def _record(self, name: str, module: nn.Module, args: tuple, kwargs: dict,
                output: Any) -> None:
        occurrence = self._counts.get(name, 0)
        self._counts[name] = occurrence + 1
        pending = self._pending.get(id(module), [])
        copied = pending.pop() if pending else None
        first = args[0] if args else None
        self._records.append(CallRecord(
            site=str(occurrence), module_name=name, module=module,
            input=copied if isinstance(first, torch.Tensor) else None,
            extra_args=tuple(args[1:]), extra_kwargs=dict(kwargs),
            input_ref=first, output_ref=first_tensor(output)))

    def _run_hooked(self, x: torch.Tensor) -> Any:
        handles = []
        self._pending = {}

        def pre_hook(module, args, kwargs):
            first = args[0] if args else None
            copy = first.detach().clone() if isinstance(first, torch.Tensor) else None
            self._pending.setdefault(id(module), []).append(copy)

        for name, module in self.leaves:
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(
                lambda m, a, k, o, name=name: self._record(name, m, a, k, o), with_kwargs=True))
        try:
            return self.model(x)
        finally:
            for handle in handles:
                handle.remove()

    def _run_sequential(self, x: torch.Tensor) -> Any:
        out: Any = x
        for name, module in self.leaves:
            self._pending = {id(module): [out.detach().clone()]}
            result = module(out)
            self._record(name, module, (out,), {}, result)
            out = first_tensor(result)
        return out


def _is_sequential_tree(model: nn.Module) -> bool:
    children = list(model.children())
    if not children:
        return True
    name = getattr(model, "original_name", type(model).__name__)
    return name == "Sequential" and all(_is_sequential_tree(c) for c in children)


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
    groups = _group(records, type_name, granularity)
    layers, skipped = [], []
    for group in groups:
        layer = _make_layer(group, type_name)
        (skipped if layer.skip_reason else layers).append(layer)
    selected = select_layers(layers, patterns)
    chain = _is_chain(groups, layers, example, output)
    return Trace(selected, tuple(example.shape[1:]), tuple(output.shape[1:]), chain, skipped,
                 layers)


def run_model(recorder: ForwardRecorder, x: torch.Tensor) -> tuple[torch.Tensor,
                                                                   list[CallRecord]]:
    """`recorder.run(x)` with the model's own errors turned into one-line messages."""
    try:
        return recorder.run(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if is_out_of_memory(exc):
            raise
        raise model_error(exc, x) from exc


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


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocator failure (CUDA or CPU)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError)
        and ("out of memory" in str(exc) or "can't allocate memory" in str(exc)))


def model_error(exc: Exception, x: torch.Tensor) -> ModelRunError:
    """A one-line ModelRunError for an exception the model raised on input `x`."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelRunError(f"the model failed on input of shape {tuple(x.shape[1:])} per "
                         f"sample: {message}")


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
