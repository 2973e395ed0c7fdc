"""The `convolution` encoding: a layer that is one convolution of a fixed weight is stored as
its kernel and geometry, and every reader rebuilds the exact Jacobian — the dense view
against the float64 autograd Jacobian per sample (1-3d, strided, padded, dilated, grouped,
depthwise, transposed), `spectrum FILE` against svdvals of it (one SVD, and the Lanczos
route), shards merged with the kernel once, `diff` and `check`, and the planner's sizes."""

import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from jaccli import open_results
from jaccli.cli import app
from jaccli.errors import ResultsFormatError
from jaccli.io.results import encoding, stored_bytes
from jaccli.pipelines import spectrum_file

runner = CliRunner()

# (name, layer, per-sample input shape)
CASES = [
    ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (4, 11)),
    ("conv2d", lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2),
                                 dilation=(1, 2), groups=2), (4, 7, 6)),
    ("depthwise", lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3), (3, 5, 5)),
    ("conv3d", lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(0, 1, 1), dilation=2),
     (2, 4, 5, 4)),
    ("valid", lambda: nn.Conv2d(2, 3, 3, padding="valid"), (2, 6, 5)),
    ("transposed1d", lambda: nn.ConvTranspose1d(4, 2, 3, stride=2, padding=1,
                                                output_padding=1, groups=2), (4, 5)),
    ("transposed2d", lambda: nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1,
                                                dilation=2, groups=2), (6, 4, 5)),
    ("transposed3d", lambda: nn.ConvTranspose3d(2, 3, 2, stride=2), (2, 2, 3, 2)),
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def export(model, in_shape, path):
    program = torch.export.export(model, (torch.randn(2, *in_shape, dtype=torch.float64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, path)


def autograd_jacobian(layer, x: np.ndarray) -> np.ndarray:
    """`(D_out, D_in)` of `layer` at one sample x, float64 autograd."""
    v = torch.from_numpy(x)
    jac = torch.autograd.functional.jacobian(lambda a: layer(a[None])[0], v)
    return jac.reshape(-1, v.numel()).numpy()


def computed(tmp_path, make, in_shape, *extra, n=3):
    torch.manual_seed(0)
    model = nn.Sequential(make(), nn.Tanh()).double().eval()
    export(model, in_shape, tmp_path / "m.pt2")
    x = np.random.default_rng(1).normal(size=(n, *in_shape))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "jac.h5"
    result = invoke("compute", tmp_path / "m.pt2", tmp_path / "x.npy", "--dtype", "float64",
                    "-o", out, *extra)
    assert result.exit_code == 0, result.output
    return model, x, out


@pytest.mark.parametrize(("name", "make", "in_shape"), CASES, ids=[c[0] for c in CASES])
def test_dense_view_is_the_autograd_jacobian(tmp_path, name, make, in_shape):
    model, x, out = computed(tmp_path, make, in_shape, "--no-end-to-end")
    with h5py.File(out) as f:
        group = f["layers/0"]
        assert group.attrs["encoding"] == "convolution"
        assert set(group) == {"kernel", "frobenius"}  # no matrix
        np.testing.assert_array_equal(group["kernel"][:], model[0].weight.detach().numpy())
        assert bool(group.attrs["transposed"]) == name.startswith("transposed")
    with open_results(out) as results:
        view = results.layer("0").jacobian
        for i in range(len(x)):
            expected = autograd_jacobian(model[0], x[i])
            got = view[i]
            assert got.shape == expected.shape
            assert np.abs(got - expected).max() <= 1e-10 * np.abs(expected).max(), name
        np.testing.assert_allclose(results.layer("0")["frobenius"][:],
                                   np.linalg.norm(expected), rtol=1e-10)


def test_dense_store_and_the_planner(tmp_path):
    """`--store dense` keeps dense matrices; the plan sizes a convolution by its kernel."""
    make, in_shape = CASES[1][1], CASES[1][2]
    model, x, out = computed(tmp_path, make, in_shape, "--store", "dense", "--no-end-to-end")
    with open_results(out) as results:
        assert results.layer("0").encoding == "dense"
        np.testing.assert_allclose(results.layer("0")["jacobian"][0],
                                   autograd_jacobian(model[0], x[0]), rtol=1e-12, atol=1e-14)
    result = invoke("compute", tmp_path / "m.pt2", tmp_path / "x.npy", "--dtype", "float64",
                    "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    plan = plan.get("plan", plan)
    conv = next(e for e in plan["entries"] if e["name"] == "0")
    assert conv["bytes_per_sample"] == 0
    assert conv["shared_bytes"] == model[0].weight.numel() * 8
    assert stored_bytes("shared-operator", 10, 20, 4, kernel=30) == (0, 120)
    assert stored_bytes("shared-operator", 10, 20, 4) == (0, 800)  # not one convolution
    assert stored_bytes("shared-operator", 10, 20, 4, "dense", kernel=30) == (800, 0)


def _conv_arrays(**change):
    arrays = {"kernel": np.ones((6, 2, 3, 3)), "stride": np.array([2, 2]),
              "padding": np.array([1, 1]), "dilation": np.array([1, 1]),
              "groups": np.array(2), "transposed": np.array(False),
              "output_padding": np.array([0, 0]), "input_shape": np.array([4, 7, 7]),
              "output_shape": np.array([6, 4, 4])}
    return arrays | change


def test_codec_refuses_inconsistent_geometry():
    conv = encoding("convolution")
    assert conv.densify(_conv_arrays(), 96, 196).shape == (1, 96, 196)
    for bad in ({"groups": np.array(3)}, {"output_shape": np.array([6, 5, 4])},
                {"kernel": np.ones((6, 4, 3, 3))}, {"stride": np.array([2])}):
        arrays = _conv_arrays(**bad)
        d_out = int(np.prod(arrays["output_shape"]))
        with pytest.raises(ResultsFormatError, match="convolution"):
            conv.densify(arrays, d_out, 196)
    with pytest.raises(ResultsFormatError, match="missing attribute"):
        conv.densify({k: v for k, v in _conv_arrays().items() if k != "dilation"}, 96, 196)


@pytest.mark.parametrize("route", ["svd", "lanczos"])
@pytest.mark.parametrize("case", [1, 6], ids=["conv2d", "transposed2d"])
def test_spectrum_of_file_is_svdvals_of_the_autograd_jacobian(tmp_path, monkeypatch, route,
                                                              case):
    _, make, in_shape = CASES[case]
    model, x, out = computed(tmp_path, make, in_shape, "--no-end-to-end")
    if route == "lanczos":  # every stored convolution too large for one SVD
        monkeypatch.setattr(spectrum_file, "MAX_SHARED_SVD_COST", 0)
    spec = tmp_path / "spec.h5"
    args = ["--top-k", "4"] if route == "lanczos" else []
    result = invoke("spectrum", out, "--layers", "0", "-o", spec, "--json", *args)
    assert result.exit_code == 0, result.output
    expected = np.linalg.svd(autograd_jacobian(model[0], x[0]), compute_uv=False)
    with h5py.File(spec) as f:
        group = f["layers/0"]
        if route == "lanczos":
            assert group.attrs["method"] == "lanczos"
            values = group["top_singular_values"][:]
            np.testing.assert_allclose(values, np.broadcast_to(expected[:4], (3, 4)),
                                       rtol=1e-6, atol=1e-8 * expected[0])
        else:
            values = group["singular_values"][:]
            np.testing.assert_allclose(values, np.broadcast_to(expected, values.shape),
                                       rtol=1e-10, atol=1e-12 * expected[0])
        np.testing.assert_allclose(group["frobenius"][:], np.linalg.norm(expected),
                                   rtol=1e-10)


def test_merged_shards_keep_the_kernel_once(tmp_path):
    _, make, in_shape = CASES[2]
    model, x, whole = computed(tmp_path, make, in_shape, n=5)
    parts = []
    for i in range(2):
        part = tmp_path / f"part-{i}.h5"
        result = invoke("compute", tmp_path / "m.pt2", tmp_path / "x.npy", "--dtype",
                        "float64", "-o", part, "--shard", f"{i}/2")
        assert result.exit_code == 0, result.output
        parts.append(part)
    for copy in ([], ["--copy"]):
        merged = tmp_path / f"merged{len(copy)}.h5"
        result = invoke("merge", *parts, "-o", merged, *copy)
        assert result.exit_code == 0, result.output
        with h5py.File(merged) as f:
            kernel = f["layers/0/kernel"]
            assert not kernel.is_virtual and kernel.shape == tuple(model[0].weight.shape)
            assert f["layers/0"].attrs["encoding"] == "convolution"
        with open_results(merged) as a:
            got = np.asarray(a.layer("0").jacobian)
        for i in range(len(x)):
            np.testing.assert_allclose(got[i], autograd_jacobian(model[0], x[i]), rtol=1e-12,
                                       atol=1e-14)
        result = invoke("diff", whole, merged, "--json")
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)
        assert "0" in json.dumps(rows)
    result = invoke("show", merged, "--layer", "0", "--sample", 3, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["encoding"] == "convolution"
    np.testing.assert_allclose(np.asarray(shown["jacobian"]),
                               autograd_jacobian(model[0], x[3]), rtol=1e-12, atol=1e-14)
    expected = np.linalg.norm(autograd_jacobian(model[0], x[0]))
    selected = ["--layers", "0"]
    result = invoke("check", merged, "--max-frobenius", expected * 1.001, "--json", *selected)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checks"][0]["layer"] == "0"
    result = invoke("check", merged, "--max-frobenius", expected * 0.999, *selected)
    assert result.exit_code == 1, result.output
