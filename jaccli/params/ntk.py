"""The empirical NTK's algebra: one parameter's block of Θ from its factors, and the cost model.

Θ(x, x') = Σ_P J_P(x) J_P(x')ᵀ, `(C, C)` per pair of samples. A factor is either a per-sample
Jacobian J `(N, C, P)` (then the block is J₁ J₂ᵀ), or a linear weight's input a `(N, T, i)` and
output cotangents G `(N, C, T, o)`, with J = Σ_t G_t ⊗ a_t never formed by the `gram` route:

    Θ(i, j)[c, d] = Σ_{t,s} (a_it · a_js) (G_ict · G_jds)      (T = 1: (aᵢ·aⱼ)(Gᵢ Gⱼᵀ))

Modes: `full` `(N₁, N₂, C, C)`, `trace` Σ_c Θ_cc `(N₁, N₂)`, `diagonal` Θ(i, i) `(N, C, C)`.
Factors are `jaccli.engine.ntk_factor.Factor` (re-exported here): one type for the graph and
the hook routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine.ntk_factor import GRAM, JACOBIAN, Factor, layer_of

MODES = ("full", "trace", "diagonal")


@dataclass
class Cost:
    """Multiply-adds per pair of samples and bytes per sample of one route."""

    route: str
    pair_flops: float
    sample_bytes: float


def gram_costs(tokens: int, d_in: int, d_out: int, outputs: int, mode: str, itemsize: int
               ) -> list[Cost]:
    """The two ways of a linear weight: Gram factors, or forming J `(C, o·i)` per sample."""
    t, i, o, c = tokens, d_in, d_out, outputs
    cc = c if mode == "trace" else c * c
    gram = t * t * i + (t * c * o + t * t * cc if t > 1 else cc * o)
    jac = cc * o * i + t * c * o * i  # contraction, plus forming J (per sample, amortised)
    return [Cost("gram", gram, itemsize * t * (i + c * o)),
            Cost("jacobian", jac, itemsize * c * o * i)]


def jacobian_cost(numel: int, outputs: int, mode: str, itemsize: int) -> Cost:
    cc = outputs if mode == "trace" else outputs * outputs
    return Cost("jacobian", cc * numel, itemsize * outputs * numel)


def choose(costs: list[Cost], memory: float, samples: int) -> Cost:
    """The cheapest route whose factors for `samples` samples fit in `memory` bytes (else
    the one needing least memory)."""
    fitting = [c for c in costs if c.sample_bytes * samples <= memory]
    if not fitting:
        return min(costs, key=lambda c: c.sample_bytes)
    return min(fitting, key=lambda c: c.pair_flops)


def as_jacobian(factor) -> torch.Tensor:
    """J `(N, C, P)` of a factor (formed from a, G for a linear weight: Σ_t G_t ⊗ a_t)."""
    if factor.kind == "jacobian":
        return factor.jacobian
    g, a = factor.cotangents, factor.inputs
    n, c = g.shape[:2]
    return torch.einsum("ncto,nti->ncoi", g, a).reshape(n, c, -1)


def contract(first, second, mode: str, route: str = "gram") -> torch.Tensor:
    """One parameter's block of Θ between the samples of two factors (`second` is ignored
    for `diagonal`). route: `gram` or `jacobian` for a linear weight's factors."""
    if first.kind == JACOBIAN or route == JACOBIAN:
        j1 = as_jacobian(first)
        j2 = j1 if mode == "diagonal" or second is first else as_jacobian(second)
        return _jacobian_block(j1, j2, mode)
    return _gram_block(first.inputs, first.cotangents, second.inputs, second.cotangents, mode)


def _jacobian_block(j1: torch.Tensor, j2: torch.Tensor, mode: str) -> torch.Tensor:
    n1, c, _ = j1.shape
    n2 = j2.shape[0]
    if mode == "diagonal":
        return j1 @ j1.transpose(1, 2)
    if mode == "trace":
        return torch.einsum("icp,jcp->ij", j1, j2)
    flat = j1.reshape(n1 * c, -1) @ j2.reshape(n2 * c, -1).T
    return flat.reshape(n1, c, n2, c).transpose(1, 2)


