"""Cases that used to print wrong numbers with exit 0: batch-mixing and random models,
per-sample extra arguments guessed from their size, silently coerced targets, NaN taken as
"the same", infinite condition numbers passing `--max-cond inf`, unsliced vectors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import jaccli

from ..conftest import reference_jacobian
from .crafted import assert_one_error, invoke


class Gate(nn.Module):
    def forward(self, x, table):
        return torch.tanh(x @ table.T)


class WithBuffer(nn.Module):
    """A leaf module gets a (3, 2) buffer as a second argument: not per-sample, even when a
    batch has 3 rows (main sliced it row by row then: wrong numbers)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.gate = Gate()
        self.register_buffer("table", torch.arange(6.0).reshape(3, 2) / 6)

    def forward(self, x):
        return self.gate(self.lin(x), self.table)


FACTORIES = '''
import torch
from torch import nn


class MixesLargeBatches(nn.Module):
    """Mixes rows only in batches of more than 4 samples: a check on 4 rows cannot see it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(0, keepdim=True) + h if x.shape[0] > 4 else h + h


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x) + torch.rand(x.shape[0], 2)
'''


@pytest.fixture
def arch(tmp_path):
    (tmp_path / "wrongs.py").write_text(FACTORIES)
    return tmp_path


def _save(arch, name, path):
    namespace = {}
    exec(FACTORIES, namespace)
    torch.save(namespace[name]().state_dict(), path)
    return path


def test_rows_mixed_only_in_large_batches_are_refused_at_the_run_batch_size(arch, tmp_path):
    x = np.repeat(np.random.default_rng(0).normal(size=(1, 3)), 8, axis=0)  # repeated rows
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    model = _save(arch, "MixesLargeBatches", tmp_path / "m.pt")
    result = invoke("compute", model, tmp_path / "x.npy", "--arch", "wrongs:MixesLargeBatches",
                    "--arch-path", arch, "--batch-size", "8", "-o", tmp_path / "out.h5")
    assert_one_error(result, says="changes with the other samples in its batch")
    assert not (tmp_path / "out.h5").exists()
    # The same model at batch size 4 never mixes rows: its per-sample Jacobians are right.
    ok = invoke("compute", model, tmp_path / "x.npy", "--arch", "wrongs:MixesLargeBatches",
                "--arch-path", arch, "--batch-size", "4", "-q")
    assert ok.exit_code == 0, ok.output


def test_a_random_model_is_refused_as_not_deterministic(arch, tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32))
    result = invoke("compute", _save(arch, "Noisy", tmp_path / "m.pt"), tmp_path / "x.npy",
                    "--arch", "wrongs:Noisy", "--arch-path", arch)
    assert_one_error(result, says="not deterministic")


def test_a_buffer_argument_is_not_taken_for_per_sample_data(tmp_path):
    torch.manual_seed(0)
    model = WithBuffer().double().eval()
    x = torch.randn(3, 2, dtype=torch.float64)  # three rows, like the buffer
    jac = jaccli.layer_jacobians(model, x)["gate"]
    pre = model.lin(x)
    expected = reference_jacobian(lambda h: torch.tanh(h @ model.table.T), pre)
    torch.testing.assert_close(jac, expected)


@pytest.fixture
def classifier(tmp_path, mlp):
    from ..conftest import MLP_SPEC

    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "m.safetensors")  # 6 -> 3 outputs
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32))
    return tmp_path


@pytest.mark.parametrize(("loss", "targets", "says"), [
    ("cross-entropy", np.array([0.0, 1.5, 2.0, 1.0]), "whole-number class indices"),
    ("nll", np.array([0, 1, 3, 2]), "class target 3 is out of range: the model has 3 classes"),
    ("cross-entropy", np.array([0, -1, 2, 1]), "class target -1 is out of range"),
    ("mse", np.zeros(4), "one target per output entry"),
    ("bce-logits", np.full((4, 3), 2.0), "targets in [0, 1]"),
    ("cross-entropy", np.zeros((4, 3)), "one class index per sample"),
])
def test_targets_that_would_be_coerced_are_refused(classifier, loss, targets, says):
    np.save(classifier / "y.npy", targets)
    for command in (["compute", "--wrt", "params"], ["hessian"]):
        result = invoke(command[0], classifier / "m.safetensors", classifier / "x.npy",
                        *command[1:], "--loss", loss, "--targets", classifier / "y.npy")
        assert_one_error(result, says=says)


