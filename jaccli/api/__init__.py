"""The Python API (in-memory models, no files): `jacobians` for the input side (Jacobians,
products, Hessian-vector products), `params` for the parameter side (per-sample parameter
Jacobians, the NTK)."""

from .jacobians import (
    END_TO_END,
    _engine,  # noqa: F401  (tests reach the engine the API builds)
    end_to_end_jacobian,
    hvp,
    jacobian,
    jvp,
    layer_jacobians,
    list_layers,
    vjp,
)
from .params import ntk, ntk_kernel, param_jacobians

__all__ = ["END_TO_END", "end_to_end_jacobian", "hvp", "jacobian", "jvp",
           "layer_jacobians", "list_layers", "ntk", "ntk_kernel", "param_jacobians", "vjp"]
