import itertools

import pytest
import torch

from jaccli.engine.chain import cheapest_order, compose_tag
from jaccli.engine.structures import Diagonal, Matrix, RowScaled, Selection, chain_product, compose

N = 3


def make(tag: str, d_out: int, d_in: int, n: int = N):
    """A random structured Jacobian of the given structure (square where the structure is)."""
    if tag == "shared":
        return Matrix(torch.randn(1, d_out, d_in, dtype=torch.float64), shared=True)
    if tag == "dense":
        return Matrix(torch.randn(n, d_out, d_in, dtype=torch.float64))
    if tag == "shared-diagonal":
        return Diagonal(torch.randn(1, d_out, dtype=torch.float64), shared=True)
    if tag == "diagonal":
        return Diagonal(torch.randn(n, d_out, dtype=torch.float64))
    if tag == "row-scaled":
        return RowScaled(torch.randn(n, d_out, dtype=torch.float64),
                         torch.randn(1, d_out, d_in, dtype=torch.float64))
    return Selection(torch.randint(0, d_in, (n, d_out)), d_in, torch.float64)


TAGS = ["shared", "dense", "shared-diagonal", "diagonal", "row-scaled", "selection"]
SQUARE = {"shared-diagonal", "diagonal"}


@pytest.mark.parametrize(("a_tag", "b_tag"), list(itertools.product(TAGS, TAGS)))
def test_compose_equals_dense_product_and_predicted_tag(a_tag, b_tag):
    torch.manual_seed(0)
    d0, d1 = 4, 5
    d2 = d1 if a_tag in SQUARE else 6
    if b_tag in SQUARE:
        d0 = d1
    a, b = make(a_tag, d2, d1), make(b_tag, d1, d0)
    product = compose(a, b)
    torch.testing.assert_close(product.dense(N), a.dense(N) @ b.dense(N))
    assert product.tag == compose_tag(a_tag, b_tag)
    torch.testing.assert_close(product.frobenius(N), torch.linalg.matrix_norm(a.dense(N) @
                                                                                 b.dense(N)))


def test_products_and_compact_forms_round_trip():
    torch.manual_seed(1)
    for tag in TAGS:
        j = make(tag, 4, 4)
        m = torch.randn(N, 2, 4, dtype=torch.float64)
        torch.testing.assert_close(j.left_apply(m), m @ j.dense(N))
        torch.testing.assert_close(j.right_apply(m.transpose(1, 2)), j.dense(N) @ m.transpose(1, 2))
        compact = j.compact()
        assert compact, tag
        if tag.startswith("shared"):
            assert all(v.shape[0] != N or v.ndim == 1 for v in compact.values())


def test_order_reverse_wins_when_outputs_are_few():
    dims = [784, 1000, 1000, 10]
    plan = cheapest_order(["dense"] * 3, dims, samples=8)
    assert plan.cost == plan.reverse_cost < plan.forward_cost
    assert plan.order == [(1, 1, 2), (0, 0, 2)]  # (J3 J2) first, then times J1


def test_order_forward_wins_when_inputs_are_few():
    plan = cheapest_order(["dense"] * 3, [2, 1000, 1000, 1000], samples=8)
    assert plan.cost == plan.forward_cost < plan.reverse_cost
    assert plan.order == [(0, 0, 1), (0, 1, 2)]  # (J2 J1) first, then J3 times it


def test_order_can_beat_both_plain_orders():
    dims = [50, 2, 50, 2, 50]
    tags = ["dense"] * 4
    plan = cheapest_order(tags, dims, samples=1)
    assert plan.cost < min(plan.forward_cost, plan.reverse_cost)
    torch.manual_seed(2)
    chain = [make("dense", dims[i + 1], dims[i], n=2) for i in range(4)]
    expected = chain[3].dense() @ chain[2].dense() @ chain[1].dense() @ chain[0].dense()
    torch.testing.assert_close(chain_product(chain, plan.order).dense(), expected)


def test_shared_factors_are_multiplied_once():
    # W2 W1 (both shared) costs the same for 1 or 1000 samples.
    few = cheapest_order(["shared", "shared"], [300, 200, 100], samples=1)
    many = cheapest_order(["shared", "shared"], [300, 200, 100], samples=1000)
    assert few.cost == many.cost and many.tag == "shared"


@pytest.mark.parametrize("seed", range(5))
def test_random_chains_match_plain_products(seed):
    gen = torch.Generator().manual_seed(seed)
    length = int(torch.randint(2, 6, (1,), generator=gen))
    dims, tags = [int(torch.randint(2, 7, (1,), generator=gen))], []
    for _ in range(length):
        tag = TAGS[int(torch.randint(0, len(TAGS), (1,), generator=gen))]
        tags.append(tag)
        dims.append(dims[-1] if tag in SQUARE else int(torch.randint(2, 7, (1,), generator=gen)))
    torch.manual_seed(seed)
    chain = [make(t, dims[i + 1], dims[i]) for i, t in enumerate(tags)]
    expected = chain[0].dense(N)
    for j in chain[1:]:
        expected = j.dense(N) @ expected
    plan = cheapest_order(tags, dims, samples=N)
    result = chain_product(chain, plan.order)
    torch.testing.assert_close(result.dense(N), expected)
    assert result.tag == plan.tag
