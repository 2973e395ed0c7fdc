"""jaccli as CI pipelines drive it: exit codes, JSON on stdout only (validated against the
shipped schemas), stdin input, show/check/diff, config files, start-up cost. Most commands run
in-process (`cli_harness`); real processes check what only they show: nothing but JSON on a
real stdout, no colour or progress bar off a terminal, no torch import for help and show."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

import jaccli

from .cli_harness import run_in_process as run_cli
from .conftest import ROOT, SAMPLES

SCHEMAS = ROOT / "jaccli" / "schemas"
MLP = SAMPLES / "digits_mlp.safetensors"
DATA = SAMPLES / "digits_test.npy"


def jaccli_process(*args, cwd=None, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "jaccli", *map(str, args)], cwd=cwd,
                          input=stdin, capture_output=True, env={**os.environ, **(env or {})})


def validated(result, schema: str) -> dict:
    document = json.loads(result.stdout)
    jsonschema.validate(document, json.loads((SCHEMAS / f"{schema}.schema.json").read_text()))
    assert document["schema"] == f"jaccli/{schema}"
    return document


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Jacobians and spectra of the sample MLP on 64 samples, and of a copy whose second
    layer was scaled up 3× (a "retrained" checkpoint that drifted)."""
    d = tmp_path_factory.mktemp("runs")
    spec = json.loads(__import__("safetensors").safe_open(str(MLP), "np").metadata()
                      ["jaccli.arch"])
    model = jaccli.load_model(MLP).module
    with torch.no_grad():
        model[2].weight.mul_(3.0)
    jaccli.save_model(model, spec, d / "scaled.safetensors")
    for name, path in (("orig", MLP), ("scaled", d / "scaled.safetensors")):
        assert run_cli("compute", path, DATA, "--limit", "64", "-q",
                          "-o", d / f"jac_{name}.h5").returncode == 0
        assert run_cli("spectrum", path, DATA, "--limit", "64", "-q",
                          "-o", d / f"spec_{name}.h5").returncode == 0
    return d


def test_json_goes_to_stdout_alone_and_matches_the_schemas(runs):
    compute = jaccli_process("compute", MLP, DATA, "--limit", "8", "--json")
    assert compute.returncode == 0 and compute.stderr == b""
    validated(compute, "compute-summary")
    plan = run_cli("compute", MLP, DATA, "--dry-run", "--json")
    validated(plan, "plan")
    validated(run_cli("inspect", MLP, "--json"), "plan")
    spectrum = run_cli("spectrum", MLP, DATA, "--limit", "8", "--json")
    assert spectrum.returncode == 0 and spectrum.stderr == b""
    validated(spectrum, "spectrum-summary")
    validated(run_cli("show", runs / "jac_orig.h5", "--json"), "compute-summary")
    validated(run_cli("show", runs / "spec_orig.h5", "--json"), "spectrum-summary")
    detail = validated(run_cli("show", runs / "jac_orig.h5", "--layer", "0", "--sample", "5",
                                  "--json"), "show-sample")
    weight = jaccli.load_model(MLP).module[0].weight.detach().numpy()
    np.testing.assert_allclose(detail["jacobian"], weight, rtol=1e-6)
    validated(run_cli("show", runs / "spec_orig.h5", "--layer", "end_to_end", "--sample",
                         "5", "--json"), "show-sample")


def test_stdin_data_pipeline(runs):
    buffer = __import__("io").BytesIO()
    np.save(buffer, np.load(DATA)[:16])
    result = run_cli("spectrum", MLP, "-", "--json", stdin=buffer.getvalue())
    assert result.returncode == 0, result.stderr
    doc = validated(result, "spectrum-summary")
    assert doc["n_samples"] == 16 and doc["data"] == "-"
    out = runs / "stdin.h5"
    assert run_cli("compute", MLP, "-", "-q", "-o", out,
                      stdin=buffer.getvalue()).returncode == 0
    with jaccli.open_results(out) as r:
        import hashlib

        assert r.attrs["data_sha256"] == hashlib.sha256(buffer.getvalue()).hexdigest()
    bad = run_cli("compute", MLP, "-", stdin=b"not numpy")
    assert bad.returncode == 1 and b"not a .npy stream" in bad.stderr