def _gram_block(a1, g1, a2, g2, mode: str) -> torch.Tensor:
    """a `(N, T, i)`, g `(N, C, T, o)`."""
    if mode == "diagonal":
        a2, g2 = a1, g1
    if a1.shape[1] == 1:  # one position: (aᵢ·aⱼ)(Gᵢ Gⱼᵀ)
        x1, x2, h1, h2 = a1[:, 0], a2[:, 0], g1[:, :, 0], g2[:, :, 0]
        if mode == "diagonal":
            return (x1 * x1).sum(1)[:, None, None] * (h1 @ h1.transpose(1, 2))
        gram = x1 @ x2.T
        if mode == "trace":
            return gram * torch.einsum("ico,jco->ij", h1, h2)
        n1, c, _ = h1.shape
        n2 = h2.shape[0]
        outer = (h1.reshape(n1 * c, -1) @ h2.reshape(n2 * c, -1).T).reshape(n1, c, n2, c)
        return gram[:, :, None, None] * outer.transpose(1, 2)
    if mode == "diagonal":
        gram = a1 @ a1.transpose(1, 2)  # (N, T, T)
        weighted = torch.einsum("nts,ndso->ndto", gram, g1)
        return torch.einsum("ncto,ndto->ncd", g1, weighted)
    rows = []
    for i in range(a1.shape[0]):  # one row of samples at a time: memory N₂·T² + N₂·C·T·o
        gram = torch.einsum("ta,jsa->jts", a1[i], a2)  # (N₂, T, T)
        if mode == "trace":
            weighted = torch.einsum("jts,jcso->jcto", gram, g2)
            rows.append(torch.einsum("cto,jcto->j", g1[i], weighted))
        else:
            weighted = torch.einsum("jts,jdso->jdto", gram, g2)
            rows.append(torch.einsum("cto,jdto->jcd", g1[i], weighted))
    return torch.stack(rows)


def factor_costs(factor: Factor, mode: str, itemsize: int) -> list[Cost]:
    """The routes of one parameter's factors, from their shapes (per sample)."""
    if factor.kind == JACOBIAN:
        _, c, p = factor.jacobian.shape
        return [jacobian_cost(p, c, mode, itemsize)]
    _, c, t, o = factor.cotangents.shape
    return gram_costs(t, factor.inputs.shape[2], o, c, mode, itemsize)


def factor_route(factor: Factor, mode: str) -> Cost:
    """The cheapest route (fewest multiply-adds per pair of samples) of a factor."""
    return min(factor_costs(factor, mode, 8), key=lambda cost: cost.pair_flops)


def layer_parts(first: dict[str, Factor], second: dict[str, Factor] | None, mode: str
                ) -> dict[str, torch.Tensor]:
    """Θ_l between the samples of two batches of factors (`{param: Factor}`, the same
    parameters; `second` None: the first batch with itself), summed per owning module:
    `{layer: block}` of shape `(N₁, N₂, C, C)` (`trace`: `(N₁, N₂)`, `diagonal`:
    `(N₁, C, C)`), in the order the parameters come."""
    parts: dict[str, torch.Tensor] = {}
    for name, factor in first.items():
        other = factor if second is None else second[name]
        block = contract(factor, other, mode, factor_route(factor, mode).route)
        layer = factor.layer or layer_of(name)
        parts[layer] = block if layer not in parts else parts[layer] + block
    return parts


def kernel_total(first: dict[str, Factor], second: dict[str, Factor] | None, mode: str
                 ) -> torch.Tensor:
    """Θ = Σ_P Θ_P between two batches of factors (as `layer_parts`, without the per-layer
    parts): every parameter's product accumulated in place into one flat buffer
    `(N₁·C, N₂·C)` (`trace`: `(N₁, N₂)`, `diagonal`: `(N₁, C, C)`), shaped as
    `layer_parts`'s blocks at the end."""
    factors = list(first.items())
    g = _leading(factors[0][1])
    n1, c = g.shape[:2]
    n2 = n1 if second is None or mode == "diagonal" else _leading(
        next(iter(second.values()))).shape[0]
    shape = {"full": (n1 * c, n2 * c), "trace": (n1, n2), "diagonal": (n1, c, c)}[mode]
    out = g.new_zeros(shape)
    for name, factor in factors:
        other = factor if second is None else second[name]
        route = factor_route(factor, mode).route
        if factor.kind == GRAM and route == GRAM and factor.inputs.shape[1] == 1:
            _add_gram_one(out, factor, other, mode, n1, n2, c)
        elif factor.kind == JACOBIAN or route == JACOBIAN:
            j1 = as_jacobian(factor)
            j2 = j1 if mode == "diagonal" or other is factor else as_jacobian(other)
            if mode == "diagonal":
                out.baddbmm_(j1, j1.transpose(1, 2))
            else:
                rows = n1 if mode == "trace" else n1 * c
                _add_products(out, j1.reshape(rows, -1),
                              None if j2 is j1 else j2.reshape(out.shape[1], -1))
        else:
            block = contract(factor, other, mode, route)
            out += block if mode != "full" else block.transpose(1, 2).reshape(shape)
    return out.reshape(n1, c, n2, c).transpose(1, 2) if mode == "full" else out


