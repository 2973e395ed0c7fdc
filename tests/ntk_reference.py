"""The independent float64 reference for the empirical NTK: torch.func Jacobians of all
parameters (jacrev of functional_call, one sample at a time), flattened and contracted."""

import torch
from torch.func import functional_call, jacrev


def reference_jacobians(model, x):
    """{param name: (N, C, P_name)} by jacrev over all parameters, one sample at a time."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    # One sample at a time: vmap over PReLU's backward mixes up batch and basis in torch 2.x.
    rows = [jacrev(f)(params, xi) for xi in x]
    return {k: torch.stack([r[k] for r in rows]).reshape(len(x), rows[0][k].shape[0], -1)
            for k in params}


def reference_ntk(model, x1, x2=None):
    """Θ(x1, x2) `(N, M, C, C)` = Σ_P J_P(x1) J_P(x2)ᵀ."""
    j1 = torch.cat(list(reference_jacobians(model, x1).values()), 2)
    j2 = j1 if x2 is None else torch.cat(list(reference_jacobians(model, x2).values()), 2)
    return torch.einsum("ncp,mdp->nmcd", j1, j2)


def reference_layer_ntk(model, x1, x2=None):
    """{module owning parameters: Θ_l(x1, x2)}, the parameters grouped by owning module."""
    j1 = reference_jacobians(model, x1)
    j2 = j1 if x2 is None else reference_jacobians(model, x2)
    parts = {}
    for name in j1:
        layer = name.rpartition(".")[0] or "(model)"
        block = torch.einsum("ncp,mdp->nmcd", j1[name], j2[name])
        parts[layer] = parts[layer] + block if layer in parts else block
    return parts


class AllOutputs(torch.nn.Module):
    """The reference's view of a model of several outputs (heads): them all, flattened and
    concatenated in order, `(N, C_1 + C_2 + ...)`, as jaccli's default model output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.cat([head.flatten(1) for head in self.model(x)], dim=1)
