"""The Frobenius norm of a shared convolution operator in `jaccli spectrum` (the matrix-free
Lanczos route, once for all samples) is exact — the sum of the same convolution with the
squared weight applied to ones — for strided, padded, dilated, grouped and transposed
convolutions, against `torch.linalg.matrix_norm` of the float64 autograd Jacobian; a shared
operator that is not one convolution (a chain of them, a pooling) keeps the Hutch++ estimate
and says so."""

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from jaccli.cli import app
from jaccli.spectra import plan

runner = CliRunner()
IN_SHAPE = (4, 9, 9)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=(1, 2), dilation=2, groups=2),  # (6, 4, 5)
        nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, dilation=2,
                           groups=2),                                          # (4, 9, 11)
        nn.AvgPool2d(2),                                                        # (4, 4, 5)
    ).double().eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("conv_frobenius")
    model = _model()
    np.save(folder / "x.npy", np.random.default_rng(0).normal(size=(3, *IN_SHAPE)))
    program = torch.export.export(model, (torch.randn(2, *IN_SHAPE, dtype=torch.float64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "convs.pt2")
    torch.jit.save(torch.jit.script(model), folder / "convs.ts")
    return folder, model


def _frobenius(f, in_shape):
    """‖J‖_F of `f` at 0 from the explicit float64 Jacobian (autograd)."""
    x = torch.zeros(*in_shape, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: f(v[None])[0], x)
    return float(torch.linalg.matrix_norm(jac.reshape(-1, x.numel())))


@pytest.mark.parametrize("suffix", ["pt2", "ts"])
def test_shared_convolution_frobenius_is_exact(files, suffix, monkeypatch):
    monkeypatch.setattr(plan, "MAX_SHARED_SVD_COST", 0)  # every shared map to Lanczos
    folder, model = files
    out = folder / f"spec_{suffix}.h5"
    result = runner.invoke(app, [str(a) for a in [
        "spectrum", folder / f"convs.{suffix}", folder / "x.npy", "--dtype", "float64",
        "--top-k", "3", "--json", "-o", out]])
    assert result.exit_code == 0, result.output
    summary = {e["name"]: e for e in json.loads(result.stdout)["entries"]}
    with torch.no_grad():
        hidden = model[0](torch.zeros(1, *IN_SHAPE, dtype=torch.float64)).shape[1:]
    expected = {"0": _frobenius(model[0], IN_SHAPE), "1": _frobenius(model[1], hidden),
                "(end-to-end)": _frobenius(model, IN_SHAPE)}
    with h5py.File(out) as f:
        for name in ("0", "1"):
            group = f[f"layers/{name}"]
            assert group.attrs["method"] == "lanczos"
            np.testing.assert_allclose(group["frobenius"][:], expected[name], rtol=1e-10)
            assert "frobenius_se" not in group
            assert "Frobenius norm exact" in group.attrs["note"]
            assert "frobenius_se" not in summary[name]["quantities"]
            sigma = group["top_singular_values"][:, 0]
            np.testing.assert_allclose(group["stable_rank"][:],
                                       expected[name] ** 2 / sigma ** 2, rtol=1e-8)
        # A chain of shared maps is not one convolution: the estimate, flagged as such.
        group = f["end_to_end"]
        assert group.attrs["method"] == "lanczos"
        assert "frobenius_se" in group and "estimated by Hutch++" in group.attrs["note"]
        assert "frobenius_se" in summary["(end-to-end)"]["quantities"]
        estimate = group["frobenius"][0]
        assert abs(estimate / expected["(end-to-end)"] - 1) < 0.2


def test_convolution_operator_frobenius_without_the_spectrum_route(files):
    """`compute`'s ‖J‖_F of a convolution (the operator's own `frobenius`, no matrix formed)
    is the same exact value."""
    folder, model = files
    result = runner.invoke(app, [str(a) for a in [
        "compute", folder / "convs.pt2", folder / "x.npy", "--dtype", "float64", "--layers",
        "1", "--no-end-to-end", "--json"]])
    assert result.exit_code == 0, result.output
    with torch.no_grad():
        hidden = model[0](torch.zeros(1, *IN_SHAPE, dtype=torch.float64)).shape[1:]
    entry = next(e for e in json.loads(result.stdout)["entries"] if e["name"] == "1")
    assert entry["frobenius_mean"] == pytest.approx(_frobenius(model[1], hidden), rel=1e-10)


def test_histogram_of_values_a_few_ulps_apart():
    """Equal singular values from Lanczos (an average pooling's) differ by an ulp or two: one
    wide bin holds them, min and max exact (16 bins of that range would not be finite)."""
    from jaccli.reports.spectrum_summary import histogram

    values = np.array([0.5, np.nextafter(0.5, 1.0), np.nextafter(0.5, 0.0)])
    got = histogram(values)
    assert sum(got["counts"]) == 3 and got["counts"][0] == 3
    assert got["min"] == values.min() and got["max"] == values.max()
    assert histogram(np.array([2.0, 2.0]))["edges"][-1] == 3.0  # one value: a bin of width 1


def test_convolution_then_batchnorm_block_frobenius_is_exact(tmp_path, monkeypatch):
    """A conv + eval BatchNorm block (`--granularity block`, the ResNet `conv2 + bn2`): one
    shared map, each output row the convolution's scaled by its channel's BN factor, so ‖J‖_F
    is exact too — against the float64 autograd Jacobian of the two modules."""
    monkeypatch.setattr(plan, "MAX_SHARED_SVD_COST", 0)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5),
                          nn.Flatten(), nn.Linear(5 * 9 * 9, 3)).double()
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    bn.weight.data.uniform_(-2, 2)
    bn.eval()
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(2, *IN_SHAPE)))
    program = torch.export.export(model, (torch.randn(2, *IN_SHAPE, dtype=torch.float64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "convbn.pt2")
    result = runner.invoke(app, [str(a) for a in [
        "spectrum", tmp_path / "convbn.pt2", tmp_path / "x.npy", "--dtype", "float64",
        "--granularity", "block", "--top-k", "2", "--no-end-to-end", "--json"]])
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in json.loads(result.stdout)["entries"]}
    block = entries["0+1"]
    assert block["method"] == "lanczos" and "frobenius_se" not in block["quantities"]
    assert "Frobenius norm exact" in block["note"]
    expected = _frobenius(model[:2], IN_SHAPE)
    assert block["quantities"]["frobenius"]["mean"] == pytest.approx(expected, rel=1e-10)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1, bias=False)

    def forward(self, x):
        return self.c2(self.c(x) + x)


