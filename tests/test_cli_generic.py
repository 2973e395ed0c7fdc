"""`jaccli compute --no-layers` on a TorchScript model with PReLU: the end-to-end Jacobians come
from the generic path, whose first route (vmap over jacrev) is wrong there at N = D_out."""

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app

from .conftest import reference_jacobian


@pytest.mark.parametrize("batch_size", [4, 16])
def test_torchscript_prelu_net_end_to_end_matches_the_reference(tmp_path, batch_size):
    """Batches of 4 used to raise, batches of 16 (the PReLU width) to be silently wrong."""
    model = nn.Sequential(nn.Linear(8, 16), nn.PReLU(16), nn.Linear(16, 4)).double().eval()
    with torch.no_grad():
        model[1].weight.uniform_(-1.0, 1.0)
    torch.jit.save(torch.jit.script(model), tmp_path / "prelu_ts.pt")
    x = np.random.default_rng(3).normal(size=(2 * batch_size, 8))  # two full batches
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "jac.h5"
    result = CliRunner().invoke(app, [str(a) for a in (
        "compute", tmp_path / "prelu_ts.pt", tmp_path / "x.npy", "--no-layers",
        "--batch-size", batch_size, "--dtype", "float64", "-o", out)])
    assert result.exit_code == 0, result.output
    expected = reference_jacobian(model, torch.from_numpy(x)).numpy()
    with jaccli.open_results(out) as results:
        assert results.n_samples == 2 * batch_size
        # The converted graph has a rule for prelu; vmap over jacrev (known-bad through PReLU)
        # never made these numbers.
        assert results.attrs["engine"].startswith("graph: torchscript")
        assert results.end_to_end.attrs["generic_route"] != "vmap-rev"
        np.testing.assert_allclose(results.jacobian("end_to_end"), expected, rtol=1e-10,
                                   atol=1e-12)


def test_torchscript_prelu_net_spectrum_jvp_vjp_at_batch_size_d_out(tmp_path):
    """The other commands on the same net, with a batch as large as the output (4)."""
    import h5py

    model = nn.Sequential(nn.Linear(8, 16), nn.PReLU(16), nn.Linear(16, 4)).double().eval()
    with torch.no_grad():
        model[1].weight.uniform_(-1.0, 1.0)
    torch.jit.save(torch.jit.script(model), tmp_path / "prelu_ts.pt")
    rng = np.random.default_rng(4)
    x, v, u = rng.normal(size=(4, 8)), rng.normal(size=(4, 8)), rng.normal(size=(4, 4))
    for name, array in (("x", x), ("v", v), ("u", u)):
        np.save(tmp_path / f"{name}.npy", array)
    jac = reference_jacobian(model, torch.from_numpy(x)).numpy()
    expected = {"jvp": np.einsum("nij,nj->ni", jac, v), "vjp": np.einsum("nij,ni->nj", jac, u)}
    common = ["--dtype", "float64", "--batch-size", "4"]
    for command, vectors in (("jvp", "v"), ("vjp", "u")):
        out = tmp_path / f"{command}.h5"
        result = CliRunner().invoke(app, [str(a) for a in (
            command, tmp_path / "prelu_ts.pt", tmp_path / "x.npy", "--vectors",
            tmp_path / f"{vectors}.npy", "--dtype", "float64", "-o", out)])
        assert result.exit_code == 0, result.output
        with h5py.File(out) as f:
            np.testing.assert_allclose(f["products/product/product"][:], expected[command],
                                       rtol=1e-10)
    out = tmp_path / "s.h5"
    result = CliRunner().invoke(app, [str(a) for a in (
        "spectrum", tmp_path / "prelu_ts.pt", tmp_path / "x.npy", "--no-layers", *common,
        "-o", out)])
    assert result.exit_code == 0, result.output
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["end_to_end/singular_values"][:],
                                   np.linalg.svd(jac, compute_uv=False), rtol=1e-10)
