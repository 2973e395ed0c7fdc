"""Top singular values of shared linear operators (convolutions), matrix-free and once for all
samples (`jaccli.spectra.shared`), against svdvals of the float64 Jacobian built by
`torch.autograd.functional.jacobian`."""

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jaccli.pipelines.spectrum import run_spectrum
from jaccli.settings import SpectrumSettings
from jaccli.spectra import plan
from jaccli.spectra.shared import shared_max_steps, shared_top_singular_values

CONVOLUTIONS = {  # (C_in, H, W), weight shape, stride, padding, groups
    "stride 1, padded": ((3, 7, 7), (5, 3, 3, 3), 1, 1, 1),
    "stride 2, padded": ((3, 8, 8), (4, 3, 3, 3), 2, 1, 1),
    "grouped": ((4, 6, 6), (6, 2, 3, 3), 1, 0, 2),
    "depthwise, stride 2": ((4, 7, 7), (4, 1, 3, 3), 2, 1, 4),
}


def _conv_operator(weight, in_shape, stride, padding, groups):
    """(apply_j, apply_jt, d_in, d_out, f) of the convolution, on `(1, D, b)` blocks."""
    def f(x):
        return F.conv2d(x, weight, stride=stride, padding=padding, groups=groups)

    out_shape = f(torch.zeros(1, *in_shape, dtype=weight.dtype)).shape[1:]
    d_in, d_out = int(np.prod(in_shape)), int(np.prod(out_shape))

    def apply_j(v):
        b = v.shape[2]
        return f(v[0].T.reshape(b, *in_shape)).reshape(b, d_out).T[None]

    def apply_jt(u):
        b = u.shape[2]
        zeros = torch.zeros(b, *in_shape, dtype=u.dtype)
        _, pullback = torch.func.vjp(f, zeros)
        return pullback(u[0].T.reshape(b, *out_shape))[0].reshape(b, d_in).T[None]

    return apply_j, apply_jt, d_in, d_out, f


def _reference(f, in_shape):
    """svdvals of the explicit `(D_out, D_in)` Jacobian, float64, by autograd."""
    x = torch.zeros(*in_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: f(v[None])[0], x)
    return torch.linalg.svdvals(jac.reshape(-1, x.numel()))


@pytest.mark.parametrize("case", CONVOLUTIONS)
def test_top_k_of_a_convolution_match_svdvals_with_residuals(case):
    in_shape, weight_shape, stride, padding, groups = CONVOLUTIONS[case]
    weight = torch.randn(*weight_shape, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    apply_j, apply_jt, d_in, d_out, f = _conv_operator(weight, in_shape, stride, padding,
                                                       groups)
    expected = _reference(f, in_shape)
    k = 6
    result, frob, _ = shared_top_singular_values(
        apply_j, apply_jt, d_in=d_in, d_out=d_out, k=k, dtype=torch.float64,
        device=torch.device("cpu"), tol=1e-10)
    assert result.values.shape == result.residuals.shape == (1, k)
    assert bool(result.converged.all())
    assert float(result.residuals.max()) <= result.tolerance == 1e-10
    # Bauer–Fike on the Gram operator: |σ² − σ_true²| ≤ residual · σ_1².
    bound = result.residuals[0] * expected[0] ** 2
    assert ((result.values[0] ** 2 - expected[:k] ** 2).abs() <= bound * 1.01 + 1e-12).all()
    torch.testing.assert_close(result.values[0], expected[:k], rtol=1e-8, atol=0)
    # The Hutch++ estimate of ‖J‖_F, one sketch of 32 probes, is within a few percent.
    assert abs(float(frob[0]) / float(expected.norm()) - 1) < 0.15


def test_rank_deficient_convolution_top_k_reaches_the_zero_singular_values():
    """A 1x1 convolution whose 4 x 4 weight has rank 2: J = W ⊗ I on 3x3 positions has rank
    18 of 36, so the top 20 end in two zeros, which Lanczos finds (an invariant subspace:
    deflated blocks) and verifies like the others."""
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(4, 2, generator=gen, dtype=torch.float64)
              @ torch.randn(2, 4, generator=gen, dtype=torch.float64))[:, :, None, None]
    apply_j, apply_jt, d_in, d_out, f = _conv_operator(weight, (4, 3, 3), 1, 0, 1)
    expected = _reference(f, (4, 3, 3))
    assert int((expected > 1e-10 * expected[0]).sum()) == 18
    result, _, _ = shared_top_singular_values(
        apply_j, apply_jt, d_in=d_in, d_out=d_out, k=20, dtype=torch.float64,
        device=torch.device("cpu"), tol=1e-10)
    assert bool(result.converged.all())
    torch.testing.assert_close(result.values[0, :18], expected[:18], rtol=1e-8, atol=0)
    assert float(result.values[0, 18:].max()) <= 1e-4 * float(expected[0])


def test_shared_cap_grows_with_k_and_never_exceeds_the_dimension():
    assert shared_max_steps(10, 10**6) == 1000
    assert shared_max_steps(20, 10**6) == 1600
    assert shared_max_steps(10, 300) == 300


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.act = nn.Tanh()
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(self.depthwise(self.act(self.conv(x))).flatten(1))


@pytest.fixture
def conv_files(tmp_path):
    torch.manual_seed(0)
    model = ConvNet().double().eval()
    program = torch.export.export(model, (torch.randn(2, 2, 8, 8, dtype=torch.float64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "conv.pt2")
    x = np.random.default_rng(4).normal(size=(3, 2, 8, 8))
    np.save(tmp_path / "x.npy", x)
    return tmp_path, model


def test_spectrum_takes_the_shared_matrix_free_route_once_for_all_samples(
        conv_files, monkeypatch):
    """With the one-SVD threshold at zero, both convolutions (stride 2 + padding, depthwise)
    go to matrix-free Lanczos on their operator; every sample gets the top-k of the one
    matrix, with residuals, and they match svdvals of the autograd Jacobian."""
    monkeypatch.setattr(plan, "MAX_SHARED_SVD_COST", 0)
    d, model = conv_files
    out = d / "spec.h5"
    outcome = run_spectrum(SpectrumSettings.from_options(
        model=d / "conv.pt2", data=d / "x.npy", output=out, dtype="float64", top_k=4,
        tol=1e-10, end_to_end=False))
    notes = {e["name"]: e["note"] for e in outcome.summary["entries"]}
    expected = {"conv": _reference(lambda v: model.conv(v) - model.conv.bias[:, None, None],
                                   (2, 8, 8)),
                "depthwise": _reference(
                    lambda v: model.depthwise(v) - model.depthwise.bias[:, None, None],
                    (4, 4, 4))}
    with h5py.File(out) as f:
        for name, values in expected.items():
            group = f[f"layers/{name}"]
            assert group.attrs["method"] == "lanczos"
            assert "once" in notes[name] and "the same for every sample" in notes[name]
            got = group["top_singular_values"][:]
            assert got.shape == (3, 4)
            np.testing.assert_allclose(got, np.broadcast_to(values[:4].numpy(), (3, 4)),
                                       rtol=1e-8)
            residuals = group["residual"][:]
            assert residuals.shape == (3, 4) and (residuals <= 1e-10).all()
            assert group["converged"][:].all()
