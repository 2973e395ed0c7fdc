"""Products and sums of every structured Jacobian, and the structure tags they predict.

`compose(a, b)` is `a @ b` (apply b, then a) in the cheapest exact form; `compose_tag` predicts
its tag from the operands' tags alone (the plan needs it before anything runs), and
`compose_cost` extends the matrix-chain cost model of `jaccli.engine.chain` to the new tags.
"""

from __future__ import annotations

import torch

from ..engine import chain
from ..engine import structures as base
from ..engine.structures import Diagonal, Matrix, RowScaled, Selection, Structured
from .structures import Gather, Identity, Kronecker, Operator

SHARED_TAGS = frozenset({"identity", "shared", "shared-diagonal", "shared-gather",
                         "shared-kronecker", "shared-operator"})
_DIAGONAL = frozenset({"diagonal", "shared-diagonal"})
_GATHER = _DIAGONAL | {"selection", "gather", "shared-gather"}
_KRONECKER = frozenset({"kronecker", "shared-kronecker"})
_OLD = frozenset(base.STRUCTURES)


def is_shared(j: Structured) -> bool:
    return bool(getattr(j, "shared", False))


def as_gather(j: Structured) -> Gather | None:
    """Diagonal, Selection and Gather as one `Gather`; None for other structures."""
    if isinstance(j, Gather):
        return j
    if isinstance(j, Diagonal):
        index = torch.arange(j.d_in, device=j.diag.device)[None]
        return Gather(index, j.diag, j.d_in)
    if isinstance(j, Selection):
        return Gather(j.index, torch.ones(1, 1, dtype=j.dtype, device=j.index.device)
                      .expand(1, j.d_out), j.n_in)
    return None


def _gather_product(a: Gather, b: Gather) -> Gather:
    n = max(a.batch, b.batch)
    a_index = a.index.expand(n, -1) if a.index.shape[0] != n else a.index
    b_index = b.index.expand(n, -1) if b.index.shape[0] != n else b.index
    b_weight = b.weight.expand(n, -1) if b.weight.shape[0] != n else b.weight
    index = torch.gather(b_index, 1, a_index)
    weight = a.weight * torch.gather(b_weight, 1, a_index)
    if a.batch == 1 and b.batch == 1:
        index, weight = index[:1], weight[:1]
    return Gather(index, weight, b.n_in)


def _regrouped(k: Kronecker) -> Kronecker:
    """`I_T ⊗ R` with G groups is the same map as T·G groups of `1 ⊗ R`."""
    if k.left is not None or k.left_size == 1:
        return k
    right = k.right
    if right is not None and right.shape[1] != 1:
        right = right.repeat_interleave(k.left_size, dim=1)
    return Kronecker(None, right, k.groups * k.left_size, 1, k.right_size)


def _factor_product(x, y, x_size, y_size):
    """The product of two Kronecker factors (None: identity); None when shapes disagree."""
    if x is None and y is None:
        return (None, x_size) if x_size == y_size else False
    if x is None:
        return (y, 0) if x_size == y.shape[-2] else False
    if y is None:
        return (x, 0) if x.shape[-1] == y_size else False
    return (x @ y, 0) if x.shape[-1] == y.shape[-2] else False


def _kronecker_product(a: Kronecker, b: Kronecker) -> Kronecker | None:
    if a.groups != b.groups:
        a, b = _regrouped(a), _regrouped(b)
    if a.groups != b.groups:
        return None
    left = _factor_product(a.left, b.left, a.left_size, b.left_size)
    right = _factor_product(a.right, b.right, a.right_size, b.right_size)
    if left is False or right is False:
        return None
    return Kronecker(left[0], right[0], a.groups, left[1] or 1, right[1] or 1)


class _ComposedOperator(Operator):
    def __init__(self, a: Structured, b: Structured):
        def forward(rows):
            return a.right_apply(b.right_apply(rows.T[None]))[0].T

        def transpose(rows):
            return b.left_apply(a.left_apply(rows[None]))[0]

        dtype = getattr(a, "dtype", None) or getattr(b, "dtype", torch.float64)
        super().__init__(forward, transpose, a.d_out, b.d_in, dtype,
                         row_norms2=_scaled_row_norms2(a, b))


def _scaled_row_norms2(a: Structured, b: Structured):
    """Row norms² of `a @ b` when `a` is a shared diagonal (an eval BatchNorm's scale) and
    `b` knows its own (a convolution): row o of diag(s) B is s_o times row o of B."""
    rows = getattr(b, "row_norms2", None)
    if rows is None or not isinstance(a, Diagonal) or not a.shared:
        return None
    scale = a.diag[0].detach().to(torch.float64)
    return lambda: scale.square() * rows()


