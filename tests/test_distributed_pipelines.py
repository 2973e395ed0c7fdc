"""`spectrum` (both forms), `check`, `hessian`, `jvp` and `vjp` under torchrun (gloo on the CPU, 2
processes): the same files (every dataset read through open_results), the same `--json`
summaries and the same exit codes as one process; a failing rank stops every rank, and
`--resume` recomputes only its shard.

Each launch costs seconds of CPU, so one torchrun launch runs all the commands in turn
(each rank starts torch.distributed once and calls the CLI once per command, which joins
that process group), and the failure and the resume are one launch each."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app

from .conftest import MLP_SPEC, randomized
from .test_distributed import TIMEOUT, _env, failing_rank_1, mtimes, ranks

runner = CliRunner()
MODEL = ("mlp.safetensors", "x.npy", "--dtype", "float64", "--batch-size", "2")
# The commands the one launch runs, by name (each rank runs them in this order).
COMMANDS = {
    "spectrum": ["spectrum", *MODEL, "-o", "spec.h5", "--json"],
    "spectrum-file": ["spectrum", "jac.h5", "--offset", "1", "-o", "spec-file.h5", "--json"],
    "check": ["check", *MODEL[:4], "--max-frobenius", "{bound}", "--json"],
    "check-file": ["check", "jac.h5", "--max-spectral-norm", "{bound}", "--json"],
    "hessian": ["hessian", *MODEL[:2], "--targets", "y.npy", "--loss", "cross-entropy",
                "--dtype", "float64", "--top-k", "3", "-o", "hess.h5", "--json"],
    "jvp": ["jvp", *MODEL[:4], "--vectors", "v.npy", "-o", "jvp.h5", "--json"],
    "vjp": ["vjp", *MODEL[:4], "--vectors", "u.npy", "--wrt", "params", "-o", "vjp.h5",
            "--json"],
}
# Each rank runs every command in-process and records its exit code, stdout and stderr.
SCRIPT = """
import contextlib, io, json, os, sys
import torch.distributed as dist
from jaccli.cli import main

commands = json.loads(sys.argv[1])
dist.init_process_group("gloo")  # one process group for all the commands (jaccli joins it)
done = {}
for name, args in commands.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    done[name] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
dist.destroy_process_group()
with open(f"ranked-{os.environ['RANK']}.json", "w") as f:
    json.dump(done, f)
"""
# Summary fields that depend on timing and the output name.
VARYING = ("seconds", "output")


def invoke(folder: Path, args: list[str]):
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return runner.invoke(app, args)
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ranked")
    torch.manual_seed(0)
    mlp = randomized(jaccli.build_model(MLP_SPEC))
    jaccli.save_model(mlp, MLP_SPEC, folder / "mlp.safetensors")
    rng = np.random.default_rng(11)
    np.save(folder / "x.npy", rng.normal(size=(9, 6)))
    np.save(folder / "y.npy", rng.integers(0, 3, size=9))
    np.save(folder / "v.npy", rng.normal(size=(9, 6)))  # jvp: one input tangent a sample
    np.save(folder / "u.npy", rng.normal(size=(9, 3)))  # vjp: one output cotangent a sample
    result = invoke(folder, ["compute", *MODEL, "-o", "jac.h5", "--quiet"])
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="module")
def runs(folder) -> dict:
    """Every command once by one process (in this process) and once by two ranks."""
    one = {}
    for name, args in _commands(folder).items():
        args = [a.replace(".h5", "-one.h5") if a.startswith(("spec", "hess", "jvp", "vjp"))
                else a for a in args]
        result = invoke(folder, args)
        one[name] = {"code": result.exit_code, "stdout": result.stdout}
    return {"one": one, "ranked": launch_commands(folder, _commands(folder))}


def launch_commands(folder: Path, commands: dict[str, list[str]]) -> list[dict]:
    """Run `commands` in turn in one `torchrun --nproc-per-node 2` launch in `folder`; per
    rank, `{name: {"code", "stdout", "stderr"}}` (skips when torchrun cannot start)."""
    script = folder / "commands.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(script), json.dumps(commands)]
    done = subprocess.run(command, cwd=folder, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    if not (folder / "ranked-0.json").exists():
        pytest.skip(f"torchrun could not start: {done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads((folder / f"ranked-{r}.json").read_text()) for r in range(2)]


def _commands(folder: Path) -> dict[str, list[str]]:
    """COMMANDS with bounds that some samples break (the median of what is checked)."""
    with jaccli.open_results(folder / "jac.h5") as results:
        frobenius = np.concatenate([np.asarray(g["frobenius"]) for g in results.groups()])
    bound = f"{np.median(frobenius):.6g}"
    return {name: [a.replace("{bound}", bound) for a in args]
            for name, args in COMMANDS.items()}


def every_dataset(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a results file (groups, sample index, profile, bounds), read
    through open_results."""
    found = {}
    with jaccli.open_results(path) as results:
        results.file.visititems(lambda name, item: found.__setitem__(name, item[()])
                                if isinstance(item, h5py.Dataset) else None)
    return found


