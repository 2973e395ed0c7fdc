"""Options that must work or be refused, usage errors on one line, damaged results files,
and a closed stdout."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from .crafted import assert_one_error, invoke


@pytest.fixture
def jacobians(work):
    out = work / "jac.h5"
    result = invoke("compute", work / "mlp.safetensors", work / "x.npy", "-q", "--dtype",
                    "float64", "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("option", [["--arch", "spec.json"], ["--trust-pickle"],
                                    ["--granularity", "block"], ["--key", "x"]])
def test_model_options_with_a_results_file_are_refused(jacobians, option):
    for command in ("spectrum", "check"):
        bound = ["--max-spectral-norm", "9"] if command == "check" else []
        result = invoke(command, jacobians, *option, *bound)
        assert_one_error(result, code=2, says="only apply when running a model")


def test_selection_options_apply_to_a_results_file(jacobians):
    result = invoke("spectrum", jacobians, "--layers", "0", "--layers", "2", "--offset", "1",
                    "--limit", "3", "--no-end-to-end", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [e["name"] for e in document["entries"]] == ["0", "2"]
    assert document["n_samples"] == 3 and document["dtype"] == "float64"
    single = invoke("spectrum", jacobians, "--no-layers", "--dtype", "float32", "--json")
    assert [e["name"] for e in json.loads(single.stdout)["entries"]] == ["(end-to-end)"]
    assert json.loads(single.stdout)["dtype"] == "float32"


def test_spectrum_of_a_results_file_matches_svdvals_of_the_float64_reference(work, jacobians):
    """Independent of jaccli's decompositions: NumPy's SVD of autograd Jacobians."""
    import torch

    import jaccli

    from ..conftest import reference_jacobian

    model = jaccli.load_model(work / "mlp.safetensors").module.double()
    x = torch.from_numpy(np.load(work / "x.npy")).double()
    out = work / "s.h5"
    assert invoke("spectrum", jacobians, "-o", out, "-q").exit_code == 0
    inputs = {"0": x}
    for i in range(1, len(model)):
        inputs[str(i)] = model[:i](x)
    with h5py.File(out) as f:
        for name, layer_input in inputs.items():
            expected = np.linalg.svd(
                reference_jacobian(model[int(name)], layer_input).numpy(), compute_uv=False)
            np.testing.assert_allclose(f[f"layers/{name}/singular_values"][:], expected,
                                       rtol=1e-9, atol=1e-12, err_msg=name)
        end_to_end = np.linalg.svd(reference_jacobian(model, x).numpy(), compute_uv=False)
        np.testing.assert_allclose(f["end_to_end/singular_values"][:], end_to_end, rtol=1e-9)


@pytest.mark.parametrize(("args", "says"), [
    (["--compression-level", "3"], "--compression-level goes with --compression gzip"),
    (["--compression", "lzf", "--compression-level", "3"], "goes with --compression gzip"),
    (["--no-layers", "--layers", "0"], "--layers and --no-layers exclude each other"),
    (["-o", "-"], "-o - is not supported"),
])
def test_contradictory_options_are_usage_errors(work, args, says):
    result = invoke("compute", work / "mlp.safetensors", work / "x.npy", *args)
    assert_one_error(result, code=2, says=says)
    assert not (work / "-").exists()


@pytest.mark.parametrize("tol", ["nan", "inf", "0", "-1e-3"])
def test_tol_must_be_finite_and_positive(work, tol):
    result = invoke("spectrum", work / "mlp.safetensors", work / "x.npy", "--tol", tol)
    assert_one_error(result, code=2, says="--tol must be a finite number above 0")


def test_parser_errors_are_one_line(work):
    assert_one_error(invoke("compute", work / "mlp.safetensors"), code=2,
                     says="Missing argument")
    assert_one_error(invoke("compute", "a", "b", "--dtype", "float16"), code=2,
                     says="'float16' is not one of")
    assert_one_error(invoke("spectrum", "a", "--frobnicate"), code=2, says="No such option")


def _damage(path, how):
    with h5py.File(path, "a") as f:
        if how == "missing dataset":
            del f["layers/1/diagonal"]
        elif how == "short dataset":
            data = f["layers/1/diagonal"][:2]
            del f["layers/1/diagonal"]
            f["layers/1/diagonal"] = data
        elif how == "no samples":
            del f["samples"]
        elif how == "out-of-range selection":
            f["layers/1"].attrs["encoding"] = "selection"
            del f["layers/1/diagonal"]
            f["layers/1/selection"] = np.full((5, 5), 99, dtype=np.int64)
        elif how == "unknown encoding":
            f["layers/1"].attrs["encoding"] = "zigzag"


@pytest.mark.parametrize("how", ["missing dataset", "short dataset", "no samples",
                                 "out-of-range selection", "unknown encoding"])
def test_damaged_results_files_are_input_errors(work, jacobians, how):
    _damage(jacobians, how)
    copy = work / "copy.h5"
    copy.write_bytes(jacobians.read_bytes())
    assert_one_error(invoke("show", jacobians, "--layer", "1", "--sample", "0"), code=1)
    assert_one_error(invoke("spectrum", jacobians), code=1)
    assert_one_error(invoke("check", jacobians, "--max-spectral-norm", "9"), code=4)
    assert_one_error(invoke("diff", jacobians, copy), code=4)


def test_corrupt_bytes_are_named_in_one_line(work, jacobians):
    raw = bytearray(jacobians.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 4096] = b"\xab" * 4096
    jacobians.write_bytes(bytes(raw))
    copy = work / "copy.h5"
    copy.write_bytes(bytes(raw))
    assert invoke("compute", work / "mlp.safetensors", work / "x.npy", "-q", "--dtype",
                  "float64", "-o", jacobians).exit_code == 0  # a sound file to compare with
    line = assert_one_error(invoke("diff", jacobians, copy), code=4)
    assert str(copy) in line and "damaged" in line


def test_a_closed_stdout_ends_quietly(work, jacobians):
    command = (f"{sys.executable} -m jaccli show {jacobians} --json | head -c 0; "
               "exit ${PIPESTATUS[0]}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert result.stderr == ""
    assert result.returncode in (0, 1)


def test_an_output_larger_than_the_free_space_is_refused_before_computing(work, monkeypatch):
    import jaccli.io.results.output_guard as guard
    import jaccli.pipelines.planner as planner
    from jaccli.engine.engine import JacobianEngine

    tiny = lambda output: 1000  # noqa: E731 — a nearly full file system
    monkeypatch.setattr(guard, "free_space", tiny)
    monkeypatch.setattr(planner, "free_space", tiny)
    monkeypatch.setattr(JacobianEngine, "compute", lambda *a, **k: pytest.fail("computed"))
    target = work / "out.h5"
    line = assert_one_error(invoke("compute", work / "mlp.safetensors", work / "x.npy",
                                   "--store", "dense", "-o", target), code=1)
    assert "would take about" in line and "--store compact" in line and "1000 B free" in line
    assert not target.exists() and not [p for p in work.iterdir() if ".partial-" in p.name]
    plan = invoke("compute", work / "mlp.safetensors", work / "x.npy", "--dry-run", "-o",
                  target)
    assert "output file:" in plan.stdout and "1000 B free" in plan.stdout
    capped = invoke("compute", work / "mlp.safetensors", work / "x.npy", "--max-output", "100B",
                    "--compression", "gzip", "-o", target)
    assert_one_error(capped, code=1, says="over 100 B (--max-output")
