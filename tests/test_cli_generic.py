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
        np.testing.assert_allclose(results.jacobian("end_to_end"), expected, rtol=1e-10,
                                   atol=1e-12)