SYMMETRIC_PARTS = 4  # row chunks of a symmetric product: 10 of 16 products formed


def _add_products(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None) -> None:
    """out += a bᵀ; b None: out += a aᵀ, symmetric, so only the chunks on and above the
    diagonal are multiplied and each off-diagonal one is also added transposed."""
    if b is not None or a.shape[0] < 64 * SYMMETRIC_PARTS:
        out.addmm_(a, (a if b is None else b).T)
        return
    step = -(-a.shape[0] // SYMMETRIC_PARTS)
    bounds = [(i, min(i + step, a.shape[0])) for i in range(0, a.shape[0], step)]
    for k, (r0, r1) in enumerate(bounds):
        for c0, c1 in bounds[k:]:
            block = a[r0:r1] @ a[c0:c1].T
            out[r0:r1, c0:c1] += block
            if c0 != r0:
                out[c0:c1, r0:r1] += block.T


def _leading(factor: Factor) -> torch.Tensor:
    """A tensor of the factor whose leading axes are (N, C)."""
    return factor.cotangents if factor.kind == GRAM else factor.jacobian


def _add_gram_one(out, first: Factor, second: Factor, mode: str, n1: int, n2: int, c: int
                  ) -> None:
    """A linear weight at one position, (aᵢ·aⱼ)(Gᵢ Gⱼᵀ), added to `kernel_total`'s buffer."""
    x1, h1 = first.inputs[:, 0], first.cotangents[:, :, 0]
    if mode == "diagonal":
        out.add_((x1 * x1).sum(1)[:, None, None] * (h1 @ h1.transpose(1, 2)))
        return
    x2, h2 = second.inputs[:, 0], second.cotangents[:, :, 0]
    gram = x1 @ x2.T
    if mode == "trace":
        out.addcmul_(gram, h1.reshape(n1, -1) @ h2.reshape(n2, -1).T)
        return
    outer = (h1.reshape(n1 * c, -1) @ h2.reshape(n2 * c, -1).T).view(n1, c, n2, c)
    out.view(n1, c, n2, c).addcmul_(gram[:, None, :, None], outer)


def layer_traces(factors: dict[str, Factor]) -> dict[str, float]:
    """Σᵢ Σ_c Θ_l(xᵢ, xᵢ)_cc per owning module, from the factors alone: ‖J‖² for a per-sample
    Jacobian, Σᵢ ‖aᵢ‖² ‖Gᵢ‖² for a linear weight at one position (else its diagonal blocks)."""
    traces: dict[str, float] = {}
    for name, factor in factors.items():
        if factor.kind == JACOBIAN:
            value = float(factor.jacobian.pow(2).sum())
        elif factor.inputs.shape[1] == 1:
            value = float((factor.inputs.pow(2).sum((1, 2))
                           * factor.cotangents.pow(2).sum((1, 2, 3))).sum())
        else:
            value = float(contract(factor, factor, "diagonal").diagonal(dim1=1, dim2=2).sum())
        layer = factor.layer or layer_of(name)
        traces[layer] = traces.get(layer, 0.0) + value
    return traces


__all__ = ["GRAM", "JACOBIAN", "MODES", "Cost", "Factor", "as_jacobian", "choose", "contract",
           "factor_costs", "factor_route", "gram_costs", "jacobian_cost", "kernel_total",
           "layer_of", "layer_parts", "layer_traces"]
