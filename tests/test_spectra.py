"""Spectral quantities, structured spectra and the FFT method against torch.linalg in float64
(Lanczos and Hutchinson: test_lanczos.py)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from jaccli.engine.rules.linear import linear_map_matrix
from jaccli.engine.structures import Diagonal, Matrix, RowScaled, Selection
from jaccli.reports.stats import aggregate, worst_samples
from jaccli.spectra.conv_fft import conv2d_circular_singular_values, fft_applicable
from jaccli.spectra.exact import exact_spectrum
from jaccli.spectra.quantities import all_quantities

F64 = torch.float64


def test_quantities_match_linalg_and_identities():
    torch.manual_seed(0)
    jac = torch.randn(5, 7, 4, dtype=F64)
    sigma = torch.linalg.svdvals(jac)
    q = all_quantities(sigma, 7, 4)
    torch.testing.assert_close(q["spectral_norm"], torch.linalg.matrix_norm(jac, ord=2))
    torch.testing.assert_close(q["frobenius"], torch.linalg.matrix_norm(jac))
    torch.testing.assert_close(q["frobenius"] ** 2, (sigma**2).sum(1))
    torch.testing.assert_close(q["nuclear"], torch.linalg.matrix_norm(jac, ord="nuc"))
    torch.testing.assert_close(q["condition_number"], torch.linalg.cond(jac))
    torch.testing.assert_close(q["log_volume"], 0.5 * torch.logdet(jac.transpose(1, 2) @ jac))
    torch.testing.assert_close(q["stable_rank"], q["frobenius"] ** 2 / q["spectral_norm"] ** 2)
    p = sigma / sigma.sum(1, keepdim=True)
    torch.testing.assert_close(q["effective_rank"], torch.exp(-(p * p.log()).sum(1)))


def test_rank_deficient_conventions():
    jac = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=F64)
    q = all_quantities(torch.linalg.svdvals(jac), 2, 2)
    assert q["condition_number"][0] == math.inf and q["log_volume"][0] == -math.inf
    assert q["stable_rank"][0] == 1 and q["effective_rank"][0] == 1
    assert q["stable_rank"][1] == 0 and q["effective_rank"][1] == 0  # a zero Jacobian


def test_aggregate_statistics_and_worst_samples():
    stats = aggregate(torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")], dtype=F64).numpy())
    assert stats["n_nonfinite"] == 1 and stats["mean"] == 2.5 and stats["max"] == 4
    assert stats["p50"] == 2.5 and stats["min"] == 1 and stats["std"] == pytest.approx(1.118, 1e-3)
    # Infinite values (rank-deficient samples' condition numbers) count; NaN ones do not.
    stats = aggregate(np.array([1.0, 2.0, np.inf, np.inf, np.inf, np.nan]))
    assert stats["n_nonfinite"] == 4 and stats["mean"] == stats["max"] == stats["p50"] == np.inf
    assert stats["min"] == 1.0 and stats["p5"] == 1.0
    assert aggregate(np.full(3, np.inf))["p50"] == np.inf
    rows = [10, 11, 12, 13]
    assert worst_samples([0.5, 3.0, 2.0, 0.1], rows, largest=True, count=2) == [11, 12]
    assert worst_samples([0.5, 3.0, 2.0, 0.1], rows, largest=False, count=1) == [13]


@pytest.mark.parametrize("make", [
    lambda: Matrix(torch.randn(1, 6, 4, dtype=F64), shared=True),
    lambda: Matrix(torch.randn(3, 4, 6, dtype=F64)),
    lambda: Diagonal(torch.randn(3, 5, dtype=F64)),
    lambda: Diagonal(torch.randn(1, 5, dtype=F64), shared=True),
    lambda: RowScaled(torch.randn(3, 4, dtype=F64), torch.randn(1, 4, 7, dtype=F64)),
    lambda: RowScaled(torch.randn(3, 7, dtype=F64), torch.randn(1, 7, 4, dtype=F64)),
    lambda: Selection(torch.randint(0, 5, (3, 8)), 5, F64),
    lambda: Selection(torch.randint(0, 9, (3, 4)), 9, F64),
])
def test_structured_spectra_equal_svdvals(make):
    torch.manual_seed(1)
    jac = make()
    expected = torch.linalg.svdvals(jac.dense(3))
    for exact in (False, True):
        spectrum = exact_spectrum(jac, 3, exact=exact)
        assert spectrum.complete
        torch.testing.assert_close(spectrum.values, expected, rtol=1e-9, atol=1e-10)


def test_linear_layer_spectrum_is_svdvals_of_w_for_every_sample_and_relu_is_0_or_1():
    from jaccli.engine.rules import rule_for

    linear = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=F64)
    spectrum = exact_spectrum(rule_for(linear).jacobian(linear, x[:1]), 4)
    torch.testing.assert_close(spectrum.values, torch.linalg.svdvals(linear.weight.detach())
                               .expand(4, -1))
    relu = nn.ReLU()
    values = exact_spectrum(rule_for(relu).jacobian(relu, torch.randn(4, 6, dtype=F64)),
                            4).values
    assert set(values.unique().tolist()) <= {0.0, 1.0}


def test_gram_keeps_small_singular_values_in_float32():
    torch.manual_seed(2)
    u, _, v = torch.linalg.svd(torch.randn(20, 20, dtype=F64))
    w = (u * torch.logspace(0, -5, 20, dtype=F64)) @ v  # condition number 1e5
    jac = RowScaled(torch.ones(1, 20), w.float()[None])
    got = exact_spectrum(jac, 1).values.double()
    expected = torch.linalg.svdvals(w.float().double())
    assert ((got - expected).abs() / expected).max() < 1e-5


@pytest.mark.parametrize(("c_in", "c_out", "size", "kernel"), [(2, 3, (5, 6), 3), (3, 2, (4, 4), 1),
                                                            (1, 1, (7, 7), 5)])
def test_fft_spectrum_of_circular_conv_equals_svdvals_of_its_matrix(c_in, c_out, size, kernel):
    torch.manual_seed(3)
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, padding_mode="circular").double()
    assert fft_applicable(conv, (c_in, *size))
    matrix = linear_map_matrix(conv, torch.zeros(1, c_in, *size, dtype=F64))
    expected = torch.linalg.svdvals(matrix)
    got = conv2d_circular_singular_values(conv.weight.detach(), *size)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    assert not fft_applicable(nn.Conv2d(c_in, c_out, 3, padding=1), (c_in, *size))
