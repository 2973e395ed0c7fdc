"""The derivative registry: one small rule per layer type, looked up by the module's exact class.

A rule holds every derivative jaccli takes of that layer type: w.r.t. its input (structured
Jacobian, JVP, VJP) and, where it has a closed form, w.r.t. its parameters.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import jvp, vjp

from ..structures import Structured


class Rule:
    """How to differentiate one layer type.

    structure: the tag of the Jacobians `jacobian` returns (see `structures.STRUCTURES`).
    shared: True when the Jacobian is the same for every sample, so it is computed once per run.
    All tensors have the sample axis first: x `(N, *in_shape)`, v `(N, *in_shape)`,
    u `(N, *out_shape)`.
    """

    structure = "dense"
    shared = False
    # A shared matrix that is cheaper to apply through jvp/vjp than to form (convolutions).
    matrix_free = False

    def applies(self, module: nn.Module) -> bool:
        """Whether this rule is exact for this module's configuration (e.g. eval mode)."""
        return True

    def jacobian(self, module: nn.Module, x: torch.Tensor) -> Structured:
        raise NotImplementedError

    def jvp(self, module: nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`J v` per sample, without forming J."""
        return jvp(module, (x.clone(),), (v,))[1]

    def vjp(self, module: nn.Module, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """`uᵀ J` per sample, without forming J."""
        _, pullback = vjp(module, x.clone())
        return pullback(u)[0]

    def has_param_jacobian(self, module: nn.Module, attribute: str) -> bool:
        """Whether `param_jacobian` is exact for the parameter `module.<attribute>`."""
        return False

    def param_jacobian(self, module: nn.Module, attribute: str, x: torch.Tensor,
                       g: torch.Tensor) -> torch.Tensor:
        """Per-sample Jacobians w.r.t. `module.<attribute>` from one backward pass.

        x: the layer input `(N, *in_shape)`; g: cotangents of the layer output for each of C
        outputs of the objective, `(C, N, *out_shape)`. Returns `(N, C, *param_shape)`.
        """
        raise NotImplementedError


_RULES: dict[type, Rule] = {}


def register(*classes: type) -> callable:
    """Class decorator: register one rule instance for each exact module class."""

    def decorate(rule_class: type[Rule]) -> type[Rule]:
        rule = rule_class()
        for cls in classes:
            if cls in _RULES:
                raise ValueError(f"a rule for {cls.__name__} is already registered "
                                 f"({type(_RULES[cls]).__name__})")
            _RULES[cls] = rule
        return rule_class

    return decorate


def rule_for(module: nn.Module) -> Rule | None:
    """The rule registered for `type(module)` that applies to it, or None (generic path)."""
    rule = _RULES.get(type(module))
    return rule if rule is not None and rule.applies(module) else None


def registered_classes() -> list[type]:
    return sorted(_RULES, key=lambda c: c.__name__)
