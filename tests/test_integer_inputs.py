"""Integer data: token ids fed to an embedding are refused in one line (exit 1, no output
file); integer data that a model takes as real numbers is differentiated as floats."""

import numpy as np
import torch
from torch import nn
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app

from .conftest import reference_jacobian

runner = CliRunner()


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.embed(x).mean(1))


def test_token_ids_are_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Tokens()), tmp_path / "tokens.ts")
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(0, 10, size=(3, 5)))
    out = tmp_path / "out.h5"
    result = runner.invoke(app, ["compute", str(tmp_path / "tokens.ts"),
                                 str(tmp_path / "ids.npy"), "-o", str(out)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaccli: error:"), result.output
    assert "integer input" in lines[0]
    assert not out.exists()


def test_integer_pixels_taken_as_reals_are_differentiated(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.Tanh()).eval()
    torch.jit.save(torch.jit.script(model), tmp_path / "mlp.ts")
    counts = np.random.default_rng(0).integers(0, 16, size=(3, 5))
    np.save(tmp_path / "counts.npy", counts)
    out = tmp_path / "out.h5"
    result = runner.invoke(app, ["compute", str(tmp_path / "mlp.ts"),
                                 str(tmp_path / "counts.npy"), "--dtype", "float64", "-q",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    expected = reference_jacobian(model.double(), torch.from_numpy(counts).double()).numpy()
    with jaccli.open_results(out) as results:
        got = results.jacobian("end_to_end")
    assert np.abs(got - expected).max() < 1e-12
