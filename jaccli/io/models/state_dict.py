"""Strict state_dict loading with a message a user can act on."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ...errors import ModelLoadError

_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
_LISTED = 5


def extract_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside `obj`: a state_dict, or a checkpoint dict holding one."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _CHECKPOINT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(
                    isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        keys = ", ".join(map(str, list(obj)[:10]))
        raise ModelLoadError(f"{source} holds a dict that is not a state_dict (keys: {keys}); "
                             f"expected name -> tensor, or a checkpoint with one of "
                             f"{list(_CHECKPOINT_KEYS)}")
    raise ModelLoadError(f"{source} holds a {type(obj).__name__}, not a state_dict")


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `model`; any missing, unexpected or mis-shaped key is an error."""
    model.load_state_dict(match_state(model, state, source), strict=True)


def match_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str
                ) -> Mapping[str, torch.Tensor]:
    """Check `state` against `model`'s state_dict (keys, shapes, no complex into real);
    return it with a DataParallel `module.` prefix removed. `model` may be on the meta
    device."""
    expected = model.state_dict()
    if not set(state) & set(expected) and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mismatched)):
        if items:
            shown = "; ".join(items[:_LISTED])
            more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
            problems.append(f"{len(items)} {label} ({shown}{more})")
    if problems:
        raise ModelLoadError(f"weights in {source} do not match the architecture: "
                             + ", ".join(problems))
    complex_keys = [k for k in expected if state[k].is_complex()
                    and not expected[k].is_complex()]
    if complex_keys:
        raise ModelLoadError(f"weights in {source} are complex ({complex_keys[0]}) but the "
                             "model's are real; loading would drop the imaginary part")
    return state
