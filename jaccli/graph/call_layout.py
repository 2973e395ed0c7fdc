"""How a model whose forward takes several arguments is called: which argument is
differentiated, which per-sample tensors are held fixed, which constants are passed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class CallLayout:
    """A call of the model's forward.

    names: the forward's arguments in order; wrt: the one differentiated (the tensor `x`);
    held: the per-sample tensors held fixed, in the order the engines take them; constants:
    name -> value (a number, a bool or a tensor without batch axis); defaults: name ->
    default, for arguments given by nothing else. `arguments` is what torch.export traces:
    the tensors become the program's inputs (batch axis 0 dynamic), the constants are baked in.
    """

    names: tuple[str, ...]
    wrt: str
    held: tuple[str, ...] = ()
    constants: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)

    def batched(self) -> set[str]:
        """The arguments with a batch axis: the differentiated one and the held ones."""
        return {self.wrt, *self.held}

    def passed(self) -> tuple[str, ...]:
        """The arguments one call passes, in order: all of them, defaults spelled out (the
        TorchScript converter needs every one)."""
        return self.names

    def arguments(self, x, held: tuple) -> list:
        """The positional arguments of one call, with `x` and `held` in place."""
        values = {self.wrt: x, **dict(zip(self.held, held, strict=True)), **self.constants}
        return [values[name] if name in values else self.defaults[name]
                for name in self.passed()]


def call(model, layout: CallLayout | None, x: torch.Tensor, held: tuple = ()):
    """`model(x)`, or with several arguments `model(*layout.arguments(x, held))`."""
    return model(x) if layout is None else model(*layout.arguments(x, held))
