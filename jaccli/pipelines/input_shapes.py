"""Per-sample shapes of a multi-argument call, checked before the graph is captured: a file of
the wrong shape is named (the option, the file, its shape and the one expected), instead of the
capture failing deep inside the model.

The expected shape comes from the `.pt2` program's inputs when it declares them, else from the
layer that fails when the model runs on the input itself (a Linear's `in_features`, a
convolution's or norm's channels, a LayerNorm's normalized shape).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ShapeMismatchError, is_out_of_memory
from ..graph.call_layout import call as call_model


def check_call_shapes(loaded, model: nn.Module, call, x: torch.Tensor, held: tuple) -> None:
    """Raise ShapeMismatchError when a per-sample input of `call` (a `ModelCall`; x: the
    differentiated input `(B, *in_shape)`, held: the held ones `(B, ...)`) has a shape the
    model does not take, or when the model fails on them for another reason."""
    layout = call.layout
    if x.shape[0] == 1:  # a program exported with a dynamic batch may not take one sample
        x, held = x.expand(2, *x.shape[1:]), tuple(h.expand(2, *h.shape[1:]) for h in held)
    values = {layout.wrt: x, **dict(zip(layout.held, held, strict=True))}
    declared = _declared_shapes(loaded)
    for name, value in values.items():
        expected = declared.get(name)
        if expected is not None and not _fits(tuple(value.shape[1:]), expected):
            raise ShapeMismatchError(_message(call, name, value, _shown(expected),
                                              "the program"))
    try:
        with torch.no_grad():
            call_model(model, layout, x, held)
        return
    except Exception as exc:  # a forward fails in many ways (shapes, dtypes, guards)
        if is_out_of_memory(exc):
            raise
        error = exc
    culprit = _failing_layer(model, layout, x, held, values)
    if culprit is not None:
        name, layer, expected = culprit
        raise ShapeMismatchError(_message(call, name, values[name], expected,
                                          f"its layer {layer}")) from error
    why = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    raise ShapeMismatchError(
        f"the model fails when called with DATA and the --input/--const values ({why}); "
        "check each file's dtype and per-sample shape against the forward's arguments"
    ) from error


def _message(call, name: str, value: torch.Tensor, expected: str, who: str) -> str:
    inputs = call.record["inputs"]  # DATA's argument first, then the --input ones
    option = "DATA" if name == next(iter(inputs)) else f"--input {name}"
    return (f"{option}: {inputs.get(name, {}).get('path', '?')} has samples of shape "
            f"{tuple(value.shape[1:])} for the forward's argument {name}, but {who} expects "
            f"{expected} per sample; give a file of that shape")


def _declared_shapes(loaded) -> dict[str, tuple]:
    """`{argument: per-sample shape}` a `.pt2` program declares (None for a dynamic axis)."""
    program = getattr(loaded, "program", None)
    if program is None:
        return {}
    user = set(program.graph_signature.user_inputs)
    shapes = {}
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and node.name in user and hasattr(value, "shape") \
                and len(value.shape) >= 1:
            shapes[node.name] = tuple(d if isinstance(d, int) else None
                                      for d in value.shape[1:])
    return shapes


def _fits(shape: tuple[int, ...], expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or e == s
                                               for s, e in zip(shape, expected, strict=True))


def _shown(expected: tuple) -> str:
    return "(" + ", ".join("*" if d is None else str(d) for d in expected) + \
        ("," if len(expected) == 1 else "") + ")"


def _failing_layer(model: nn.Module, layout, x, held, values: dict
                   ) -> tuple[str, str, str] | None:
    """`(argument, layer, expected shape)` when the model fails in a leaf module whose input
    is one of the call's tensors itself and whose type says what shape it takes."""
    if isinstance(model, torch.jit.ScriptModule):
        return None  # no hooks on TorchScript
    entered: list[tuple[str, nn.Module, tuple]] = []  # leaf modules running now, innermost last

    def leave(module, args, output) -> None:  # returns None: the output is kept
        entered.pop()

    handles = []
    for name, module in model.named_modules():
        if not any(True for _ in module.children()):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: entered.append((name, m, args))))
            handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad():
            call_model(model, layout, x, held)
        return None
    except Exception:  # the failure being diagnosed
        if not entered:
            return None
        layer, module, args = entered[-1]
    finally:
        for handle in handles:
            handle.remove()
    first = args[0] if args else None
    argument = next((n for n, v in values.items() if v is first), None)
    expected = _expected(module, first) if argument is not None else None
    if expected is None or expected == str(tuple(first.shape[1:])):
        return None  # the shape is not what fails (a dtype, say)
    return argument, f"{layer} ({type(module).__name__})", expected


def _expected(module: nn.Module, value: torch.Tensor) -> str | None:
    """The per-sample shape `module` takes where its type says, from `value` `(B, ...)`."""
    shape = list(value.shape[1:])
    if isinstance(module, nn.Linear) and shape:
        return str(tuple(shape[:-1] + [module.in_features]))
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
                           nn.GroupNorm)) and shape:
        channels = getattr(module, "in_channels", None) or getattr(
            module, "num_features", None) or module.num_channels
        return str(tuple([channels] + shape[1:]))
    if isinstance(module, nn.LayerNorm):
        kept = shape[:len(shape) - len(module.normalized_shape)]
        return str(tuple(kept + list(module.normalized_shape)))
    return None
