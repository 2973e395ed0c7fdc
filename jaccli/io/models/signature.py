"""The forward arguments of a loaded model: names and defaults, for every format."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from .formats import ModelFormat

NO_DEFAULT = inspect.Parameter.empty


@dataclass(frozen=True)
class Argument:
    """One forward argument: its name, its default (`NO_DEFAULT` when it has none)."""

    name: str
    default: Any = NO_DEFAULT


def forward_arguments(loaded) -> list[Argument]:
    """The forward arguments of a `LoadedModel`, in order (without `self`).

    Eager modules: from `inspect.signature`; TorchScript: from the method schema; `.pt2`:
    from the program's module. `*args`/`**kwargs` are not listed.
    """
    if loaded.program is not None and loaded.format is not ModelFormat.TORCHSCRIPT:
        from torch.export.graph_signature import InputKind

        # the user inputs' placeholders carry the names
        return [Argument(spec.arg.name) for spec in loaded.program.graph_signature.input_specs
                if spec.kind == InputKind.USER_INPUT]
    return module_arguments(loaded.module)


def module_arguments(module) -> list[Argument]:
    """The forward arguments of an `nn.Module` or a TorchScript module, in order (without
    `self`; `*args`/`**kwargs` are not listed)."""
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        schema = module.forward.schema.arguments[1:]
        return [Argument(a.name, a.default_value if a.has_default_value() else NO_DEFAULT)
                for a in schema]
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [Argument(p.name, p.default) for p in parameters
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