def test_vectors_follow_offset_and_limit(classifier, mlp):
    v = np.random.default_rng(2).normal(size=(4, 6))
    np.save(classifier / "v.npy", v)
    result = invoke("jvp", classifier / "m.safetensors", classifier / "x.npy", "--vectors",
                    classifier / "v.npy", "--offset", "1", "--limit", "2", "--dtype", "float64",
                    "-o", classifier / "p.h5", "-q")
    assert result.exit_code == 0, result.output
    x = torch.from_numpy(np.load(classifier / "x.npy")).double()
    jac = reference_jacobian(mlp.double(), x)
    expected = torch.einsum("nij,nj->ni", jac[1:3], torch.from_numpy(v[1:3]))
    with h5py.File(classifier / "p.h5") as f:
        np.testing.assert_allclose(f["products/product/product"][:], expected.numpy(),
                                   rtol=1e-10)


def test_nan_in_either_run_is_a_difference(classifier):
    for name in ("a", "b"):
        assert invoke("compute", classifier / "m.safetensors", classifier / "x.npy", "-q",
                      "--store", "dense", "-o", classifier / f"{name}.h5").exit_code == 0
    with h5py.File(classifier / "b.h5", "a") as f:
        f["end_to_end/jacobian"][2, 0, 0] = np.nan
    result = invoke("diff", classifier / "a.h5", classifier / "b.h5", "--json")
    assert result.exit_code == 1, result.output
    layer = next(r for r in json.loads(result.stdout)["layers"] if r["name"] == "(end-to-end)")
    assert layer["changed"] and layer["metrics"]["jacobian_max_rel_difference"][
        "rel_change"] is None


def test_an_infinite_condition_number_never_passes(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU()).eval()
    with torch.no_grad():
        model[0].bias.fill_(-10.0)  # every ReLU off: a zero Jacobian, condition number inf
    jaccli.save_model(model, {"format": "jaccli-arch", "version": 1, "model": {
        "type": "Sequential", "children": [{"type": "Linear", "args": [3, 3]},
                                           {"type": "ReLU"}]}}, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.zeros((3, 3), np.float32))
    result = invoke("check", tmp_path / "m.safetensors", tmp_path / "x.npy", "--max-cond",
                    "inf", "--layers", "1", "--json")
    assert result.exit_code == 1, result.output
    (only,) = json.loads(result.stdout)["checks"]
    assert only["value"] == "inf" and not only["passed"]  # inf, written "inf" in JSON


def test_unconverged_lanczos_values_make_check_exit_5(tmp_path):
    spec = {"format": "jaccli-arch", "version": 1, "model": {"type": "Sequential", "children": [
        {"type": "Linear", "args": [4, 4]}, {"type": "Softmax", "kwargs": {"dim": 1}}]}}
    jaccli.save_model(jaccli.build_model(spec).eval(), spec, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(3, 4, 4)))
    spectra = tmp_path / "s.h5"
    # A softmax over the middle axis has no structured rule: its 16 x 16 Jacobian is dense,
    # --top-k 2 sends it to Lanczos, and 2 Krylov vectors cannot resolve its top values.
    made = invoke("spectrum", tmp_path / "m.safetensors", tmp_path / "x.npy", "--top-k", "2",
                  "--max-steps", "2", "--layers", "1", "--no-end-to-end", "-o", spectra, "-q")
    assert made.exit_code == 0, made.output
    with h5py.File(spectra) as f:
        assert f["layers/1"].attrs["method"] == "lanczos"
        assert not f["layers/1/converged"][:].all()
    result = invoke("check", spectra, "--max-spectral-norm", "1e9", "--json")
    assert result.exit_code == 5, result.output
    document = json.loads(result.stdout)
    assert document["unverified"][0]["layer"] == "1" and not document["passed"]
    table = invoke("spectrum", tmp_path / "m.safetensors", tmp_path / "x.npy", "--top-k", "2",
                   "--max-steps", "2", "--layers", "1", "--no-end-to-end")
    assert "UNCONVERGED" in table.stdout and "not trustworthy" in table.stdout
