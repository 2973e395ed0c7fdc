"""The HDF5 writer and reader (layout: docs/FORMAT.md)."""

import shutil
import subprocess

import h5py
import numpy as np
import pytest
import torch

import jaccli
from jaccli.errors import ResultsFormatError
from jaccli.io.results.writer import CHUNK_BYTES, FORMAT_VERSION, ResultsWriter, chunk_shape
from jaccli.pipelines.compute import run_compute
from jaccli.settings import ComputeSettings

from .conftest import MLP_SPEC, reference_jacobian

compute_settings = ComputeSettings.from_options


@pytest.fixture
def written(tmp_path, mlp):
    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "mlp.safetensors")
    x = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float64)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "jac.h5"
    config = compute_settings(model=tmp_path / "mlp.safetensors", data=tmp_path / "x.npy",
                           output=out, dtype="float64", batch_size=3, offset=1,
                           command_line="jaccli compute test")
    summary = run_compute(config)
    return out, x[1:], summary, mlp


def test_layout_matches_the_format_spec(written):
    out, x, _, _ = written
    with h5py.File(out, "r") as f:
        assert f.attrs["format"] == "jaccli-results"
        assert f.attrs["format_version"] == FORMAT_VERSION
        assert f.attrs["kind"] == "jacobians" and bool(f.attrs["complete"])
        for key in ("jaccli_version", "torch_version", "command", "device", "dtype",
                    "model_sha256", "data_sha256", "created", "model_format"):
            assert key in f.attrs, key
        assert f.attrs["dtype"] == "float64" and f.attrs["command"] == "jaccli compute test"
        assert len(f.attrs["model_sha256"]) == 64
        np.testing.assert_array_equal(f["samples/index"], np.arange(1, 7))
        assert list(f["layers"]) == ["0", "1", "2", "3", "4"]
        group = f["layers/2"]
        assert group.attrs["type"] == "Linear" and group.attrs["order"] == 2
        assert group.attrs["encoding"] == "shared" and group.attrs["rule"] == "linear"
        np.testing.assert_array_equal(group.attrs["input_shape"], [5])
        assert group["matrix"].shape == (4, 5)  # W, once for all samples
        tanh = f["layers/1"]
        assert tanh.attrs["encoding"] == "diagonal"
        ds = tanh["diagonal"]
        assert ds.shape == (6, 5) and ds.maxshape == (None, 5) and ds.chunks is not None
        assert f["end_to_end"].attrs["encoding"] == "dense"
        assert f["end_to_end/jacobian"].shape == (6, 3, 6)


