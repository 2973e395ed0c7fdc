"""How structured Jacobians meet the results codec (`jaccli.io.results.encodings`): the
encoding and tensors a structure is written as, and the structure read back from them."""

from __future__ import annotations

import torch

from ..engine.structures import Diagonal, Matrix, RowScaled, Selection, Structured
from .convolution import GEOMETRY, from_attrs
from .structures import Gather, Identity, Kronecker, Operator


def storable(jac: Structured, n: int, *, per_sample: bool = False
             ) -> tuple[str, dict[str, torch.Tensor]]:
    """(encoding name, tensors) for `jac` over a batch of `n` samples: the compact form where
    the codec has one, else the matrix (formed once when shared, per sample otherwise).

    per_sample: the Jacobian is planned per sample, so a batch of one sample (whose factors
    look shared: batch 1) is still stored per sample, in the encoding of the other batches.
    """
    if per_sample and n == 1 and isinstance(jac, Gather) and jac.shared:
        return "gather", {"gather_index": jac.index.expand(1, jac.d_out),
                          "gather_weight": jac.weight.expand(1, jac.d_out)}
    if per_sample and n == 1 and isinstance(jac, Kronecker) and jac.shared:
        return "dense", {"jacobian": jac.dense(1)}
    if isinstance(jac, Identity):
        return "shared-diagonal", {"diagonal": torch.ones(jac.size, dtype=jac.dtype,
                                                          device=jac.device)}
    if isinstance(jac, Gather):
        rows = 1 if jac.shared else n
        index = jac.index.expand(rows, jac.d_out)
        weight = jac.weight.expand(rows, jac.d_out)
        if jac.shared:
            return "shared-gather", {"gather_index": index[0], "gather_weight": weight[0]}
        return "gather", {"gather_index": index, "gather_weight": weight}
    if isinstance(jac, (Operator, Kronecker)) or (isinstance(jac, Matrix) and jac.shared):
        if jac.shared:
            return "shared", {"matrix": jac.dense()[0]}
        return "dense", {"jacobian": jac.dense(n)}
    return jac.tag, jac.compact()


def from_compact(tag: str, arrays: dict[str, torch.Tensor], d_in: int,
                 dtype: torch.dtype = torch.float32) -> Structured:
    """The structure stored under encoding `tag`, from its tensors (per-sample ones with N
    rows, shared ones whole). d_in, dtype: the input size and value type (a selection stores
    neither)."""
    if tag == "dense":
        return Matrix(arrays["jacobian"])
    if tag == "shared":
        return Matrix(arrays["matrix"][None], shared=True)
    if tag == "shared-diagonal":
        return Diagonal(arrays["diagonal"][None], shared=True)
    if tag == "diagonal":
        return Diagonal(arrays["diagonal"])
    if tag == "row-scaled":
        return RowScaled(arrays["row_scale"], arrays["matrix"][None])
    if tag == "selection":
        return Selection(arrays["selection"].long(), d_in, dtype)
    if tag in ("gather", "shared-gather"):
        index, weight = arrays["gather_index"].long(), arrays["gather_weight"]
        if tag == "shared-gather":
            index, weight = index[None], weight[None]
        return Gather(index, weight, d_in)
    if tag == "convolution":  # the geometry arrives as small tensors beside the kernel
        geometry = {name: torch.as_tensor(arrays[name]).reshape(-1).tolist()
                    for name in GEOMETRY}
        geometry["groups"], geometry["transposed"] = (geometry["groups"][0],
                                                      geometry["transposed"][0])
        return from_attrs(arrays["kernel"].to(dtype), geometry).operator(dtype)
    raise ValueError(f"no structure is stored as {tag!r}")
