"""LSTM and GRU sequence classifiers through the command line, in every format a user ships
(state_dict with --arch, torch.export archive, TorchScript), default mode and dtype float64:
the end-to-end Jacobians match float64 autograd looped per sample.

The exported program creates its zero initial state with a baked-in float32 dtype; the run's
--dtype must reach those tensors too (it used to stop with exit 3, float against double)."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app

from .conftest import reference_jacobian

runner = CliRunner()
FACTORIES = '''
import torch
from torch import nn


class Classifier(nn.Module):
    """Sequence (B, 6, 4) -> recurrent layer -> last step -> 2 logits."""

    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        seq, _ = self.rnn(x)
        return self.fc(seq[:, -1])


def lstm():
    torch.manual_seed(0)
    return Classifier(nn.LSTM)


def gru():
    torch.manual_seed(0)
    return Classifier(nn.GRU)
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recurrent")
    (folder / "recurrent_factories.py").write_text(FACTORIES)
    np.save(folder / "x.npy", np.random.default_rng(0).normal(size=(3, 6, 4)))
    return folder


def _model(folder, name):
    namespace = {}
    # named by the file's real path: TorchScript reads the class's source back from it
    exec(compile(FACTORIES, str(folder / "recurrent_factories.py"), "exec"),  # noqa: S102
         namespace)
    return namespace[name]().eval()


@pytest.mark.parametrize("fmt", ["state_dict", "pt2", "torchscript"])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_recurrent_classifier_matches_autograd(folder, name, fmt):
    model = _model(folder, name)
    if fmt == "state_dict":
        torch.save(model.state_dict(), folder / f"{name}.pt")
        source = [folder / f"{name}.pt", "--arch", f"recurrent_factories:{name}",
                  "--arch-path", folder]
    elif fmt == "pt2":
        program = torch.export.export(model, (torch.randn(2, 6, 4),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, folder / f"{name}.pt2")
        source = [folder / f"{name}.pt2"]
    else:
        torch.jit.save(torch.jit.script(model), folder / f"{name}.ts")
        source = [folder / f"{name}.ts"]
    out = folder / f"{name}_{fmt}.h5"
    result = runner.invoke(app, [str(a) for a in ["compute", *source, folder / "x.npy",
                                                  "--dtype", "float64", "-q", "-o", out]])
    assert result.exit_code == 0, result.output
    x = torch.from_numpy(np.load(folder / "x.npy"))
    expected = reference_jacobian(model.double(), x).numpy()
    with jaccli.open_results(out) as results:
        got = results.jacobian("end_to_end")
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < 1e-10, (name, fmt, error)


def test_the_command_prints_no_library_warnings(folder):
    """torch's vmap fallback for the fused CPU LSTM kernel warns in C++ and export warns in
    Python; `jaccli` keeps both off its stderr (JACCLI_DEBUG=1 lets them through)."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    model = _model(folder, "lstm")
    program = torch.export.export(model, (torch.randn(2, 6, 4),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "quiet.pt2")
    np.save(folder / "x32.npy", np.load(folder / "x.npy").astype(np.float32))
    env = {k: v for k, v in os.environ.items()
           if k not in ("JACCLI_DEBUG", "TORCH_CPP_LOG_LEVEL", "PYTHONWARNINGS")}
    done = subprocess.run([sys.executable, "-m", "jaccli", "compute", str(folder / "quiet.pt2"),
                           str(folder / "x32.npy"), "-o", str(folder / "quiet.h5"), "-q"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-500:]
    # the same run with JACCLI_DEBUG=1: torch's warnings are there to be kept off
    loud = subprocess.run([sys.executable, "-m", "jaccli", "compute", str(folder / "quiet.pt2"),
                           str(folder / "x32.npy"), "-o", str(folder / "loud.h5"), "-q"],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**env, "JACCLI_DEBUG": "1"}, timeout=300)
    assert loud.returncode == 0 and "Warning" in loud.stderr, loud.stderr[-500:]
    with jaccli.open_results(folder / "quiet.h5") as results:
        got = results.jacobian("end_to_end")
    x = torch.from_numpy(np.load(folder / "x.npy"))
    expected = reference_jacobian(model.double(), x).numpy()
    assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5
