"""What the engines know about an objective without calling it: the built-in objectives
(`jaccli.params.objectives`) are marked "outputs" (the model's outputs, flattened: their
Jacobian is the identity) or "rows" (sample i's values computed from sample i alone: batch
autograd gives every sample's gradient at once). The marks are kept by the function's
identity, so a wrapper (`functools.wraps` copies attributes) or any other callable is
unmarked and gets the general per-sample `torch.func` treatment."""

from __future__ import annotations

import weakref
from collections.abc import Callable

KINDS = ("outputs", "rows")
_MARKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def mark(fn: Callable, kind: str) -> Callable:
    """Record `fn` as an objective of `kind` (one of KINDS); returns `fn`."""
    if kind not in KINDS:
        raise ValueError(f"objective kind must be one of {KINDS}, not {kind!r}")
    _MARKS[fn] = kind
    return fn


def kind_of(fn: Callable | None) -> str | None:
    """The mark of `fn` ("outputs" for None, the default objective), or None."""
    if fn is None:
        return "outputs"
    try:
        return _MARKS.get(fn)
    except TypeError:  # unhashable or not weakly referenceable: not one of ours
        return None
