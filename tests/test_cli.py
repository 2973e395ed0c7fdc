"""The command line as users and pipelines drive it: exit codes, stdout/stderr, files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app

from .conftest import CNN_SPEC, MLP_SPEC, SAMPLES

runner = CliRunner()


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def files(tmp_path, mlp):
    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "mlp.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(9, 6)).astype(np.float32))
    return tmp_path


def test_compute_writes_file_and_prints_table(files):
    out = files / "jac.h5"
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "-o", out)
    assert result.exit_code == 0, result.output
    assert "(end-to-end)" in result.stdout and "6 → 5" in result.stdout
    assert f"written to {out}" in result.stdout.replace("\n", "")
    with jaccli.open_results(out) as r:
        assert r.n_samples == 9 and len(r.layers) == 5


def test_json_output_is_one_document(files):
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "--json",
                    "--granularity", "block", "--limit", "4")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["n_samples"] == 4 and doc["output"] is None
    assert [e["name"] for e in doc["entries"]] == ["0+1", "2+3", "4", "(end-to-end)"]
    assert doc["entries"][0]["jacobian_shape"] == [4, 5, 6]
    assert doc["entries"][0]["frobenius_mean"] > 0


def test_quiet_prints_nothing(files):
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "-q",
                    "-o", files / "q.h5")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""
    assert (files / "q.h5").exists()


def test_dry_run_prints_plan_and_writes_nothing(files):
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "--dry-run", "--json",
                    "--max-memory", "1MB", "-o", files / "never.h5")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["memory_budget_bytes"] == 1_000_000
    assert [(e["rule"], e["structure"]) for e in plan["entries"]] == [
        ("linear", "shared"), ("pointwise", "diagonal"), ("linear", "shared"),
        ("pointwise", "diagonal"), ("linear", "shared"), ("chain product", "dense")]
    assert plan["engine"] == "graph: export-dynamic"
    costs = plan["end_to_end_chain_cost"]
    assert costs["chosen"] <= min(costs["forward"], costs["reverse"])
    assert not (files / "never.h5").exists()


def test_layer_selection_and_end_to_end_only(files):
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "--json",
                    "--layers", "1", "--layers", "3", "--no-end-to-end")
    assert [e["name"] for e in json.loads(result.stdout)["entries"]] == ["1", "3"]
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "--json",
                    "--no-layers")
    assert [e["name"] for e in json.loads(result.stdout)["entries"]] == ["(end-to-end)"]


def test_inspect_lists_layers_without_data(tmp_path, cnn):
    jaccli.save_model(cnn, CNN_SPEC, tmp_path / "cnn.safetensors")
    result = invoke("inspect", tmp_path / "cnn.safetensors", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    first = plan["entries"][0]
    assert (first["name"], first["d_in"], first["d_out"]) == ("features.0", 72, 108)
    assert (first["rule"], first["structure"]) == ("convolution", "shared-operator")
    # one convolution: stored as its kernel (3 x 2 x 3 x 3 float32), not its 108 x 72 matrix
    assert first["bytes_per_sample"] == 0 and first["shared_bytes"] == 3 * 2 * 3 * 3 * 4
    result = invoke("inspect", tmp_path / "cnn.safetensors", "--input-shape", "2,7,7")
    assert result.exit_code == 0 and "features.0" in result.stdout


def test_inspect_reads_torchscript_with_an_input_shape(tmp_path, mlp):
    torch.jit.script(mlp).save(str(tmp_path / "mlp.ts"))
    result = invoke("inspect", tmp_path / "mlp.ts", "--input-shape", "6", "--json")
    assert result.exit_code == 0, result.output
    entries = json.loads(result.stdout)["entries"]
    assert (entries[0]["d_in"], entries[-1]["d_out"]) == (6, 3)


@pytest.mark.parametrize(("args", "message"), [
    (["compute", "{d}/missing.pt", "{d}/x.npy"], "model file not found"),
    (["compute", "{d}/mlp.safetensors", "{d}/missing.npy"], "data file not found"),
    (["compute", "{d}/notes.pt", "{d}/x.npy"], "not a model format jaccli reads"),
    (["compute", "{d}/mlp.safetensors", "{d}/wrong.npy"],
     "data samples have shape (5,) but the model expects input of shape (6,)"),
    (["compute", "{d}/mlp.safetensors", "{d}/two.npz"], "choose one with --key"),
    (["compute", "{d}/mlp.safetensors", "{d}/two.npz", "--key", "zz"], "no array named 'zz'"),
    (["compute", "{d}/mlp.safetensors", "{d}/nan.npy"], "contain NaN or Inf"),
    (["compute", "{d}/whole.pt", "{d}/x.npy"], "--trust-pickle"),
    (["compute", "{d}/mlp.safetensors", "{d}/x.npy", "--max-memory", "100B"],
     "more than the memory budget"),
    (["compute", "{d}/mlp.safetensors", "{d}/x.npy", "--device", "cuda:7"], "--device cuda:7"),
])
def test_bad_input_gives_one_line_exit_1_and_no_file(files, mlp, args, message):
    d = files
    (d / "notes.pt").write_text("not a model")
    np.save(d / "wrong.npy", np.zeros((3, 5), dtype=np.float32))
    np.savez(d / "two.npz", a=np.zeros((3, 6)), b=np.zeros((3, 6)))
    bad = np.zeros((3, 6), dtype=np.float32)
    bad[2, 1] = np.nan
    np.save(d / "nan.npy", bad)
    torch.save(mlp, d / "whole.pt")
    out = d / "out.h5"
    result = invoke(*[a.format(d=d) for a in args], "-o", out)
    if "cuda" in " ".join(args) and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaccli: error: "), result.stderr
    assert message in lines[0]
    assert not out.exists()
    assert not [p for p in d.iterdir() if ".partial-" in p.name]


def test_usage_errors_exit_2(files):
    assert invoke("compute", files / "mlp.safetensors").exit_code == 2
    assert invoke("compute", files / "mlp.safetensors", files / "x.npy", "--dtype",
                  "float16").exit_code == 2
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "--layers", "conv*")
    assert result.exit_code == 2 and "matches no layer" in result.stderr
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "--no-layers",
                    "--no-end-to-end")
    assert result.exit_code == 2 and "nothing to compute" in result.stderr
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "--max-memory", "lots")
    assert result.exit_code == 2 and "cannot parse memory size" in result.stderr


def test_real_process_exit_codes_and_debug_traceback(files):
    cmd = [sys.executable, "-m", "jaccli", "compute", str(files / "mlp.safetensors"),
           str(files / "missing.npy")]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.strip() == f"jaccli: error: data file not found: {files / 'missing.npy'}"
    debug = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "JACCLI_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    version = subprocess.run([sys.executable, "-m", "jaccli", "--version"], capture_output=True,
                             text=True)
    assert version.stdout.strip() == f"jaccli {jaccli.__version__}"


def test_every_model_format_through_the_cli(model_files, files):
    for name, entry in model_files.items():
        options = []
        for key, value in entry["kwargs"].items():
            options += [f"--{key.replace('_', '-')}"] + ([] if value is True else [value])
        result = invoke("compute", entry["path"], files / "x.npy", "--json", "--limit", "3",
                        *options)
        assert result.exit_code == 0, (name, result.output)
        doc = json.loads(result.stdout)
        assert len(doc["entries"]) == 6, name


def test_sample_model_demo_runs(tmp_path):
    out = tmp_path / "cnn.h5"
    result = invoke("compute", SAMPLES / "digits_cnn.safetensors",
                    SAMPLES / "digits_test_images.npy", "--limit", "16", "--granularity", "block",
                    "-o", out)
    assert result.exit_code == 0, result.output
    with jaccli.open_results(out) as r:
        assert r.layers[0].name == "features.0+features.1"
        assert r.layers[0].jacobian.shape == (16, 512, 64)
        assert r.layers[0].encoding == "row-scaled"