def test_values_match_reference_and_reader(written):
    out, x, summary, mlp = written
    with jaccli.open_results(out) as results:
        assert results.n_samples == 6
        assert [g.name for g in results.layers] == ["0", "1", "2", "3", "4"]
        e2e = results.jacobian("end_to_end")
        expected = reference_jacobian(mlp.double(), torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(e2e, expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(results.end_to_end["frobenius"][:],
                                   np.linalg.norm(expected, axis=(1, 2)), rtol=1e-10)
        np.testing.assert_array_equal(results.layer("0").jacobian[3], mlp[0].weight.detach())
        tanh_in = (torch.from_numpy(x) @ mlp[0].weight.double().T + mlp[0].bias.double()).detach()
        tanh = results.layer("1").jacobian
        assert tanh.shape == (6, 5, 5)
        np.testing.assert_allclose(tanh[[4, 1]], torch.diag_embed(
            1 - torch.tanh(tanh_in[[4, 1]]) ** 2).numpy(), rtol=1e-12)
    assert summary.entries[-1].frobenius_max == pytest.approx(
        np.linalg.norm(expected, axis=(1, 2)).max())


def test_no_layers_means_no_layers_group_and_the_file_still_reads(tmp_path, mlp):
    """--no-layers writes no empty /layers group; files with one (older jaccli) still read."""
    from jaccli.reports.show import summarize_file

    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "mlp.safetensors")
    x = np.random.default_rng(1).normal(size=(4, 6))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "e2e.h5"
    run_compute(compute_settings(model=tmp_path / "mlp.safetensors", data=tmp_path / "x.npy",
                                 output=out, dtype="float64", include_layers=False))
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["end_to_end", "samples"]
    older = tmp_path / "older.h5"
    shutil.copy(out, older)
    with h5py.File(older, "a") as f:
        f.create_group("layers")
    expected = reference_jacobian(mlp.double(), torch.from_numpy(x)).numpy()
    for path in (out, older):
        with jaccli.open_results(path) as results:
            assert results.layers == [] and [g.name for g in results.groups()] == [
                "(end-to-end)"]
            np.testing.assert_allclose(results.jacobian("end_to_end"), expected, rtol=1e-10,
                                       atol=1e-12)
        kind, summary = summarize_file(path)
        assert kind == "jacobians" and [e.name for e in summary.entries] == ["(end-to-end)"]


def test_reader_refuses_foreign_incomplete_and_future_files(tmp_path, written):
    out = written[0]
    future = tmp_path / "future.h5"
    shutil.copy(out, future)
    with h5py.File(future, "a") as f:
        f.attrs["format_version"] = "2.0"
    with pytest.raises(ResultsFormatError, match="format version 2.0; this jaccli reads 1.x"):
        jaccli.open_results(future)
    with h5py.File(future, "a") as f:
        f.attrs["format_version"] = "1.7"  # newer minor versions stay readable
    jaccli.open_results(future).close()
    with h5py.File(future, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(ResultsFormatError, match="incomplete"):
        jaccli.open_results(future)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(ResultsFormatError, match="not a jaccli results file"):
        jaccli.open_results(tmp_path / "other.h5")


def test_failed_run_leaves_no_file(tmp_path):
    out = tmp_path / "r.h5"
    with pytest.raises(RuntimeError), ResultsWriter(out, kind="jacobians",
                                                   sample_index=np.arange(3), attrs={}):
        assert any(p.name.startswith(".r.h5.partial-") for p in tmp_path.iterdir())
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_chunks_stay_near_one_mebibyte():
    assert chunk_shape((100, 10, 10), 4) == (100, 10, 10)
    assert chunk_shape((10_000, 64, 64), 4) == (64, 64, 64)
    big = chunk_shape((5, 1024, 1024), 4)
    assert big == (1, 256, 1024) and np.prod(big) * 4 == CHUNK_BYTES


def test_compression_is_optional(tmp_path, mlp):
    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.zeros((4, 6), dtype=np.float32))
    for compression in ("gzip", "lzf"):
        out = tmp_path / f"{compression}.h5"
        run_compute(compute_settings(model=tmp_path / "m.safetensors", data=tmp_path / "x.npy",
                                  output=out, compression=compression))
        with h5py.File(out) as f:
            assert f["layers/1/diagonal"].compression == compression


@pytest.mark.skipif(shutil.which("h5ls") is None or shutil.which("h5dump") is None,
                    reason="hdf5-tools (h5ls, h5dump) not installed")
def test_readable_by_hdf5_command_line_tools(written):
    out = written[0]
    listing = subprocess.run(["h5ls", "-r", str(out)], capture_output=True, text=True, check=True)
    assert "/layers/0/matrix" in listing.stdout and "Dataset {6/Inf, 3, 6}" in listing.stdout
    dump = subprocess.run(["h5dump", "-a", "/format_version", str(out)], capture_output=True,
                          text=True, check=True)
    assert f'"{FORMAT_VERSION}"' in dump.stdout


def test_dense_store_matches_compact_store(tmp_path, cnn):
    from .conftest import CNN_SPEC

    jaccli.save_model(cnn, CNN_SPEC, tmp_path / "cnn.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(2).normal(size=(5, 2, 6, 6)))
    for store in ("compact", "dense"):
        run_compute(compute_settings(model=tmp_path / "cnn.safetensors", data=tmp_path / "x.npy",
                                  output=tmp_path / f"{store}.h5", store=store, dtype="float64",
                                  granularity="block", batch_size=2))
    with jaccli.open_results(tmp_path / "compact.h5") as compact, \
            jaccli.open_results(tmp_path / "dense.h5") as dense:
        encodings = [g.encoding for g in compact.groups()]
        assert encodings == ["row-scaled", "selection", "shared-diagonal", "row-scaled",
                             "shared", "dense"]
        assert {g.encoding for g in dense.groups()} == {"dense"}
        for a, b in zip(compact.groups(), dense.groups(), strict=True):
            np.testing.assert_allclose(np.asarray(a.jacobian), b["jacobian"][:], rtol=1e-12,
                                       atol=1e-14, err_msg=a.name)
            np.testing.assert_allclose(a["frobenius"][:], b["frobenius"][:], rtol=1e-12)
    assert (tmp_path / "compact.h5").stat().st_size < (tmp_path / "dense.h5").stat().st_size


@pytest.mark.parametrize(("compression", "filter_name"), [("none", None), ("gzip", "gzip")])
def test_shared_operator_matrix_is_streamed_and_convolution_stored_as_kernel(
        tmp_path, compression, filter_name):
    """A pooling's shared operator is written band by band (never formed whole) as the
    documented `shared` matrix; a convolution as its kernel and geometry (`convolution`):
    both read back equal to the autograd Jacobian, with ‖J‖_F."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1),
                                torch.nn.Tanh(), torch.nn.AvgPool2d(2)).double().eval()
    program = torch.export.export(model, (torch.randn(2, 2, 7, 7, dtype=torch.float64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "conv.pt2")
    x = np.random.default_rng(5).normal(size=(5, 2, 7, 7))
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "jac.h5"
    run_compute(compute_settings(model=tmp_path / "conv.pt2", data=tmp_path / "x.npy",
                                 output=out, dtype="float64", batch_size=2,
                                 compression=compression, end_to_end=False))
    conv, pool = model[0], model[2]
    expected = torch.autograd.functional.jacobian(
        lambda v: conv(v[None])[0], torch.from_numpy(x[0])).reshape(3 * 4 * 4, 2 * 7 * 7)
    pooled = torch.autograd.functional.jacobian(
        lambda v: pool(v[None])[0], torch.zeros(3, 4, 4, dtype=torch.float64)).reshape(12, 48)
    with h5py.File(out) as f:
        group = f["layers/0"]
        assert group.attrs["encoding"] == "convolution" and "matrix" not in group
        np.testing.assert_array_equal(group["kernel"][:], conv.weight.detach().numpy())
        assert list(group.attrs["stride"]) == [2, 2] and list(group.attrs["padding"]) == [1, 1]
        np.testing.assert_allclose(group["frobenius"][:],
                                   np.full(5, float(expected.norm())), rtol=1e-12)
        group = f["layers/2"]
        assert group.attrs["encoding"] == "shared"
        assert group["matrix"].shape == (12, 48)
        assert group["matrix"].compression == filter_name
        np.testing.assert_allclose(group["matrix"][:], pooled.numpy(), rtol=1e-12, atol=1e-14)
    with jaccli.open_results(out) as results:
        np.testing.assert_allclose(np.asarray(results.layer("0").jacobian),
                                   np.broadcast_to(expected.numpy(), (5, 48, 98)), rtol=1e-12,
                                   atol=1e-14)
