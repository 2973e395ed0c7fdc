"""Structured Jacobians the operator graph adds to `jaccli.engine.structures`.

Each stands for a batch of per-sample matrices `J_i (D_out, D_in)`; `shared` ones (batch 1)
are the same for every sample and are stored and multiplied once.

    Identity(size)              J = I                        reshapes, residual adds, clones
    Gather(index, weight, n)    out_o = w_o · in_{index_o}   broadcasts, padding, SE scales
    Kronecker(left, right, G)   J = blockdiag_g(L_g ⊗ R_g)   Linear over tokens (I ⊗ W),
                                                             attention (A ⊗ I), LayerNorm blocks
    Operator(forward, ...)      a shared linear map known by how it acts (convolutions, pooling)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..engine.structures import Structured


def _expand(t: torch.Tensor, n: int | None) -> torch.Tensor:
    return t if n is None or t.shape[0] == n else t.expand(n, *t.shape[1:])


def _descending(values: torch.Tensor, count: int) -> torch.Tensor:
    return values.sort(dim=1, descending=True).values[:, :count]


@dataclass
class Identity(Structured):
    size: int
    dtype: torch.dtype = torch.float64
    device: torch.device | str = "cpu"

    shared = True
    tag = "identity"
    batch = 1

    @property
    def d_out(self) -> int:
        return self.size

    d_in = d_out

    def dense(self, n=None):
        return _expand(torch.eye(self.size, dtype=self.dtype, device=self.device)[None], n)

    def frobenius(self, n):
        return torch.full((n,), self.size ** 0.5, dtype=self.dtype, device=self.device)

    def left_apply(self, m):
        return m

    def right_apply(self, m):
        return m

    def singular_values(self) -> torch.Tensor:
        return torch.ones(1, self.size, dtype=self.dtype, device=self.device)

    def compact(self):
        return {"identity": torch.tensor(self.size)}


@dataclass
class Gather(Structured):
    """`out_o = weight_o · in_{index_o}`: at most one nonzero per row.

    index: `(1|N, D_out)` int64; weight: `(1|N, D_out)` (zero for rows that copy nothing, such
    as padding); n_in: D_in. Diagonal (index = arange) and Selection (weight = 1) are special
    cases. Columns hold the nonzeros of distinct rows, so JᵀJ is diagonal: the singular values
    are the square roots of the per-column sums of w².
    """

    index: torch.Tensor
    weight: torch.Tensor
    n_in: int

    @property
    def d_out(self) -> int:
        return self.index.shape[1]

    @property
    def d_in(self) -> int:
        return self.n_in

    @property
    def batch(self) -> int:
        return max(self.index.shape[0], self.weight.shape[0])

    @property
    def shared(self) -> bool:
        return self.batch == 1

    @property
    def tag(self) -> str:
        return "shared-gather" if self.shared else "gather"

    def dense(self, n=None):
        b = self.batch
        out = torch.zeros(b, self.d_out, self.n_in, dtype=self.weight.dtype,
                          device=self.weight.device)
        out.scatter_(2, _expand(self.index, b)[:, :, None], _expand(self.weight, b)[:, :, None])
        return _expand(out, n)

    def frobenius(self, n):
        return _expand(self.weight.square().sum(dim=1).sqrt(), n)

    def left_apply(self, m):
        n = max(m.shape[0], self.batch)
        scaled = _expand(m, n) * _expand(self.weight, n)[:, None, :]
        index = _expand(self.index, n)[:, None, :].expand(n, m.shape[1], self.d_out)
        out = torch.zeros(n, m.shape[1], self.n_in, dtype=scaled.dtype, device=m.device)
        return out.scatter_add_(2, index, scaled)

    def right_apply(self, m):
        n = max(m.shape[0], self.batch)
        index = _expand(self.index, n)[:, :, None].expand(n, self.d_out, m.shape[2])
        return torch.gather(_expand(m, n), 1, index) * _expand(self.weight, n)[:, :, None]

    def singular_values(self) -> torch.Tensor:
        """`(1|N, min(D_out, D_in))`, largest first."""
        b = self.batch
        sums = torch.zeros(b, self.n_in, dtype=self.weight.dtype, device=self.weight.device)
        sums.scatter_add_(1, _expand(self.index, b), _expand(self.weight, b).square())
        return _descending(sums.sqrt(), min(self.d_out, self.d_in))

    def compact(self):
        return {"gather_index": self.index, "gather_weight": self.weight}


@dataclass
class Kronecker(Structured):
    """`J = blockdiag_g (L_g ⊗ R_g)`: maps per-sample tensors `(G, T_in, i)` to `(G, T_out, o)`.

    left: `(1|N, 1|G, T_out, T_in)`, or None for the identity of size `left_size`;
    right: `(1|N, 1|G, o, i)`, or None for the identity of size `right_size`.
    A group axis of 1 repeats the same factor for every group. Row-major flattening.
    """

    left: torch.Tensor | None
    right: torch.Tensor | None
    groups: int = 1
    left_size: int = 1
    right_size: int = 1

    def _dims(self) -> tuple[int, int, int, int]:
        t_out, t_in = self.left.shape[-2:] if self.left is not None else (self.left_size,) * 2
        o, i = self.right.shape[-2:] if self.right is not None else (self.right_size,) * 2
        return t_out, t_in, o, i

    @property
    def d_out(self) -> int:
        t_out, _, o, _ = self._dims()
        return self.groups * t_out * o

    @property
    def d_in(self) -> int:
        _, t_in, _, i = self._dims()
        return self.groups * t_in * i

    @property
    def batch(self) -> int:
        return max([1] + [f.shape[0] for f in (self.left, self.right) if f is not None])

    @property
    def shared(self) -> bool:
        return self.batch == 1

    @property
    def tag(self) -> str:
        return "shared-kronecker" if self.shared else "kronecker"

    def right_apply(self, m):
        t_out, t_in, o, i = self._dims()
        n, k = max(m.shape[0], self.batch), m.shape[2]
        x = m.reshape(m.shape[0], self.groups, t_in, i, k)
        if self.right is not None:
            x = self.right[:, :, None] @ x  # (n, G, T_in, o, k)
        if self.left is not None:
            x = (self.left @ x.reshape(x.shape[0], self.groups, t_in, o * k))
        return x.reshape(-1, self.d_out, k).expand(n, self.d_out, k)

    def left_apply(self, m):
        t_out, t_in, o, i = self._dims()
        n, k = max(m.shape[0], self.batch), m.shape[1]
        y = m.reshape(m.shape[0], k, self.groups, t_out, o).transpose(1, 2)  # (·, G, k, T, o)
        if self.right is not None:
            y = y @ self.right[:, :, None]  # (·, G, k, T_out, i)
        if self.left is not None:
            y = self.left.transpose(-1, -2)[:, :, None] @ y  # (·, G, k, T_in, i)
        return y.transpose(1, 2).reshape(-1, k, self.d_in).expand(n, k, self.d_in)

    def dense(self, n=None):
        leading = self.left if self.left is not None else self.right
        eye = torch.eye(self.d_in, dtype=leading.dtype, device=leading.device)[None]
        return _expand(self.right_apply(eye), n)

    def _factor_norms2(self, factor: torch.Tensor | None, size: int) -> torch.Tensor:
        if factor is None:
            return torch.full((1, 1), float(size))
        return factor.square().sum(dim=(-2, -1))  # (1|N, 1|G)

    def frobenius(self, n):
        total = (self._factor_norms2(self.left, self.left_size).to(self._dtype())
                 * self._factor_norms2(self.right, self.right_size).to(self._dtype()))
        scale = self.groups if total.shape[1] == 1 else 1
        return _expand((total.sum(dim=1) * scale).sqrt(), n)

    def _dtype(self) -> torch.dtype:
        return (self.left if self.left is not None else self.right).dtype

    def singular_values(self) -> torch.Tensor:
        """`(1|N, min(D_out, D_in))`: the products σ(L_g) σ(R_g), largest first."""
        def factor_values(factor, size):
            if factor is None:
                return torch.ones(1, 1, size, dtype=self._dtype())
            return torch.linalg.svdvals(factor)  # (1|N, 1|G, r)

        left = factor_values(self.left, self.left_size)
        right = factor_values(self.right, self.right_size)
        prod = (left[..., :, None] * right[..., None, :]).flatten(-2)  # (·, 1|G, r_l r_r)
        if prod.shape[1] == 1:
            prod = prod.expand(prod.shape[0], self.groups, prod.shape[2])
        return _descending(prod.flatten(1), min(self.d_out, self.d_in))

    def compact(self):
        out = {"kronecker_groups": torch.tensor(self.groups)}
        out["kronecker_left"] = self.left if self.left is not None else torch.tensor(
            self.left_size)
        out["kronecker_right"] = self.right if self.right is not None else torch.tensor(
            self.right_size)
        return out


# Values of the operator's output formed at once while forming its matrix (`Operator.dense`).
FORM_CHUNK = 2**19


class Operator(Structured):
    """A shared linear map known only by how it acts, never formed unless asked (`dense`).

    forward: rows `(M, D_in)` -> `(M, D_out)`; transpose: rows `(M, D_out)` -> `(M, D_in)`.
    Convolutions and pooling apply it through the op itself with the weight fixed.
    row_norms2: `() -> (D_out,)` float64, Σ_i J_oi² per row, where the map knows it without
    forming J (a convolution, from its weight; a shared diagonal after one); None otherwise.
    exact_frobenius: `() -> ‖J‖_F` (a 0-d tensor) from `row_norms2`, where there is one;
    None otherwise (`frobenius` then forms J band by band).
    convolution: the `jaccli.graph.convolution.Convolution` this map is, when it is exactly one
    convolution of a fixed weight (stored compactly as its kernel); None otherwise.
    """

    shared = True
    tag = "shared-operator"
    batch = 1

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor],
                 transpose: Callable[[torch.Tensor], torch.Tensor], d_out: int, d_in: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 convolution=None, row_norms2: Callable[[], torch.Tensor] | None = None):
        self.forward, self.transpose = forward, transpose
        self.convolution = convolution
        self.d_out, self.d_in, self.dtype, self.device = d_out, d_in, dtype, device
        self.row_norms2 = row_norms2
        self.exact_frobenius = None if row_norms2 is None else (
            lambda: row_norms2().sum().sqrt())
        self._dense: torch.Tensor | None = None
        self._frobenius: torch.Tensor | None = None

    def right_apply(self, m):
        n, _, k = m.shape
        rows = self.forward(m.transpose(1, 2).reshape(n * k, self.d_in))
        return rows.reshape(n, k, self.d_out).transpose(1, 2)

    def left_apply(self, m):
        n, k, _ = m.shape
        return self.transpose(m.reshape(n * k, self.d_out)).reshape(n, k, self.d_in)

    def dense(self, n=None):
        if self._dense is None:  # formed once: it is the same for every sample
            self._dense = self._formed()[None]
        return _expand(self._dense, n)

    def _formed(self) -> torch.Tensor:
        """`(D_out, D_in)`, applied to `FORM_CHUNK // max(D_out, D_in)` identity columns at a
        time, so forming it holds the matrix and one chunk's workspace (a convolution's im2col of
        the whole identity would be several times the matrix)."""
        out = torch.empty(self.d_out, self.d_in, dtype=self.dtype, device=self.device)
        step = max(1, min(self.d_in, FORM_CHUNK // max(self.d_out, self.d_in, 1)))
        for start in range(0, self.d_in, step):
            count = min(step, self.d_in - start)
            columns = torch.zeros(count, self.d_in, dtype=self.dtype, device=self.device)
            columns[torch.arange(count), torch.arange(start, start + count)] = 1
            out[:, start:start + count] = self.forward(columns).T
        return out

    def row_blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """`(start, J[start:start + c])` for consecutive bands of `c` rows `(c, D_in)`, each
        the transpose applied to `c` identity rows of the output (`FORM_CHUNK // max(D_out,
        D_in)` at a time): the matrix one band at a time, never whole (an HDF5 writer streams
        it). The Frobenius norm is kept on the way, for `frobenius`."""
        step = max(1, min(self.d_out, FORM_CHUNK // max(self.d_out, self.d_in, 1)))
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, self.d_out, step):
            count = min(step, self.d_out - start)
            rows = torch.zeros(count, self.d_out, dtype=self.dtype, device=self.device)
            rows[torch.arange(count), torch.arange(start, start + count)] = 1
            with torch.no_grad():  # numbers for a file: no graph back to the weights
                band = self.transpose(rows).detach()
                total += band.double().square().sum()
            yield start, band
        self._frobenius = total.sqrt().to(self.dtype).reshape(1)

    def frobenius(self, n):
        if self._frobenius is None:
            if self.exact_frobenius is not None:
                self._frobenius = self.exact_frobenius().to(self.dtype).reshape(1)
            elif self._dense is not None:
                self._frobenius = torch.linalg.matrix_norm(self._dense)
            else:  # band by band: the matrix is not formed for its norm
                for _ in self.row_blocks():
                    pass
        return _expand(self._frobenius, n)

    def compact(self):
        return {"matrix": self.dense()[0]}