def same_files(got: Path, want: Path) -> None:
    a, b = every_dataset(got), every_dataset(want)
    assert a.keys() == b.keys()
    for key in b:  # other batches: last-ulp differences are allowed
        np.testing.assert_allclose(a[key], b[key], rtol=1e-10, atol=1e-14, err_msg=key)


def same_document(got, want, path="") -> None:
    """JSON documents equal, floats to reduction-order tolerance, timings left out."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            if key not in VARYING:
                same_document(got[key], want[key], f"{path}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            same_document(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-13), path
    else:
        assert got == want, path


@pytest.mark.parametrize("name", list(COMMANDS))
def test_two_ranks_print_what_one_process_prints_and_exit_alike(runs, name):
    one, ranked = runs["one"][name], runs["ranked"]
    assert [r[name]["code"] for r in ranked] == [one["code"]] * 2, \
        [r[name]["stderr"] for r in ranked]
    assert ranked[1][name]["stdout"] == ""  # only rank 0 prints
    assert ranked[1][name]["stderr"] == ""
    same_document(json.loads(ranked[0][name]["stdout"]), json.loads(one["stdout"]))


def test_the_check_names_the_worst_samples_across_ranks(runs, folder):
    """Independent reference: each sample's end-to-end Frobenius norm by autograd."""
    model = jaccli.load_model(folder / "mlp.safetensors").module.double()
    x = torch.from_numpy(np.load(folder / "x.npy"))
    norms = np.array([torch.linalg.norm(torch.autograd.functional.jacobian(model, row))
                      for row in x])
    result = json.loads(runs["ranked"][0]["check"]["stdout"])
    assert result["exit_code"] == 1
    end_to_end = next(c for c in result["checks"] if c["layer"] == "(end-to-end)")
    assert end_to_end["worst_samples"] == list(np.argsort(-norms, kind="stable")[:3])
    assert end_to_end["value"] == pytest.approx(norms.max(), rel=1e-9)


@pytest.mark.parametrize("name,target", [("spectrum", "spec.h5"),
                                         ("spectrum-file", "spec-file.h5")])
def test_two_ranks_write_spectra_files_equal_to_one_process(runs, folder, name, target):
    assert runs["ranked"][0][name]["code"] == 0
    same_files(folder / target, folder / target.replace(".h5", "-one.h5"))
    with h5py.File(folder / target) as master:
        values = master["end_to_end/singular_values"]
        assert values.is_virtual
        assert [s.file_name for s in values.virtual_sources()] == \
            [f"{target}.parts/rank-00000.h5", f"{target}.parts/rank-00001.h5"]
        assert [(s["start"], s["stop"]) for s in json.loads(master.attrs["shards"])] == \
            ([(0, 5), (5, 9)] if name == "spectrum" else [(1, 5), (5, 9)])


def test_the_ranked_spectra_are_the_autograd_ones(runs, folder):
    """Independent reference: each sample's end-to-end Jacobian by autograd, its singular
    values by numpy, and the depth profile from the cumulative Jacobians."""
    model = jaccli.load_model(folder / "mlp.safetensors").module.double()
    x = torch.from_numpy(np.load(folder / "x.npy"))
    cumulative = [np.stack([np.linalg.svd(torch.autograd.functional.jacobian(
        model[:depth + 1], row).numpy(), compute_uv=False) for row in x])
        for depth in range(len(model))]
    got = every_dataset(folder / "spec.h5")
    np.testing.assert_allclose(got["end_to_end/singular_values"], cumulative[-1], rtol=1e-9)
    sigma2 = [c.reshape(-1) ** 2 for c in cumulative]
    summary = json.loads(runs["ranked"][0]["spectrum"]["stdout"])
    np.testing.assert_allclose([r["mean_sigma2"] for r in summary["profile"]],
                               [s.mean() for s in sigma2], rtol=1e-9)
    np.testing.assert_allclose(got["profile/mean_sigma2"], [s.mean() for s in sigma2],
                               rtol=1e-9)
    frobenius = [np.sqrt((c ** 2).sum(axis=1)) for c in cumulative]
    assert summary["entries"][-1]["quantities"]["frobenius"]["p95"] == \
        pytest.approx(np.percentile(frobenius[-1], 95), rel=1e-9)