def test_check_exit_codes_pass_violation_error(runs):
    passing = run_cli("check", runs / "spec_orig.h5", "--max-spectral-norm", "100",
                         "--json")
    assert passing.returncode == 0
    assert validated(passing, "check-result")["passed"] is True
    failing = run_cli("check", runs / "spec_orig.h5", "--max-spectral-norm", "5",
                         "--min-sigma", "1e-3", "--json")
    assert failing.returncode == 1
    doc = validated(failing, "check-result")
    violated = {(v["layer"], v["quantity"]) for v in doc["violations"]}
    assert ("0", "spectral_norm") in violated and ("(end-to-end)", "spectral_norm") in violated
    assert all(len(v["worst_samples"]) == 3 for v in doc["violations"])
    table = run_cli("check", MLP, DATA, "--limit", "16", "--max-frobenius", "1")
    assert table.returncode == 1 and b"VIOLATED" in table.stdout and table.stderr == b""
    error = run_cli("check", runs / "missing.h5", "--max-cond", "10")
    assert error.returncode == 4 and error.stderr.startswith(b"jaccli: error: file not found")
    usage = run_cli("check", runs / "spec_orig.h5")
    assert usage.returncode == 2 and b"no bound to check" in usage.stderr


def test_check_bounds_from_config_files(runs, tmp_path):
    (tmp_path / "jaccli.toml").write_text("[check]\nmax-spectral-norm = 5\nstat = 'mean'\n")
    from_toml = run_cli("check", runs / "spec_orig.h5", "--json", cwd=tmp_path)
    assert from_toml.returncode == 1
    assert json.loads(from_toml.stdout)["stat"] == "mean"
    overridden = run_cli("check", runs / "spec_orig.h5", "--max-spectral-norm", "100",
                            cwd=tmp_path)
    assert overridden.returncode == 0
    (tmp_path / "pyproject.toml").write_text(
        "[tool.jaccli.check]\nmax-lipschitz-bound = 1.0\n")
    pyproject = run_cli("check", runs / "spec_orig.h5", "--config",
                           tmp_path / "pyproject.toml", "--json")
    assert pyproject.returncode == 1
    assert json.loads(pyproject.stdout)["violations"][0]["layer"] == "(chain)"
    (tmp_path / "bad.toml").write_text("[check]\nmax-sigma = 1\n")
    bad = run_cli("check", runs / "spec_orig.h5", "--config", tmp_path / "bad.toml")
    assert bad.returncode == 4 and b"unknown check setting(s) max_sigma" in bad.stderr


def test_retrained_model_with_a_scaled_layer_is_caught_by_check_and_diff(runs):
    bound = ["--layers", "2", "--max-spectral-norm", "8"]
    assert run_cli("check", runs / "spec_orig.h5", *bound).returncode == 0
    caught = run_cli("check", runs / "spec_scaled.h5", *bound, "--json")
    assert caught.returncode == 1
    assert [v["layer"] for v in json.loads(caught.stdout)["violations"]][0] == "2"
    same = run_cli("diff", runs / "spec_orig.h5", runs / "spec_orig.h5", "--json")
    assert same.returncode == 0 and validated(same, "diff-result")["same"]
    drifted = run_cli("diff", runs / "spec_orig.h5", runs / "spec_scaled.h5", "--json")
    assert drifted.returncode == 1
    doc = validated(drifted, "diff-result")
    changed = {layer["name"] for layer in doc["layers"] if layer["changed"]}
    assert "2" in changed and "0" not in changed  # layer 0 comes before the scaled one
    layer2 = next(layer for layer in doc["layers"] if layer["name"] == "2")
    assert layer2["metrics"]["spectral_norm_mean"]["rel_change"] == pytest.approx(2.0)
    jac_diff = run_cli("diff", runs / "jac_orig.h5", runs / "jac_scaled.h5", "--json")
    assert jac_diff.returncode == 1
    layer2 = next(x for x in validated(jac_diff, "diff-result")["layers"] if x["name"] == "2")
    assert layer2["metrics"]["jacobian_max_rel_difference"]["b"] == pytest.approx(2.0, rel=1e-5)


