"""The structures the graph engine adds, and the algebra over all of them, against dense
matrices: products (and their predicted tags), sums, norms, singular values, compact forms."""

from __future__ import annotations

import itertools

import pytest
import torch

from jaccli.engine.structures import Diagonal, Matrix, RowScaled, Selection
from jaccli.graph import algebra
from jaccli.graph.structures import Gather, Identity, Kronecker, Operator

N = 3
D = 6  # every structure below is D x D, so any two compose


def _operator(seed: int) -> Operator:
    m = torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return Operator(lambda rows: rows @ m.T, lambda rows: rows @ m, D, D, torch.float64)


def make(tag: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g)

    index = torch.randint(0, D, (N, D), generator=g)
    return {
        "identity": lambda: Identity(D),
        "shared": lambda: Matrix(randn(1, D, D), shared=True),
        "dense": lambda: Matrix(randn(N, D, D)),
        "shared-diagonal": lambda: Diagonal(randn(1, D), shared=True),
        "diagonal": lambda: Diagonal(randn(N, D)),
        "row-scaled": lambda: RowScaled(randn(N, D), randn(1, D, D)),
        "selection": lambda: Selection(index, D, torch.float64),
        "gather": lambda: Gather(index, randn(N, D) * (randn(N, D) > 0), D),
        "shared-gather": lambda: Gather(index[:1], randn(1, D), D),
        "kronecker": lambda: Kronecker(None, randn(N, 3, 2, 2), 3),
        # I_3 ⊗ W, the same block layout as "kronecker" (3 groups of 2): they compose
        "shared-kronecker": lambda: Kronecker(None, randn(1, 1, 2, 2), 1, left_size=3),
        "shared-operator": lambda: _operator(seed),
    }[tag]()


TAGS = ["identity", "shared", "dense", "shared-diagonal", "diagonal", "row-scaled",
        "selection", "gather", "shared-gather", "kronecker", "shared-kronecker",
        "shared-operator"]


@pytest.mark.parametrize(("a_tag", "b_tag"), list(itertools.product(TAGS, TAGS)))
def test_compose_is_the_dense_product_with_the_predicted_tag(a_tag, b_tag):
    a, b = make(a_tag, 1), make(b_tag, 2)
    product = algebra.compose(a, b)
    expected = a.dense(N) @ b.dense(N)
    torch.testing.assert_close(product.dense(N), expected)
    assert product.tag == algebra.compose_tag(a_tag, b_tag)
    torch.testing.assert_close(product.frobenius(N), torch.linalg.matrix_norm(expected))


@pytest.mark.parametrize(("a_tag", "b_tag"), list(itertools.product(TAGS, TAGS)))
def test_add_is_the_dense_sum_with_the_predicted_tag(a_tag, b_tag):
    a, b = make(a_tag, 3), make(b_tag, 4)
    total = algebra.add(a, b)
    torch.testing.assert_close(total.dense(N), a.dense(N) + b.dense(N))
    assert total.tag == algebra.add_tag(a_tag, b_tag)


@pytest.mark.parametrize("tag", ["identity", "gather", "shared-gather", "kronecker",
                                 "shared-kronecker", "shared-operator"])
def test_products_with_blocks_and_norms(tag):
    j = make(tag, 5)
    m = torch.randn(N, 4, D, dtype=torch.float64)
    dense = j.dense(N)
    torch.testing.assert_close(j.left_apply(m).expand(N, 4, D), m @ dense)
    torch.testing.assert_close(j.right_apply(m.transpose(1, 2)).expand(N, D, 4),
                               dense @ m.transpose(1, 2))
    torch.testing.assert_close(j.frobenius(N), torch.linalg.matrix_norm(dense))
    assert j.compact()
    if getattr(j, "shared", False):
        assert j.batch == 1


def test_gather_singular_values_are_root_column_sums_of_squares():
    index = torch.tensor([[0, 0, 2, 3, 3, 3], [5, 4, 3, 2, 1, 0]])
    weight = torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0, 1.0], [1.0] * 6], dtype=torch.float64)
    g = Gather(index, weight, 6)
    torch.testing.assert_close(g.singular_values(), torch.linalg.svdvals(g.dense()))
    # rank-deficient: two columns unused, one row zero
    assert g.singular_values()[0, -2:].eq(0).all()


def test_kronecker_singular_values_and_regrouping():
    g = torch.Generator().manual_seed(7)
    left = torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=g)
    right = torch.randn(2, 1, 2, 4, dtype=torch.float64, generator=g)
    k = Kronecker(left, right, 2)
    torch.testing.assert_close(k.singular_values(), torch.linalg.svdvals(k.dense()))
    # I_T ⊗ W (shared, one group) times a per-group block structure still composes exactly
    tokens = Kronecker(None, torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=g), 1,
                       left_size=4)
    blocks = Kronecker(None, torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g), 4)
    product = algebra.compose(blocks, tokens)
    assert isinstance(product, Kronecker) and product.groups == 4
    torch.testing.assert_close(product.dense(2), blocks.dense(2) @ tokens.dense(2))


def test_kronecker_layouts_that_do_not_line_up_fall_back_to_matrices():
    g = torch.Generator().manual_seed(8)
    three = Kronecker(None, torch.randn(N, 3, 2, 2, dtype=torch.float64, generator=g), 3)
    two = Kronecker(None, torch.randn(1, 1, 3, 3, dtype=torch.float64, generator=g), 1,
                    left_size=2)
    product = algebra.compose(three, two)
    assert product.tag == "dense"  # the prediction says kronecker: layouts are not in tags
    torch.testing.assert_close(product.dense(N), three.dense(N) @ two.dense(N))


def test_shared_products_stay_shared_whatever_the_batch():
    a, b = make("shared-operator", 1), make("shared-kronecker", 2)
    product = algebra.compose(a, b)
    assert product.batch == 1 and product.tag == "shared-operator"
    few = algebra.compose_cost("shared-operator", "shared-kronecker", D, D, D, 1)
    many = algebra.compose_cost("shared-operator", "shared-kronecker", D, D, D, 1000)
    assert few == many > 0
    assert algebra.compose_cost("identity", "dense", D, D, D, 10) == 0
