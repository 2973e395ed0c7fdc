"""JSON architecture specs: build an `nn.Module` from data alone, with no code execution.

A spec is a JSON document::

    {"format": "jaccli-arch", "version": 1,
     "input_shape": [64],                       # per-sample shape, optional
     "model": NODE}

    NODE = {"type": "Linear", "args": [64, 32], "kwargs": {"bias": true}}
         | {"type": "Sequential", "children": [NODE, ...]}          # names "0", "1", ...
         | {"type": "Sequential", "children": {"name": NODE, ...}}  # named children
         | {"type": "Residual", "children": [NODE, ...]}            # x + body(x)

Leaf types are the module classes of `torch.nn` (``Linear``, ``Conv2d``, ``Tanh``,
``BatchNorm2d``, ...); constructor arguments must be JSON scalars or lists, and may not
choose the device or dtype (jaccli does: ``--device``, ``--dtype``). Containers nest at most
`MAX_DEPTH` deep.
"""

from __future__ import annotations

import inspect
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ModelLoadError

SPEC_FORMAT = "jaccli-arch"
SPEC_VERSION = 1
MAX_DEPTH = 64  # containers in containers; real networks nest a handful deep
MAX_MODULES = 100_000
_RESERVED_ARGUMENTS = ("device", "dtype", "factory_kwargs")

# torch.nn classes that take callables or other modules, or are not callable layers.
_NOT_LEAF_TYPES = {
    "Module", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict", "Container",
    "Sequential", "DataParallel", "Transformer", "TransformerEncoder", "TransformerDecoder",
}


class Residual(nn.Sequential):
    """`x + body(x)`, where body is the sequence of children (shapes must agree)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


_CONTAINERS: dict[str, type[nn.Sequential]] = {"Sequential": nn.Sequential, "Residual": Residual}


def build_model(spec: dict[str, Any] | str | Path) -> nn.Module:
    """Build the module a spec describes (weights freshly initialized).

    `spec` is a parsed spec, a JSON string, or the path of a JSON file.
    """
    spec = load_spec(spec)
    return _build_node(spec["model"], "model")


def spec_input_shape(spec: dict[str, Any]) -> tuple[int, ...] | None:
    """The per-sample input shape a spec declares, or None."""
    shape = spec.get("input_shape")
    return None if shape is None else tuple(int(d) for d in shape)


def load_spec(spec: dict[str, Any] | str | Path) -> dict[str, Any]:
    """Parse and validate the top level of a spec (dict, JSON text or JSON file path)."""
    if isinstance(spec, Path) or (isinstance(spec, str) and not spec.lstrip().startswith("{")):
        path = Path(spec)
        try:
            spec = path.read_text()
        except OSError as exc:
            raise ModelLoadError(f"cannot read architecture spec {path}: {exc.strerror}") from exc
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"architecture spec is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise ModelLoadError(f"architecture spec is nested too deeply (containers may "
                                 f"nest at most {MAX_DEPTH} deep)") from exc
    if not isinstance(spec, dict) or "model" not in spec:
        raise ModelLoadError('architecture spec must be a JSON object with a "model" entry')
    if spec.get("format", SPEC_FORMAT) != SPEC_FORMAT:
        raise ModelLoadError(f'architecture spec has format {spec["format"]!r}, '
                             f'expected "{SPEC_FORMAT}"')
    version = spec.get("version", SPEC_VERSION)
    if version != SPEC_VERSION:
        raise ModelLoadError(f"architecture spec version {version} is not supported "
                             f"(this jaccli reads version {SPEC_VERSION}); upgrade jaccli")
    _check_size(spec["model"])
    return spec


def _check_size(root: Any) -> None:
    """Refuse specs nested deeper than MAX_DEPTH or with more than MAX_MODULES nodes (before
    anything recursive touches them)."""
    stack, count = [(root, 1)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise ModelLoadError(f"architecture spec nests containers more than {MAX_DEPTH} "
                                 "deep; flatten the spec")
        if count > MAX_MODULES:
            raise ModelLoadError(f"architecture spec declares more than {MAX_MODULES} modules")
        children = node.get("children") if isinstance(node, dict) else None
        if isinstance(children, dict):
            children = list(children.values())
        if isinstance(children, list):
            stack.extend((child, depth + 1) for child in children)


def _plain_value(value: Any, depth: int = 0) -> bool:
    """A JSON scalar, or a list of them (lists nested at most 4 deep)."""
    if isinstance(value, list):
        return depth < 4 and all(_plain_value(v, depth + 1) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _build_node(node: Any, where: str) -> nn.Module:
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise ModelLoadError(f'architecture spec: {where} must be an object with a "type"')
    kind = node["type"]
    if kind in _CONTAINERS:
        children = node.get("children", [])
        if isinstance(children, list):
            named = [(str(i), child) for i, child in enumerate(children)]
        elif isinstance(children, dict):
            named = list(children.items())
        else:
            raise ModelLoadError(f"architecture spec: {where}.children must be a list or object")
        built = OrderedDict((name, _build_node(child, f"{where}.{name}")) for name, child in named)
        return _CONTAINERS[kind](built)
    cls = getattr(nn, kind, None)
    if (kind in _NOT_LEAF_TYPES or kind.startswith("_") or not isinstance(cls, type)
            or not issubclass(cls, nn.Module)):
        raise ModelLoadError(f"architecture spec: {where} has unknown layer type {kind!r}; use a "
                             f"torch.nn layer class or one of {sorted(_CONTAINERS)}")
    args = node.get("args", [])
    kwargs = node.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ModelLoadError(f'architecture spec: {where} "args" must be a list and "kwargs" '
                             "an object")
    if not all(_plain_value(v) for v in [*args, *kwargs.values()]):
        raise ModelLoadError(f"architecture spec: {where} arguments must be numbers, strings, "
                             "booleans, null or lists of them")
    try:
        bound = inspect.signature(cls).bind(*args, **kwargs).arguments
    except TypeError as exc:
        raise ModelLoadError(f"architecture spec: cannot build {where} = {kind}(*{args}, "
                             f"**{kwargs}): {exc}") from exc
    reserved = [name for name in _RESERVED_ARGUMENTS if name in bound or name in kwargs]
    if reserved:
        raise ModelLoadError(f"architecture spec: {where} sets {reserved[0]!r}; jaccli chooses "
                             "the device and dtype (--device, --dtype): remove it")
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"architecture spec: cannot build {where} = {kind}(*{args}, "
                             f"**{kwargs}): {exc}") from exc