def test_other_shared_maps_are_not_formed_for_their_norm(tmp_path, monkeypatch):
    """The end-to-end map of a linear residual network is shared but not one convolution:
    it goes to Lanczos so as not to be formed, so its norm stays the Hutch++ estimate and the
    structure is never computed for it (a sum of maps would be formed densely)."""
    from jaccli.pipelines import engines

    monkeypatch.setattr(plan, "MAX_SHARED_SVD_COST", 0)
    torch.manual_seed(0)
    model = _Residual().double().eval()
    program = torch.export.export(model, (torch.randn(2, 2, 6, 6, dtype=torch.float64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "res.pt2")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(2, 2, 6, 6)))
    asked, compute = [], engines.GraphRun.compute

    def spy(self, x, names=None, **options):
        asked.extend(names or ["(everything)"])
        return compute(self, x, names=names, **options)

    monkeypatch.setattr(engines.GraphRun, "compute", spy)
    result = runner.invoke(app, [str(a) for a in [
        "spectrum", tmp_path / "res.pt2", tmp_path / "x.npy", "--dtype", "float64",
        "--top-k", "2", "--json"]])
    assert result.exit_code == 0, result.output
    entries = {e["name"]: e for e in json.loads(result.stdout)["entries"]}
    assert entries["(end-to-end)"]["method"] == "lanczos"
    assert "frobenius_se" in entries["(end-to-end)"]["quantities"]
    assert set(asked) == {"c", "c2"}
    for name in ("c", "c2"):
        assert "frobenius_se" not in entries[name]["quantities"]
        expected = _frobenius(getattr(model, name), (2, 6, 6))
        assert entries[name]["quantities"]["frobenius"]["mean"] == pytest.approx(expected,
                                                                                 rel=1e-10)
