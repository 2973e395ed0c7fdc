"""Resolve `--arch package.module:factory` to something that is safe to call with no arguments.

What is called: an `nn.Module` subclass, or a Python function (or a classmethod/staticmethod)
taking no required arguments, defined in the named module's own package; or a module
instance is used as it is. What is refused before anything is called: the standard library and
builtins (`os:system`, `subprocess:run`, `builtins:exec`), C functions, objects imported into
the module from another package, anything needing arguments.

Importing the module runs its top-level code, as any import does: `--arch` (and
`--arch-path`) name code the user chose and trusts, never code from the model file.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ...errors import ModelLoadError

IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_HINT = ("--arch takes a class or function of your own module (with --arch-path DIR) or of an "
         "installed model package, called with no arguments")


def resolve_factory(target: str, arch_path: str | Path | None) -> Callable[[], nn.Module]:
    """Import `target` (``package.module:factory``) and return a callable building the model.

    arch_path: a directory put first on ``sys.path`` before importing.
    """
    module_name, attr_path = target.split(":", 1)
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise ModelLoadError(f"--arch {target} names the Python standard library; {_HINT}")
    if arch_path is not None:
        directory = Path(arch_path)
        if not directory.is_dir():
            raise ModelLoadError(f"--arch-path {directory} is not a directory")
        if str(directory.resolve()) not in sys.path:
            sys.path.insert(0, str(directory.resolve()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(f"cannot import {module_name!r} for --arch {target}: {exc} "
                             "(add its directory with --arch-path)") from exc
    except Exception as exc:  # the user's module failed while being imported
        raise ModelLoadError(f"importing {module_name!r} for --arch {target} failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    obj = module
    for attr in attr_path.split("."):
        if attr.startswith("__") or not hasattr(obj, attr):
            raise ModelLoadError(f"--arch {target}: {module_name} has no attribute "
                                 f"{attr_path!r}")
        obj = getattr(obj, attr)
    if isinstance(obj, nn.Module):
        return lambda: obj
    _check_callable(obj, target, top)

    def factory() -> nn.Module:
        try:
            model = obj()
        except Exception as exc:  # the user's factory failed
            raise ModelLoadError(f"--arch {target} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ModelLoadError(f"--arch {target} returned a {type(model).__name__}, "
                                 "not a torch.nn.Module")
        return model

    return factory


def _check_callable(obj: object, target: str, top: str) -> None:
    if inspect.isclass(obj):
        if not issubclass(obj, nn.Module):
            raise ModelLoadError(f"--arch {target} is the class {obj.__name__}, not a "
                                 f"torch.nn.Module subclass; {_HINT}")
        function = obj.__init__
    elif inspect.ismethod(obj) and inspect.isclass(obj.__self__):
        function = obj.__func__  # a classmethod of a model class
    elif inspect.isfunction(obj):
        function = obj
    else:
        raise ModelLoadError(f"--arch {target} is a {type(obj).__name__}, not a Python class or "
                             f"function; {_HINT}")
    defined_in = getattr(obj, "__module__", None) or ""
    if defined_in.split(".")[0] != top:
        raise ModelLoadError(f"--arch {target} is defined in {defined_in or 'another module'}, "
                             f"not in the package {top}; {_HINT}")
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return  # no signature to check: a failing call is reported by the factory
    if inspect.isclass(obj) or inspect.ismethod(obj):
        parameters = parameters[1:]  # self / cls
    required = [p.name for p in parameters if p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        raise ModelLoadError(f"--arch {target} needs arguments ({', '.join(required)}); "
                             f"{_HINT}")
