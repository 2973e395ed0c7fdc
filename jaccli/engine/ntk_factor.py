"""The one type of an NTK factor: what a parameter's block of Θ is contracted from.

It lives here, below both of its producers — the operator graph (`jaccli.graph.ntk`) and
module hooks (`jaccli.params.ntk_hooks`) — since the graph layer may not import
`jaccli.params`; `jaccli.params.ntk` (the algebra that consumes it) re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRAM, JACOBIAN = "gram", "jacobian"


@dataclass
class Factor:
    """One parameter's factors for a batch of N samples, C outputs, P parameter entries.

    kind `jacobian`: `jacobian (N, C, P)`, the per-sample Jacobian of the outputs.
    kind `gram` (a linear weight read at T positions): `inputs a (N, T, i)` and output
    cotangents `G (N, C, T, o)`, with J = Σ_t G_t ⊗ a_t never formed.
    layer: the module owning the parameter (`(model)` at the top level)."""

    kind: str
    jacobian: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    cotangents: torch.Tensor | None = None
    layer: str = ""


def layer_of(qualified: str) -> str:
    """The module owning a parameter: `features.0.weight` -> `features.0` (`(model)` at top)."""
    return qualified.rpartition(".")[0] or "(model)"