def test_the_ranked_hessian_is_that_of_the_full_data_loss(runs, folder):
    """Independent reference: the Hessian of the mean cross-entropy over all 9 samples
    w.r.t. every parameter, formed by torch.autograd.functional.hessian."""
    model = jaccli.load_model(folder / "mlp.safetensors").module.double()
    x = torch.from_numpy(np.load(folder / "x.npy"))
    y = torch.from_numpy(np.load(folder / "y.npy"))
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(theta):
        parts = torch.split(theta, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    eigen = np.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat).numpy())
    summary = json.loads(runs["ranked"][0]["hessian"]["stdout"])
    np.testing.assert_allclose(summary["eigenvalues"], eigen[::-1][:3], rtol=1e-7)
    with jaccli.open_results(folder / "hess.h5") as results:
        assert results.n_samples == 9
        np.testing.assert_allclose(results.file["hessian_results/hessian/eigenvalues"][0],
                                   eigen[::-1][:3], rtol=1e-7)
    same_files(folder / "hess.h5", folder / "hess-one.h5")


def test_the_ranked_products_are_the_autograd_ones(runs, folder):
    """Independent reference: J(x_i) v_i by autograd, and u_iᵀ ∂f(x_i)/∂θ by torch.func."""
    model = jaccli.load_model(folder / "mlp.safetensors").module.double()
    x = torch.from_numpy(np.load(folder / "x.npy"))
    v = torch.from_numpy(np.load(folder / "v.npy"))
    u = torch.from_numpy(np.load(folder / "u.npy"))
    jv = np.stack([torch.autograd.functional.jvp(model, row, t)[1].numpy()
                   for row, t in zip(x, v, strict=True)])
    params = dict(model.named_parameters())

    def uf(theta, row, cotangent):
        return torch.func.functional_call(model, theta, (row[None],))[0] @ cotangent

    grads = torch.vmap(torch.func.grad(uf), in_dims=(None, 0, 0))(
        {k: p.detach() for k, p in params.items()}, x, u)
    ujt = torch.cat([grads[k].reshape(9, -1) for k in params], dim=1).numpy()
    for name, want in (("jvp", jv), ("vjp", ujt)):
        assert runs["ranked"][0][name]["code"] == 0, runs["ranked"][0][name]["stderr"]
        got = every_dataset(folder / f"{name}.h5")
        np.testing.assert_allclose(got["products/product/product"], want, rtol=1e-10,
                                   atol=1e-12, err_msg=name)
        with h5py.File(folder / f"{name}.h5") as master:
            assert master["products/product/product"].is_virtual
        same_files(folder / f"{name}.h5", folder / f"{name}-one.h5")


INJECT = failing_rank_1("spectrum_ranks", "spectrum_parts", "JaccliError",
                        "injected: the spectra of rank 1 failed")


def test_a_failing_rank_stops_spectrum_on_every_rank_and_resume_redoes_only_it(folder):
    args = ("spectrum", *MODEL, "-o", "fail.h5", "--quiet")
    failed = ranks(2, *args, cwd=folder, script=INJECT)
    assert [r.returncode for r in failed] == [1, 1], [r.stderr for r in failed]
    assert "jaccli: error: rank 1: injected: the spectra of rank 1 failed" in failed[1].stderr
    assert "rank 0: stopped because rank 1 failed" in failed[0].stderr
    assert not (folder / "fail.h5").exists()
    parts = folder / "fail.h5.parts"
    before = mtimes(parts)
    assert list(before) == ["rank-00000.h5"]  # the finished shard stays
    resumed = ranks(2, *args, "--resume", cwd=folder)
    assert [r.returncode for r in resumed] == [0, 0], [r.stderr for r in resumed]
    after = mtimes(parts)
    assert list(after) == ["rank-00000.h5", "rank-00001.h5"]
    assert after["rank-00000.h5"] == before["rank-00000.h5"]  # reused, not rewritten
    result = invoke(folder, ["spectrum", *MODEL, "-o", "fail-one.h5", "--quiet"])
    assert result.exit_code == 0, result.output
    same_files(folder / "fail.h5", folder / "fail-one.h5")
