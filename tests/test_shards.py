"""`--shard i/n` and `jaccli merge`: shard files of one run joined into one results file
(virtual datasets or a copy) read like a single run; gaps, overlaps and foreign shards are
refused."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli import app
from jaccli.settings import parse_shard, shard_range

from .conftest import MLP_SPEC

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def files(tmp_path, mlp):
    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "mlp.safetensors")
    x = np.random.default_rng(3).normal(size=(11, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path


def compute(files, out, *extra):
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "--dtype",
                    "float64", "--offset", 1, "--limit", 9, "-o", out, "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return out


def shards(files, n, folder="parts"):
    (files / folder).mkdir(exist_ok=True)
    return [compute(files, files / folder / f"part-{i}.h5", "--shard", f"{i}/{n}")
            for i in range(n)]


def datasets(path):
    """Every dataset of a results file read through open_results, by group and name."""
    with jaccli.open_results(path) as results:
        found = {"index": results.sample_index.copy()}
        for group in results.groups():
            for name, item in group.group.items():
                found[f"{group.name}/{name}"] = np.asarray(item[()])
    return found


def test_shard_ranges_tile_the_samples_balanced():
    ranges = [shard_range(10, i, 4) for i in range(4)]
    assert ranges == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert parse_shard("3/16") == (3, 16)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(jaccli.errors.UsageError):
            parse_shard(bad)


@pytest.mark.parametrize("copy", [False, True])
def test_merged_shards_equal_one_run(files, mlp, copy):
    single = datasets(compute(files, files / "single.h5"))
    parts = shards(files, 3)
    args = ["--copy"] if copy else []
    result = invoke("merge", *reversed(parts), "-o", files / "merged.h5", "--json", *args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 9
    merged = datasets(files / "merged.h5")
    assert merged.keys() == single.keys()
    for key in single:  # batch composition differs: last-ulp differences are allowed
        np.testing.assert_allclose(merged[key], single[key], rtol=1e-12, atol=1e-15,
                                   err_msg=key)
    np.testing.assert_array_equal(merged["index"], np.arange(1, 10))
    # independent reference for the end-to-end Jacobian of every sample
    x = torch.from_numpy(np.load(files / "x.npy")[1:10]).double()
    model = mlp.double()
    want = np.stack([torch.autograd.functional.jacobian(model, row).numpy() for row in x])
    np.testing.assert_allclose(merged["(end-to-end)/jacobian"], want, rtol=1e-10, atol=1e-12)
    for command in (["show", files / "merged.h5", "--json"],):
        assert invoke(*command).exit_code == 0


def test_virtual_master_reads_after_the_folder_moves(files, tmp_path_factory):
    parts = shards(files, 2)
    assert invoke("merge", *parts, "-o", files / "parts" / "all.h5").exit_code == 0
    want = datasets(files / "parts" / "all.h5")
    moved = tmp_path_factory.mktemp("elsewhere") / "moved"
    shutil.move(str(files / "parts"), moved)
    got = datasets(moved / "all.h5")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    copy = moved / "copy.h5"
    assert invoke("merge", moved / "all.h5", "-o", copy, "--copy").exit_code == 0
    for part in moved.glob("part-*.h5"):
        part.unlink()
    got = datasets(copy)  # self-contained: reads without the shards
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_merge_refuses_gaps_overlaps_and_other_runs(files):
    parts = shards(files, 3)
    result = invoke("merge", parts[0], parts[2], "-o", files / "m.h5")
    assert result.exit_code == 1 and "samples 4..6 are missing" in result.output
    assert not (files / "m.h5").exists()
    wide = compute(files, files / "wide.h5", "--shard", "0/2")  # samples 1..5
    result = invoke("merge", wide, parts[1], parts[2], "-o", files / "m.h5")
    assert result.exit_code == 1 and "overlap" in result.output and "4..5" in result.output
    other = compute(files, files / "other.h5", "--shard", "2/3", "--dtype", "float32")
    result = invoke("merge", parts[0], parts[1], other, "-o", files / "m.h5")
    assert result.exit_code == 1 and "different runs: dtype" in result.output
    assert not (files / "m.h5").exists()
    assert not list(files.glob(".m.h5.partial*"))


def test_too_many_shards_is_refused(files):
    result = invoke("compute", files / "mlp.safetensors", files / "x.npy", "--limit", 2,
                    "--shard", "2/3", "-o", files / "o.h5")
    assert result.exit_code != 0 and "too few for 3 shards" in result.output



def test_spectrum_shards_merge_into_the_spectra_of_all_samples(files, mlp):
    parts = [files / f"spec-{i}.h5" for i in range(2)]
    for i, part in enumerate(parts):
        result = invoke("spectrum", files / "mlp.safetensors", files / "x.npy", "--dtype",
                        "float64", "--shard", f"{i}/2", "-o", part, "--quiet")
        assert result.exit_code == 0, result.output
    with jaccli.open_results(parts[1]) as results:
        assert list(results.sample_index) == list(range(6, 11))
    result = invoke("merge", *parts, "-o", files / "spec.h5")
    assert result.exit_code == 0, result.output
    # independent reference: each sample's end-to-end Jacobian and the cumulative ones
    # J_{1:l} (input -> output of layer l) by autograd, their singular values by numpy
    x = torch.from_numpy(np.load(files / "x.npy")).double()
    model = mlp.double()
    cumulative = [np.stack([np.linalg.svd(torch.autograd.functional.jacobian(
        model[:depth + 1], row).numpy(), compute_uv=False) for row in x])
        for depth in range(len(model))]
    with jaccli.open_results(files / "spec.h5") as merged:
        f = merged.file
        np.testing.assert_allclose(f["end_to_end/singular_values"][:],
                                   cumulative[-1], rtol=1e-9)
        sigma2 = [c.reshape(-1) ** 2 for c in cumulative]
        np.testing.assert_allclose(f["profile/mean_sigma2"][:], [s.mean() for s in sigma2],
                                   rtol=1e-9)
        np.testing.assert_allclose(f["profile/var_sigma2"][:], [s.var() for s in sigma2],
                                   rtol=1e-7)
        assert list(f["profile/count"][:]) == [s.size for s in sigma2]
    result = invoke("ntk", files / "mlp.safetensors", files / "x.npy", "--limit", 3,
                    "-o", files / "ntk.h5", "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("merge", files / "ntk.h5", "-o", files / "m.h5")
    assert result.exit_code == 1
    assert "only files written by jaccli compute, spectrum, jvp or vjp" in result.output
