"""Structured per-sample Jacobians: exact compact forms that are multiplied without densifying.

Every structure stands for a batch of matrices `J_i`, i < N, each `(D_out, D_in)`. A shared one
(`shared=True`, batch axis of size 1) is the same for every sample: stored and multiplied once.

    Diagonal(d)        J_i = diag(d_i)        d: (1|N, D)              activations, BatchNorm
    Matrix(m)          J_i = m_i              m: (1|N, D_out, D_in)    Linear, conv, generic
    RowScaled(s, m)    J_i = diag(s_i) m      s: (N, D_out), m: (1, D_out, D_in)   tanh(Wx + b)
    Selection(idx, n)  J_i[o, idx_i[o]] = 1   idx: (N, D_out)          max pooling

`compose(A, B)` is the product `A @ B` (A applied after B) in the cheapest exact form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRUCTURES = ("shared", "shared-diagonal", "diagonal", "row-scaled", "selection", "dense")


class Structured:
    """Base class. Subclasses define shapes, `dense`, `frobenius`, and the two products."""

    d_out: int
    d_in: int

    @property
    def batch(self) -> int:
        """1 when shared by all samples, else N."""
        raise NotImplementedError

    @property
    def tag(self) -> str:
        raise NotImplementedError

    def dense(self, n: int | None = None) -> torch.Tensor:
        """The matrices, `(N, D_out, D_in)` (expanded to `n` samples when shared)."""
        raise NotImplementedError

    def frobenius(self, n: int) -> torch.Tensor:
        """‖J_i‖_F for each sample: `(n,)`."""
        raise NotImplementedError

    def left_apply(self, m: torch.Tensor) -> torch.Tensor:
        """`m @ J`: m `(1|N, k, D_out)` -> `(·, k, D_in)`."""
        raise NotImplementedError

    def right_apply(self, m: torch.Tensor) -> torch.Tensor:
        """`J @ m`: m `(1|N, D_in, k)` -> `(·, D_out, k)`."""
        raise NotImplementedError

    def compact(self) -> dict[str, torch.Tensor]:
        """The tensors that define this Jacobian exactly (for storage; see docs/FORMAT.md)."""
        raise NotImplementedError



def batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` for `(1|N, m, k) @ (1|N, k, n)`; a shared factor becomes one large GEMM.

    Broadcasting a batch of 1 makes torch run N small matmuls; folding the samples into
    the other factor's rows (or columns) runs one matmul at full speed instead.
    """
    if a.shape[0] == b.shape[0]:
        return torch.matmul(a, b)
    if b.shape[0] == 1:  # (N, m, k) @ (k, n): stack the samples' rows
        n, m, k = a.shape
        return (a.reshape(n * m, k) @ b[0]).reshape(n, m, b.shape[2])
    n, k, cols = b.shape  # (m, k) @ (N, k, n): stack the samples' columns
    stacked = b.transpose(0, 1).reshape(k, n * cols)
    return (a[0] @ stacked).reshape(a.shape[1], n, cols).transpose(0, 1)


def _expand(t: torch.Tensor, n: int | None) -> torch.Tensor:
    return t if n is None or t.shape[0] == n else t.expand(n, *t.shape[1:])


@dataclass
class Diagonal(Structured):
    diag: torch.Tensor  # (1|N, D)
    shared: bool = False

    @property
    def d_out(self) -> int:
        return self.diag.shape[1]

    d_in = d_out

    @property
    def batch(self) -> int:
        return self.diag.shape[0]

    @property
    def tag(self) -> str:
        return "shared-diagonal" if self.shared else "diagonal"

    def dense(self, n=None):
        return torch.diag_embed(_expand(self.diag, n))

    def frobenius(self, n):
        return _expand(torch.linalg.vector_norm(self.diag, dim=1), n)

    def left_apply(self, m):
        return m * self.diag[:, None, :]

    def right_apply(self, m):
        return self.diag[:, :, None] * m

    def compact(self):
        return {"diagonal": self.diag[0] if self.shared else self.diag}



@dataclass
class Matrix(Structured):
    matrix: torch.Tensor  # (1|N, D_out, D_in)
    shared: bool = False

    @property
    def d_out(self) -> int:
        return self.matrix.shape[1]

    @property
    def d_in(self) -> int:
        return self.matrix.shape[2]

    @property
    def batch(self) -> int:
        return self.matrix.shape[0]

    @property
    def tag(self) -> str:
        return "shared" if self.shared else "dense"

    def dense(self, n=None):
        return _expand(self.matrix, n)

    def frobenius(self, n):
        return _expand(torch.linalg.matrix_norm(self.matrix), n)

    def left_apply(self, m):
        return batched_matmul(m, self.matrix)

    def right_apply(self, m):
        return batched_matmul(self.matrix, m)

    def compact(self):
        return {"matrix": self.matrix[0]} if self.shared else {"jacobian": self.matrix}



