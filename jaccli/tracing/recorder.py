"""Run a model once and record every call of its leaf modules: input copies, arguments, outputs.

A *call site* is one call of one leaf module during a forward pass (a module used twice, like a
shared activation, gives two sites: ``act#0`` and ``act#1``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ModelRunError, UnsupportedModuleError, is_out_of_memory


@dataclass
class CallRecord:
    """One call of a leaf module, captured during a forward pass.

    input: a copy of the first positional tensor argument, shape (B, *in_shape), taken before
        the call (so in-place modules cannot change it).
    extra_args / extra_kwargs: the other arguments, held fixed when differentiating.
    input_ref / output_ref: the tensor objects themselves, to tell whether calls form a chain.
    batched: positions (("args", i) or ("kwargs", name)) of the extra arguments that are
        per-sample (computed from the model input), decided once, when the layers are traced.
    """

    site: str
    module_name: str
    module: nn.Module
    input: torch.Tensor | None
    extra_args: tuple
    extra_kwargs: dict
    input_ref: Any
    output_ref: Any
    batched: tuple = ()


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


def batched_extra_positions(record: CallRecord) -> list[tuple[str, Any]]:
    """Positions (("args", i) or ("kwargs", name)) of the per-sample extra arguments."""
    return list(record.batched)


def _derived_from_input(record: CallRecord) -> tuple:
    """The extra tensor arguments computed from the model input (they carry its gradient)
    and holding one row per sample — not buffers or constants, whatever their shape."""
    batch = record.input.shape[0] if record.input is not None else None
    named = [(("args", i), v) for i, v in enumerate(record.extra_args)]
    named += [(("kwargs", k), v) for k, v in record.extra_kwargs.items()]
    return tuple(where for where, v in named if isinstance(v, torch.Tensor)
                 and v.requires_grad and v.ndim and v.shape[0] == batch)


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
    positions: which extra arguments of each site are per-sample (`Trace.positions`); None
    decides it in this run, from which arguments are computed from the input (the run then
    tracks gradients, so pass the traced positions for every later batch).
    """

    def __init__(self, model: nn.Module, hookable: bool = True,
                 positions: dict[str, tuple] | None = None):
        self.model = model
        self.hookable = hookable
        self.positions = positions
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
        self.last_input = x
        self.running: list[str] = []  # leaf modules entered and not yet returned
        self.mutated = False  # some module's output was changed in place before being read
        self._versions: dict[int, int] = {}  # id(output) -> its version when produced
        if self.positions is None:
            output = self._run_tracking_input(x)
        else:
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
            if self.positions is None:
                record.batched = _derived_from_input(record)
            else:
                record.batched = self.positions.get(record.site, ())
        out = first_tensor(output)
        if out is None:
            raise ModelRunError("the model's output is not a tensor (nor a tuple holding one)")
        return out, self._records

    def _run_tracking_input(self, x: torch.Tensor) -> Any:
        """Run with the input (and only the input) carrying gradients, so that what is
        computed from it can be told from buffers and constants."""
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                source = x.detach().requires_grad_(torch.is_floating_point(x))
                self.last_input = source  # the tensor the first layer receives
                return self._run_hooked(source) if self.hookable else \
                    self._run_sequential(source)
        finally:
            for p in frozen:
                p.requires_grad_(True)

    def _record(self, name: str, module: nn.Module, args: tuple, kwargs: dict,
                output: Any) -> None:
        if self.running and self.running[-1] == name:
            self.running.pop()
        occurrence = self._counts.get(name, 0)
        self._counts[name] = occurrence + 1
        pending = self._pending.get(id(module), [])
        copied = pending.pop() if pending else None
        first = args[0] if args else None
        produced = first_tensor(output)
        if produced is not None:
            self._versions[id(produced)] = produced._version
        self._records.append(CallRecord(
            site=str(occurrence), module_name=name, module=module,
            input=copied if isinstance(first, torch.Tensor) else None,
            extra_args=tuple(args[1:]), extra_kwargs=dict(kwargs),
            input_ref=first, output_ref=first_tensor(output)))

    def _run_hooked(self, x: torch.Tensor) -> Any:
        handles = []
        self._pending = {}

        def pre_hook(module, args, kwargs):
            self.running.append(names[id(module)])
            first = args[0] if args else None
            produced = self._versions.get(id(first))
            if produced is not None and first._version != produced:
                self.mutated = True  # changed in place between two modules
            copy = first.detach().clone() if isinstance(first, torch.Tensor) else None
            self._pending.setdefault(id(module), []).append(copy)

        names = {id(module): name for name, module in self.leaves}
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
            self.running.append(name)
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


def run_model(recorder: ForwardRecorder, x: torch.Tensor) -> tuple[torch.Tensor,
                                                                   list[CallRecord]]:
    """`recorder.run(x)` with the model's own errors turned into one-line messages."""
    try:
        return recorder.run(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        if is_out_of_memory(exc):
            raise
        raise model_error(exc, x, recorder.running[-1] if recorder.running else None) from exc


def model_error(exc: Exception, x: torch.Tensor, module: str | None = None) -> ModelRunError:
    """A one-line ModelRunError for an exception the model raised on input `x` (inside the
    leaf module called `module`, when known)."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f" in module {module}" if module else ""
    return ModelRunError(f"the model failed{where} on input of shape {tuple(x.shape[1:])} per "
                         f"sample: {message}")
