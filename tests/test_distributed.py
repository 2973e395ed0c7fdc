"""`jaccli compute` under torchrun (gloo on the CPU, 2 processes): one results file over the
ranks' shard files that reads like a one-process run, the same summary, every rank stopping
when one fails, and `--resume` reusing exactly the shard files that match."""

import json
import os
import socket
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

from .conftest import MLP_SPEC, ROOT
from .test_shards import datasets

runner = CliRunner()
TIMEOUT = 240
# Fields of the compute summary that depend on timing, file sizes and the output name.
VARYING = ("seconds", "output_bytes", "output")


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update({k: v for k, v in extra.items()})
    return env


def torchrun(nproc: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC -m jaccli ARGS` in `cwd`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "-m", "jaccli", *map(str, args)]
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    if done.returncode != 0 and "jaccli" not in done.stderr:
        pytest.skip(f"torchrun could not start: {done.stderr[-500:]}")
    return done


def ranks(world: int, *args, cwd: Path, script: str | None = None) -> list:
    """Start `world` processes the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK and a
    rendezvous address in the environment), so each rank's exit code and stderr can be read.
    script: Python run before the CLI (in every rank), e.g. to inject a failure."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"{script or ''}\nfrom jaccli.cli import main\nmain({[str(a) for a in args]!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=cwd, text=True,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(world)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:  # a rank left waiting (a hang) must not outlive the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


@pytest.fixture
def files(tmp_path, mlp):
    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "mlp.safetensors")
    rng = np.random.default_rng(7)
    np.save(tmp_path / "x.npy", rng.normal(size=(10, 6)))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, size=10))
    return tmp_path


ARGS = ("mlp.safetensors", "x.npy", "--dtype", "float64", "--batch-size", "2")


def single(files: Path, out: str, *extra) -> dict:
    """The one-process run (in this process) and its --json summary."""
    cwd = os.getcwd()
    os.chdir(files)
    try:
        result = runner.invoke(app, ["compute", *ARGS, "-o", out, "--json",
                                     *map(str, extra)])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def same_results(a: Path, b: Path) -> None:
    want, got = datasets(a), datasets(b)
    assert got.keys() == want.keys()
    for key in want:  # batches differ between the runs: last-ulp differences are allowed
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-15, err_msg=key)


def same_summary(got: dict, want: dict) -> None:
    for entry in (*got["entries"], *want["entries"]):
        entry.pop("seconds")
    for field in VARYING:
        got.pop(field), want.pop(field)
    assert got.keys() == want.keys()
    for key in want:
        if key != "entries":
            assert got[key] == want[key], key
    for g, w in zip(got["entries"], want["entries"], strict=True):
        for key in w:
            if isinstance(w[key], float):
                assert g[key] == pytest.approx(w[key], rel=1e-12), (w["name"], key)
            else:
                assert g[key] == w[key], (w["name"], key)


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.h5"))}


def test_two_ranks_write_one_file_equal_to_one_process(files, mlp):
    extra = ("--wrt", "inputs", "--wrt", "params", "--loss", "cross-entropy",
             "--targets", "y.npy")
    done = torchrun(2, "compute", *ARGS, *extra, "-o", "ranked.h5", "--json", cwd=files)
    assert done.returncode == 0, done.stderr
    want = single(files, "one.h5", *extra)
    same_summary(json.loads(done.stdout), want)
    same_results(files / "one.h5", files / "ranked.h5")
    assert sorted(p.name for p in (files / "ranked.h5.parts").iterdir()) == \
        ["rank-00000.h5", "rank-00001.h5"]
    with h5py.File(files / "ranked.h5") as master:
        jac = master["end_to_end/jacobian"]
        assert jac.is_virtual
        assert [s.file_name for s in jac.virtual_sources()] == \
            ["ranked.h5.parts/rank-00000.h5", "ranked.h5.parts/rank-00001.h5"]
        shards = json.loads(master.attrs["shards"])
        assert [(s["start"], s["stop"]) for s in shards] == [(0, 5), (5, 10)]
    # independent reference: every sample's end-to-end Jacobian by autograd
    x = torch.from_numpy(np.load(files / "x.npy"))
    reference = np.stack([torch.autograd.functional.jacobian(mlp.double(), r).numpy()
                          for r in x])
    got = datasets(files / "ranked.h5")
    np.testing.assert_allclose(got["(end-to-end)/jacobian"], reference, rtol=1e-10,
                               atol=1e-12)
    # and each sample's cross-entropy gradient w.r.t. the first weight, by torch.func
    y = torch.from_numpy(np.load(files / "y.npy"))
    params = {k: v.detach() for k, v in mlp.named_parameters()}

    def loss(weight, row, target):
        out = torch.func.functional_call(mlp, {**params, "0.weight": weight}, (row[None],))
        return torch.nn.functional.cross_entropy(out, target[None])

    grads = torch.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
        params["0.weight"], x, y)
    np.testing.assert_allclose(got["0.weight/jacobian"], grads.reshape(10, 1, 30).numpy(),
                               rtol=1e-10, atol=1e-12)


def failing_rank_1(module: str, function: str, error: str, message: str) -> str:
    """A script for `ranks(script=...)`: on rank 1, `jaccli.pipelines.<module>.<function>`
    raises `jaccli.errors.<error>(message)`."""
    return f"""
import os
if os.environ["RANK"] == "1":
    import jaccli.pipelines.{module} as ranked
    from jaccli.errors import {error}

    def fail(*args, **kwargs):
        raise {error}({message!r})

    ranked.{function} = fail
"""


INJECT = failing_rank_1("compute_ranks", "compute_outcome", "OutOfMemoryError",
                        "injected: out of memory on a single sample")


def test_a_failing_rank_stops_every_rank_and_resume_recomputes_only_its_shard(files):
    args = ("compute", *ARGS, "-o", "out.h5", "--quiet")
    failed = ranks(2, *args, cwd=files, script=INJECT)
    assert [r.returncode for r in failed] == [1, 1], [r.stderr for r in failed]
    assert "jaccli: error: rank 1: injected: out of memory" in failed[1].stderr
    assert "jaccli: error: rank 0: stopped because rank 1 failed" in failed[0].stderr
    assert all(r.stdout == "" for r in failed)
    assert not (files / "out.h5").exists()
    parts = files / "out.h5.parts"
    before = mtimes(parts)
    assert list(before) == ["rank-00000.h5"]  # the finished shard stays
    resumed = ranks(2, *args, "--resume", cwd=files)
    assert [r.returncode for r in resumed] == [0, 0], [r.stderr for r in resumed]
    after = mtimes(parts)
    assert list(after) == ["rank-00000.h5", "rank-00001.h5"]
    assert after["rank-00000.h5"] == before["rank-00000.h5"]  # reused, not rewritten
    single(files, "one.h5")
    same_results(files / "one.h5", files / "out.h5")


def test_bad_data_on_one_rank_stops_every_rank(files):
    x = np.load(files / "x.npy")
    x[7] = np.nan  # in rank 1's samples 5..9
    np.save(files / "x.npy", x)
    done = ranks(2, "compute", *ARGS, "-o", "out.h5", cwd=files)
    assert [r.returncode for r in done] == [1, 1]
    assert "rank 1: " in done[1].stderr and "contain NaN or Inf (rows 7)" in done[1].stderr
    assert "rank 0: stopped because rank 1 failed" in done[0].stderr
    assert len(done[0].stderr.strip().splitlines()) == 1
    assert not (files / "out.h5").exists()
    assert not list((files / "out.h5.parts").glob("*.h5"))


def test_an_output_in_a_missing_folder_stops_every_rank_in_one_line(files):
    done = ranks(2, "compute", *ARGS, "-o", "missing/out.h5", cwd=files)
    assert [r.returncode for r in done] == [1, 1], [r.stderr for r in done]
    for rank, result in enumerate(done):
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"jaccli: error: rank {rank}: "), \
            result.stderr
        assert "internal error" not in lines[0]
        assert "cannot write -o missing/out.h5: the folder missing does not exist" in lines[0]
    assert not (files / "missing").exists()


def test_an_output_onto_the_data_leaves_no_parts_folder(files):
    before = (files / "x.npy").read_bytes()
    done = ranks(2, "compute", *ARGS, "-o", "x.npy", cwd=files)
    assert [r.returncode for r in done] == [1, 1], [r.stderr for r in done]
    for result in done:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "is an input of this run" in lines[0], result.stderr
        assert "shard files stay" not in lines[0]
    assert (files / "x.npy").read_bytes() == before
    assert not (files / "x.npy.parts").exists()


def test_resume_reuses_matching_shards_after_the_process_count_changes(files):
    parts = files / "out.h5.parts"
    # samples 4..7 by one process
    # (processes started as torchrun starts them, without a launcher process each time)
    done, = ranks(1, "compute", *ARGS, "--offset", 4, "--limit", 4, "-o", "out.h5",
                  "--quiet", cwd=files)
    assert done.returncode == 0, done.stderr
    first = mtimes(parts)
    # samples 0..7 by two: rank 1 (4..7) reuses that file, rank 0 computes 0..3 beside it
    done = ranks(2, "compute", *ARGS, "--limit", 8, "-o", "out.h5", "--quiet", "--resume",
                 cwd=files)
    assert [r.returncode for r in done] == [0, 0], [r.stderr for r in done]
    second = mtimes(parts)
    assert second["rank-00000.h5"] == first["rank-00000.h5"]
    assert set(second) == {"rank-00000.h5", "rank-00000-0-4.h5"}
    single(files, "one.h5", "--limit", 8)
    same_results(files / "one.h5", files / "out.h5")
    # back to one process: samples 0..7 are tiled by the two files, nothing is recomputed
    done, = ranks(1, "compute", *ARGS, "--limit", 8, "-o", "out.h5", "--json", "--resume",
                  cwd=files)
    assert done.returncode == 0, done.stderr
    assert mtimes(parts) == second
    same_results(files / "one.h5", files / "out.h5")
    same_summary(json.loads(done.stdout), single(files, "two.h5", "--limit", 8))
    # other options: nothing matches, every shard is computed again
    done, = ranks(1, "compute", *ARGS, "--limit", 8, "-o", "out.h5", "--quiet", "--resume",
                  "--no-end-to-end", cwd=files)
    assert done.returncode == 0, done.stderr
    assert mtimes(parts)["rank-00000.h5"] != second["rank-00000.h5"]
    assert "(end-to-end)/jacobian" not in datasets(files / "out.h5")


def test_resume_outside_torchrun_is_refused(files, monkeypatch):
    monkeypatch.chdir(files)
    result = runner.invoke(app, ["compute", *ARGS, "-o", "o.h5", "--resume"])
    assert result.exit_code == 2  # a usage error
    assert "--resume continues a run launched with torchrun" in result.output
    assert not (files / "o.h5").exists()
