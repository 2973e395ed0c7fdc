"""Matrix-chain ordering for products of structured per-sample Jacobians.

For layers 1..L with Jacobians `J_l: (d_l x d_{l-1})`, the end-to-end Jacobian is
`J_L ... J_1`. Multiplying from the output side (reverse accumulation) costs about
`N * d_L * sum(d_l * d_{l-1})`; from the input side (forward accumulation)
`N * d_0 * sum(d_l * d_{l-1})`; the best split can beat both. Costs know the structures:
shared factors are multiplied once, not per sample, and diagonal or selection factors only
scale or pick rows.
"""

from __future__ import annotations

from dataclasses import dataclass

_DIAGONAL = ("shared-diagonal", "diagonal")
_MATRIX = ("shared", "dense")


def compose_tag(a: str, b: str) -> str:
    """The structure of `A @ B` given the structures of A and B (mirrors `compose`)."""
    if a in _DIAGONAL and b in _DIAGONAL:
        return "shared-diagonal" if a == b == "shared-diagonal" else "diagonal"
    if a == b == "selection":
        return "selection"
    if a == "diagonal" and b == "shared":
        return "row-scaled"
    if a in _DIAGONAL and b == "row-scaled":
        return "row-scaled"
    if b in _MATRIX:
        return "shared" if a in ("shared", "shared-diagonal") and b == "shared" else "dense"
    if a in _MATRIX:
        return "shared" if a == "shared" and b == "shared-diagonal" else "dense"
    return "dense"


def compose_cost(a: str, b: str, m: int, k: int, n: int, samples: int) -> float:
    """Multiply-adds to form `A @ B` for A `(m x k)`, B `(k x n)` over `samples` samples."""
    per = 1 if compose_tag(a, b) in ("shared", "shared-diagonal") else samples
    cheap = ("shared-diagonal", "diagonal", "selection")
    if a in _DIAGONAL and b in _DIAGONAL or a == b == "selection":
        return per * m
    if a in _DIAGONAL and b in ("shared", "row-scaled"):
        return per * m
    if b in _MATRIX:
        return per * m * n * (1 if a in cheap else k)
    if a in _MATRIX:
        return per * m * n * (1 if b in cheap else k)
    return per * m * k * n


@dataclass
class ChainPlan:
    """The cheapest parenthesization of a chain product.

    order: `(i, k, j)` steps in evaluation order: form layers i..j as (k+1..j) @ (i..k).
    cost: its multiply-adds; forward_cost / reverse_cost: those of the two plain orders.
    """

    order: list[tuple[int, int, int]]
    cost: float
    forward_cost: float
    reverse_cost: float
    tag: str


def cheapest_order(tags: list[str], dims: list[int], samples: int, *, tag_rule=compose_tag,
                   cost_rule=compose_cost) -> ChainPlan:
    """Plan `J_L ... J_1` where `tags[l]` is J_{l+1}'s structure and it maps dims[l] -> dims[l+1].

    dims: `L + 1` sizes, input first. tag_rule / cost_rule: the structure and the cost of a
    product (defaults: `compose_tag`, `compose_cost`; a richer algebra passes its own).
    """
    n = len(tags)
    best: dict[tuple[int, int], tuple[float, str, int]] = {
        (i, i): (0.0, tags[i], -1) for i in range(n)}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            choice = None
            for k in range(i, j):
                left_cost, left_tag, _ = best[(k + 1, j)]
                right_cost, right_tag, _ = best[(i, k)]
                cost = left_cost + right_cost + cost_rule(
                    left_tag, right_tag, dims[j + 1], dims[k + 1], dims[i], samples)
                if choice is None or cost < choice[0]:
                    choice = (cost, tag_rule(left_tag, right_tag), k)
            best[(i, j)] = choice
    order: list[tuple[int, int, int]] = []

    def emit(i: int, j: int) -> None:
        if i == j:
            return
        k = best[(i, j)][2]
        emit(i, k)
        emit(k + 1, j)
        order.append((i, k, j))

    emit(0, n - 1)
    rules = (tag_rule, cost_rule)
    return ChainPlan(order, best[(0, n - 1)][0],
                     _plain_cost(tags, dims, samples, *rules, forward=True),
                     _plain_cost(tags, dims, samples, *rules, forward=False), best[(0, n - 1)][1])


def _plain_cost(tags: list[str], dims: list[int], samples: int, tag_rule=compose_tag,
                cost_rule=compose_cost, *, forward: bool) -> float:
    """Cost of accumulating from the input side (forward) or the output side (reverse)."""
    n = len(tags)
    if forward:
        cost, tag = 0.0, tags[0]
        for layer in range(1, n):
            cost += cost_rule(tags[layer], tag, dims[layer + 1], dims[layer], dims[0], samples)
            tag = tag_rule(tags[layer], tag)
        return cost
    cost, tag = 0.0, tags[-1]
    for layer in range(n - 2, -1, -1):
        cost += cost_rule(tag, tags[layer], dims[n], dims[layer + 1], dims[layer], samples)
        tag = tag_rule(tag, tags[layer])
    return cost