def compose(a: Structured, b: Structured) -> Structured:
    """`a @ b` per sample for any two structures; mirrors `compose_tag`."""
    if a.d_in != b.d_out:
        raise ValueError(f"cannot compose Jacobians: {a.d_out}x{a.d_in} after {b.d_out}x{b.d_in}")
    if isinstance(a, Identity):
        return b
    if isinstance(b, Identity):
        return a
    ga, gb = as_gather(a), as_gather(b)
    if ga is not None and gb is not None:
        same = (isinstance(a, Diagonal) and isinstance(b, Diagonal)
                or isinstance(a, Selection) and isinstance(b, Selection))
        return base.compose(a, b) if same else _gather_product(ga, gb)
    if a.tag in _OLD and b.tag in _OLD:
        return base.compose(a, b)
    shared = is_shared(a) and is_shared(b)
    if isinstance(a, Kronecker) and isinstance(b, Kronecker):
        product = _kronecker_product(a, b)
        if product is not None:
            return product
    if shared and (isinstance(a, Operator) or isinstance(b, Operator)):
        return _ComposedOperator(a, b)
    if isinstance(a, Diagonal) and not a.shared and b.tag in ("shared-kronecker",
                                                              "shared-operator"):
        return RowScaled(a.diag, b.dense())
    if shared:
        return Matrix(a.right_apply(b.dense()), shared=True)
    if isinstance(b, Matrix):
        return Matrix(a.right_apply(b.matrix))
    if isinstance(a, Matrix):
        return Matrix(b.left_apply(a.matrix))
    # Neither is a matrix: form the smaller one and apply the other to it (a thin shared map
    # after a per-sample diagonal forms `(1, m, k)`, not the diagonal's `(N, k, k)`).
    if a.batch * a.d_out <= b.batch * b.d_in:
        return Matrix(b.left_apply(a.dense()))
    return Matrix(a.right_apply(b.dense()))


def compose_tag(a: str, b: str) -> str:
    """The tag of `compose(A, B)` from the tags of A and B."""
    if a == "identity":
        return b
    if b == "identity":
        return a
    shared = a in SHARED_TAGS and b in SHARED_TAGS
    if a in _GATHER and b in _GATHER:
        if a in _DIAGONAL and b in _DIAGONAL or a == b == "selection":
            return chain.compose_tag(a, b)
        return "shared-gather" if shared else "gather"
    if a in _OLD and b in _OLD:
        return chain.compose_tag(a, b)
    if a in _KRONECKER and b in _KRONECKER:
        return "shared-kronecker" if shared else "kronecker"
    if shared and "shared-operator" in (a, b):
        return "shared-operator"
    if a == "diagonal" and b in ("shared-kronecker", "shared-operator"):
        return "row-scaled"
    return "shared" if shared else "dense"


_COST_TAG = {"identity": "shared-diagonal", "shared-gather": "shared-diagonal",
             "gather": "selection", "shared-kronecker": "shared", "shared-operator": "shared",
             "kronecker": "dense"}


def compose_cost(a: str, b: str, m: int, k: int, n: int, samples: int) -> float:
    """Multiply-adds of `A @ B`, A `(m x k)`, B `(k x n)`; the identity is free."""
    if "identity" in (a, b):
        return 0.0
    cost = chain.compose_cost(_COST_TAG.get(a, a), _COST_TAG.get(b, b), m, k, n, samples)
    if a == "diagonal" and b == "shared-operator":  # forms the operator's (k x n) matrix
        cost += k * n
    return cost


def add(a: Structured, b: Structured) -> Structured:
    """`a + b` per sample (branches that meet again); mirrors `add_tag`."""
    if (a.d_out, a.d_in) != (b.d_out, b.d_in):
        raise ValueError(f"cannot add Jacobians {a.d_out}x{a.d_in} and {b.d_out}x{b.d_in}")
    da, db = _as_diagonal(a), _as_diagonal(b)
    if da is not None and db is not None:
        return Diagonal(da.diag + db.diag, is_shared(a) and is_shared(b))
    shared = is_shared(a) and is_shared(b)
    n = max(a.batch, b.batch)
    left = a.dense(None if shared else n)
    right = b.dense(None if shared else n)
    return Matrix(left + right, shared=shared)


def _as_diagonal(j: Structured) -> Diagonal | None:
    if isinstance(j, Diagonal):
        return j
    if isinstance(j, Identity):
        return Diagonal(torch.ones(1, j.size, dtype=j.dtype, device=j.device), shared=True)
    return None


def add_tag(a: str, b: str) -> str:
    """The tag of `add(A, B)`."""
    diagonal = _DIAGONAL | {"identity"}
    shared = a in SHARED_TAGS and b in SHARED_TAGS
    if a in diagonal and b in diagonal:
        return "shared-diagonal" if shared else "diagonal"
    return "shared" if shared else "dense"