def test_diff_refuses_different_data_unless_told(runs, tmp_path):
    other = tmp_path / "other.h5"
    assert run_cli("spectrum", MLP, DATA, "--offset", "100", "--limit", "64", "-q",
                      "-o", other).returncode == 0
    refused = run_cli("diff", runs / "spec_orig.h5", other)
    assert refused.returncode == 4 and b"different data" in refused.stderr
    allowed = run_cli("diff", runs / "spec_orig.h5", other, "--allow-different-data",
                         "--rtol", "10")
    assert allowed.returncode == 0
    mixed = run_cli("diff", runs / "spec_orig.h5", runs / "jac_orig.h5")
    assert mixed.returncode == 4 and b"same command" in mixed.stderr


def test_the_ci_example_runs_as_written(runs, tmp_path):
    workflow = (ROOT / "docs" / "ci-example.yml").read_text()
    commands = [line.strip() for line in workflow.splitlines()
                if line.strip().startswith("jaccli ")]
    assert len(commands) == 3
    (tmp_path / "baseline").mkdir()
    os.symlink(SAMPLES, tmp_path / "sample_models")
    assert run_cli("spectrum", MLP, DATA, "--granularity", "block", "-q",
                      "-o", tmp_path / "baseline" / "spec.h5").returncode == 0
    for command in commands:
        argv, _, redirect = command.partition(" > ")
        result = run_cli(*shlex.split(argv)[1:], cwd=tmp_path)
        assert result.returncode == 0, (command, result.stderr)
        if redirect:
            json.loads(result.stdout)


def test_no_color_and_no_progress_in_pipelines():
    result = jaccli_process("compute", MLP, DATA, "--limit", "4",
                            env={"NO_COLOR": "1", "FORCE_COLOR": ""})
    assert b"\x1b[" not in result.stdout + result.stderr
    assert result.stderr == b""  # no progress bar when not a terminal


def test_help_and_show_do_not_import_torch(runs):
    # jaccli ends the process itself (without the interpreter's teardown) but runs the exit
    # handlers first: the probe is one.
    probe = ("import atexit, sys, runpy\nsys.argv = ['jaccli'] + sys.argv[1:]\n"
             "atexit.register(lambda: print('TORCH' if 'torch' in sys.modules else 'NO-TORCH',"
             " file=sys.stderr))\nrunpy.run_module('jaccli', run_name='__main__')")
    for args in (["--help"], ["show", str(runs / "spec_orig.h5")],
                 ["show", str(runs / "jac_orig.h5"), "--json"]):
        result = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True)
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip().endswith(b"NO-TORCH"), (args, result.stderr[-300:])


def test_readme_documents_the_gate():
    readme = (ROOT / "README.md").read_text()
    assert "docs/ci-example.yml" in readme
    assert re.search(r"jaccli check .*--max-spectral-norm", readme)
    assert Path(ROOT / "docs" / "ci-example.yml").is_file()


def test_the_command_exits_with_its_code_and_flushed_output(tmp_path):
    """`jaccli` ends its process itself: exit codes, stdout and the written file are whole."""
    out = tmp_path / "r.h5"
    done = jaccli_process("compute", MLP, DATA, "--limit", "4", "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["n_samples"] == 4
    assert jaccli.open_results(out).n_samples == 4
    missing = jaccli_process("compute", str(tmp_path / "none.pt"), DATA)
    assert (missing.returncode, missing.stdout) == (1, b"")
    assert missing.stderr.decode().count("\n") == 1
    assert jaccli_process("compute", "--no-such-option").returncode == 2