@dataclass
class RowScaled(Structured):
    scale: torch.Tensor  # (N, D_out)
    matrix: torch.Tensor  # (1, D_out, D_in)

    @property
    def d_out(self) -> int:
        return self.matrix.shape[1]

    @property
    def d_in(self) -> int:
        return self.matrix.shape[2]

    @property
    def batch(self) -> int:
        return self.scale.shape[0]

    tag = "row-scaled"

    def dense(self, n=None):
        return _expand(self.scale[:, :, None] * self.matrix, n)

    def frobenius(self, n):
        row_norms2 = self.matrix[0].square().sum(dim=1)  # (D_out,)
        return _expand((self.scale.square() @ row_norms2).sqrt(), n)

    def left_apply(self, m):
        return batched_matmul(m * self.scale[:, None, :], self.matrix)

    def right_apply(self, m):
        return self.scale[:, :, None] * batched_matmul(self.matrix, m)

    def compact(self):
        return {"row_scale": self.scale, "matrix": self.matrix[0]}



@dataclass
class Selection(Structured):
    index: torch.Tensor  # (N, D_out) int64: the input entry each output copies
    n_in: int
    dtype: torch.dtype = torch.float32

    @property
    def d_out(self) -> int:
        return self.index.shape[1]

    @property
    def d_in(self) -> int:
        return self.n_in

    @property
    def batch(self) -> int:
        return self.index.shape[0]

    tag = "selection"

    def dense(self, n=None):
        out = torch.zeros(self.batch, self.d_out, self.n_in, dtype=self.dtype,
                          device=self.index.device)
        out.scatter_(2, self.index[:, :, None], 1.0)
        return _expand(out, n)

    def frobenius(self, n):
        value = torch.full((self.batch,), float(self.d_out) ** 0.5, dtype=self.dtype,
                           device=self.index.device)
        return _expand(value, n)

    def left_apply(self, m):
        # (m @ J)[:, :, j] = sum of m[:, :, o] over the outputs o that copy input j.
        n = max(m.shape[0], self.batch)
        m = _expand(m, n)
        out = torch.zeros(n, m.shape[1], self.n_in, dtype=m.dtype, device=m.device)
        index = _expand(self.index, n)[:, None, :].expand(n, m.shape[1], self.d_out)
        return out.scatter_add_(2, index, m)

    def right_apply(self, m):
        n = max(m.shape[0], self.batch)
        m = _expand(m, n)
        index = _expand(self.index, n)[:, :, None].expand(n, self.d_out, m.shape[2])
        return torch.gather(m, 1, index)

    def compact(self):
        return {"selection": self.index}


def compose(a: Structured, b: Structured) -> Structured:
    """The product `a @ b` (apply b, then a) per sample, kept structured where that is exact."""
    if a.d_in != b.d_out:
        raise ValueError(f"cannot compose Jacobians: {a.d_out}x{a.d_in} after {b.d_out}x{b.d_in}")
    shared = _is_shared(a) and _is_shared(b)
    if isinstance(a, Diagonal) and isinstance(b, Diagonal):
        return Diagonal(a.diag * b.diag, shared)
    if isinstance(a, Selection) and isinstance(b, Selection):
        n = max(a.batch, b.batch)
        return Selection(torch.gather(_expand(b.index, n), 1, _expand(a.index, n)), b.n_in,
                         b.dtype)
    if isinstance(a, Diagonal) and isinstance(b, Matrix) and b.shared and not a.shared:
        return RowScaled(a.diag, b.matrix)
    if isinstance(a, Diagonal) and isinstance(b, RowScaled):
        return RowScaled(a.diag * b.scale, b.matrix)
    if isinstance(b, Matrix):
        return Matrix(a.right_apply(b.matrix), shared)
    if isinstance(a, Matrix):
        return Matrix(b.left_apply(a.matrix), shared)
    return Matrix(a.right_apply(b.dense()))


def _is_shared(j: Structured) -> bool:
    return bool(getattr(j, "shared", False))


def chain_product(jacobians: list[Structured], order: list[tuple[int, int, int]] | None = None,
                  *, compose_fn=compose) -> Structured:
    """The product `J_k ... J_1` of Jacobians listed in execution order (J_1 first).

    order: the splits to use, from `cheapest_order`; None multiplies right to left.
    compose_fn: the product of two structures (a richer algebra may pass its own).
    """
    if not jacobians:
        raise ValueError("empty chain")
    if order is None:
        result = jacobians[0]
        for j in jacobians[1:]:
            result = compose_fn(j, result)
        return result
    results: dict[tuple[int, int], Structured] = {(i, i): j for i, j in enumerate(jacobians)}
    for i, k, j in order:  # product of layers i..j split after k: (k+1..j) @ (i..k)
        results[(i, j)] = compose_fn(results[(k + 1, j)], results[(i, k)])
    return results[(0, len(jacobians) - 1)]

