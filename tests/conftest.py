"""Shared fixtures: small seeded models in every file format, and the float64 reference."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per test worker, inherited by the jaccli processes tests start: the workers
    # already fill the cores, and idle OpenMP threads spinning beside them cost more than
    # they give on the small tensors of tests.
    os.environ["OMP_NUM_THREADS"] = "1"
    # xdist passes its terminal's width to workers as COLUMNS; tests that want a width set it.
    os.environ.pop("COLUMNS", None)
# Graphs the tests capture are cached in a folder of this test process (and the jaccli
# processes it starts), never in the user's cache; removed when the process ends.
os.environ["JACCLI_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaccli-test-graphs-")
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import jaccli

atexit.register(shutil.rmtree, os.environ["JACCLI_CACHE_DIR"], ignore_errors=True)

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"

MLP_SPEC = {
    "format": "jaccli-arch", "version": 1, "input_shape": [6],
    "model": {"type": "Sequential", "children": [
        {"type": "Linear", "args": [6, 5]}, {"type": "Tanh"},
        {"type": "Linear", "args": [5, 4]}, {"type": "Sigmoid"},
        {"type": "Linear", "args": [4, 3]},
    ]},
}

CNN_SPEC = {
    "format": "jaccli-arch", "version": 1, "input_shape": [2, 6, 6],
    "model": {"type": "Sequential", "children": {
        "features": {"type": "Sequential", "children": [
            {"type": "Conv2d", "args": [2, 3, 3], "kwargs": {"padding": 1}},
            {"type": "BatchNorm2d", "args": [3]}, {"type": "ReLU"},
            {"type": "MaxPool2d", "args": [2]},
        ]},
        "flatten": {"type": "Flatten"},
        "head": {"type": "Sequential", "children": [
            {"type": "Linear", "args": [27, 5]}, {"type": "GELU"},
            {"type": "Linear", "args": [5, 3]},
        ]},
    }},
}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    np.random.seed(0)


def randomized(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, then switch to eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def reference_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: `autograd.functional.jacobian` looped over samples, float64.

    fn maps a batch (B, *in) to (B, *out); returns (N, D_out, D_in).
    """
    x = x.double()
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v.unsqueeze(0))[0], xi)
        out.append(jac.reshape(-1, xi.numel()))
    return torch.stack(out)


class TwoBranch(nn.Module):
    """Not a chain: a residual connection and a shared activation used twice."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
        self.act = nn.Tanh()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.act(self.inner(x))
        return self.out(self.act(h + x))


FACTORY_SOURCE = '''
import torch.nn as nn

def make_mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(),
                         nn.Linear(4, 3))
'''


@pytest.fixture
def mlp() -> nn.Module:
    return randomized(jaccli.build_model(MLP_SPEC))


@pytest.fixture
def cnn() -> nn.Module:
    return randomized(jaccli.build_model(CNN_SPEC))


@pytest.fixture
def model_files(tmp_path: Path, mlp: nn.Module) -> dict[str, dict]:
    """The MLP saved in every supported format: name -> {path, kwargs for load_model}."""
    files: dict[str, dict] = {}
    spec_path = tmp_path / "mlp_spec.json"
    spec_path.write_text(json.dumps(MLP_SPEC))

    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "self.safetensors")
    files["self-describing safetensors"] = {"path": tmp_path / "self.safetensors", "kwargs": {}}

    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()},
              tmp_path / "plain.safetensors")
    files["plain safetensors + spec"] = {"path": tmp_path / "plain.safetensors",
                                         "kwargs": {"arch": str(spec_path)}}

    torch.save(mlp.state_dict(), tmp_path / "state.pt")
    files["state_dict + spec"] = {"path": tmp_path / "state.pt", "kwargs": {"arch": str(spec_path)}}

    pkg = tmp_path / "archs"
    pkg.mkdir()
    (pkg / "my_factories.py").write_text(FACTORY_SOURCE)
    torch.save({"epoch": 3, "state_dict": mlp.state_dict()}, tmp_path / "checkpoint.pth")
    files["checkpoint + import string"] = {
        "path": tmp_path / "checkpoint.pth",
        "kwargs": {"arch": "my_factories:make_mlp", "arch_path": str(pkg)}}

    torch.jit.save(torch.jit.script(mlp), tmp_path / "scripted.pt")
    files["torchscript"] = {"path": tmp_path / "scripted.pt", "kwargs": {}}

    batch = torch.export.Dim("batch")
    program = torch.export.export(mlp, (torch.randn(2, 6),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "exported.pt2")
    files["torch.export"] = {"path": tmp_path / "exported.pt2", "kwargs": {}}

    torch.save(mlp, tmp_path / "whole.pt")
    files["pickled module (trusted)"] = {"path": tmp_path / "whole.pt",
                                         "kwargs": {"trust_pickle": True}}
    return files
