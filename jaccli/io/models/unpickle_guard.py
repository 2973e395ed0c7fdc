"""While torch.export.load runs: no unpickling beyond tensors, no native code, no `eval`.

The archive is inspected before loading (`archive_safety`); this guard covers the same
paths again where torch would run code, in case the inspection missed a way in:

- `torch.load` is forced to `weights_only=True` (torch's example-input fallback and
  `use_pickle` payloads call it with `weights_only=False`);
- `pickle.loads` (opaque constants), TorchScript's `_pickle_load_obj` (custom objects) and
  AOTInductor library loading refuse;
- `sympy.sympify` in the deserializer accepts only plain arithmetic strings;
- pytree's enum hook and module imports for treespecs refuse.

It patches module attributes for the duration of one load: call it from one thread at a time.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch

from ...errors import UntrustedPickleError
from .export_program_check import expression_problem


class _Forwarding(SimpleNamespace):
    """A stand-in for a module: our overrides, everything else from the real module."""

    def __init__(self, module, **overrides):
        super().__init__(**overrides)
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise UntrustedPickleError(f"loading needs {what}, which runs code from the file; "
                                   "--trust-pickle allows it, only for files you trust")
    return refuse


@contextmanager
def no_code_execution() -> Iterator[None]:
    """Patch torch's export loading paths so that they cannot run code from the archive."""
    import sympy
    import torch._export.serde.serialize as serialize
    import torch.export.pt2_archive._package as package
    import torch.utils._pytree as pytree

    real_load = torch.load
    real_sympify = sympy.sympify

    def tensors_only_load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return real_load(*args, **kwargs)
        except pickle.UnpicklingError as exc:
            raise _refuse("full unpickling (weights_only=False)")() from exc

    def arithmetic_only_sympify(expr, *args, **kwargs):
        if isinstance(expr, str):
            problem = expression_problem(expr)
            if problem:
                raise UntrustedPickleError(f"{problem}; --trust-pickle allows it, only for "
                                           "files you trust")
        return real_sympify(expr, *args, **kwargs)

    with ExitStack() as stack:
        patches = [
            mock.patch.object(torch, "load", tensors_only_load),
            mock.patch.object(torch._C, "_pickle_load_obj",
                              _refuse("a TorchBind custom object")),
            mock.patch.object(package, "pickle",
                              _Forwarding(package.pickle, loads=_refuse("pickle.loads"))),
            mock.patch.object(package, "_load_aoti", _refuse("AOTInductor native code")),
            mock.patch.object(serialize, "sympy",
                              _Forwarding(sympy, sympify=arithmetic_only_sympify)),
            mock.patch.object(pytree, "enum_object_hook", _refuse("an enum import")),
            mock.patch.object(pytree, "importlib",
                              _Forwarding(importlib, import_module=_refuse("a module import"))),
        ]
        for patch in patches:
            stack.enter_context(patch)
        yield
