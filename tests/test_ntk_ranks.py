"""`jaccli ntk` under torchrun (gloo on the CPU, 2 processes): the kernel's blocks split over
the ranks give the float64 jacrev reference, the same file (every dataset) and the same
`--json` summary as one process, and a failing rank stops every rank with no file left.

9 samples in blocks of 2: 5 row blocks, 15 blocks on and above the diagonal, so rank 1's
run starts in the middle of a row (its traces must not be counted twice)."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import jaccli
from jaccli.pipelines.ntk_ranks import rank_run, split_block_size

from .conftest import CNN_SPEC, randomized
from .graph.zoo import ZOO
from .ntk_reference import AllOutputs, reference_layer_ntk, reference_ntk
from .test_distributed import failing_rank_1, ranks
from .test_distributed_pipelines import invoke, launch_commands, same_document

MODEL = ("cnn.safetensors", "x.npy", "--dtype", "float64", "--batch-size", "2")
TOL = {"rtol": 1e-9, "atol": 1e-11}
COMMANDS = {
    "full": ["ntk", *MODEL, "--per-layer", "-o", "full.h5", "--json"],
    "spectrum": ["ntk", *MODEL, "--spectrum", "--top-k", "4", "--json"],
    "cross": ["ntk", *MODEL[:2], "x2.npy", *MODEL[2:], "--trace", "--per-layer",
              "-o", "cross.h5", "--json"],
    "diagonal": ["ntk", *MODEL, "--diagonal", "-o", "diagonal.h5", "--json"],
    "plan": ["ntk", *MODEL, "--dry-run", "--json"],
    # No --batch-size: one process plans one block of all 9 samples; two ranks split it.
    "split": ["ntk", *MODEL[:4], "--trace", "--per-layer", "-o", "split.h5", "--json"],
    "split-plan": ["ntk", *MODEL[:4], "--trace", "--dry-run", "--json"],
    # Deployable files of real architectures: a ResNet (`out += identity`, eval BatchNorm)
    # as a torch.export archive, a two-head O-Net (PReLU) as TorchScript.
    "resnet": ["ntk", "resnet.pt2", "resnet.npy", *MODEL[2:], "--per-layer", "-o",
               "resnet.h5", "--json"],
    "onet": ["ntk", "onet.ts", "onet.npy", *MODEL[2:], "-o", "onet.h5", "--json"],
    # one sample, one block: rank 0 has no pairs at all
    "one-sample": ["ntk", *MODEL, "--limit", "1", "-o", "one-sample.h5", "--json"],
    # a cross kernel wider than tall (5 × 9 samples: 3 × 5 blocks, rank 1 starts mid-row)
    "cross-wide": ["ntk", MODEL[0], "x2.npy", "x.npy", *MODEL[2:], "-o", "cross-wide.h5",
                   "--json"],
}
# The block size (and what follows from it) of the commands without --batch-size.
BLOCKING = ("block_size", "blocks", "cache_factors", "factor_passes", "peak_bytes", "pairs",
            "multiply_adds")
# Fields that depend on timing, the output's name, the number of ranks and (the plan's)
# what the process held when it planned.
VARYING = ("seconds", "output", "ranks", "peak_bytes", "memory_terms", "baseline_bytes",
           "memory_budget_bytes")
# Root attributes that differ between two runs of the same command.
RUN_ATTRS = ("created", "seconds", "command")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ntk-ranks")
    torch.manual_seed(0)
    cnn = randomized(jaccli.build_model(CNN_SPEC))
    jaccli.save_model(cnn, CNN_SPEC, folder / "cnn.safetensors")
    rng = np.random.default_rng(5)
    np.save(folder / "x.npy", rng.normal(size=(9, 2, 6, 6)))
    np.save(folder / "x2.npy", rng.normal(size=(5, 2, 6, 6)))
    for name, file in (("resnet", "resnet.pt2"), ("mtcnn", "onet.ts")):
        model, shape = zoo_model(name)
        stem = file.partition(".")[0]
        np.save(folder / f"{stem}.npy", rng.normal(size=(5, *shape)))
        if file.endswith(".pt2"):
            program = torch.export.export(model, (torch.randn(2, *shape),),
                                          dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, folder / file)
        else:
            torch.jit.save(torch.jit.script(model), str(folder / file))
    return folder


def zoo_model(name: str):
    """The zoo model `name` with the weights the folder's files were saved with."""
    torch.manual_seed(7)
    return ZOO[name]()


@pytest.fixture(scope="module")
def runs(folder) -> dict:
    """Every command once by one process (in this process) and once by two ranks (one
    torchrun launch running them in turn)."""
    one = {}
    for name, args in COMMANDS.items():
        args = [a.replace(".h5", "-one.h5") for a in args]
        result = invoke(folder, args)
        assert result.exit_code == 0, result.output
        one[name] = json.loads(result.stdout)
    return {"one": one, "ranked": launch_commands(folder, COMMANDS)}


def reference(folder: Path):
    """The float64 model (built as `folder` built it) and the samples, for the reference."""
    torch.manual_seed(0)
    model = randomized(jaccli.build_model(CNN_SPEC)).double()
    x = torch.from_numpy(np.load(folder / "x.npy"))
    return model, x, torch.from_numpy(np.load(folder / "x2.npy"))


def read(path: Path, name: str = "ntk/kernel") -> torch.Tensor:
    with h5py.File(path, "r") as f:
        return torch.from_numpy(np.asarray(f[name]))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_two_ranks_print_the_summary_one_process_prints(runs, name):
    rank0, rank1 = (r[name] for r in runs["ranked"])
    assert rank0["code"] == 0 and rank1["code"] == 0, (rank0["stderr"], rank1["stderr"])
    assert rank1["stdout"] == "" and rank1["stderr"] == ""  # only rank 0 prints
    got, want = json.loads(rank0["stdout"]), runs["one"][name]
    assert got["ranks"] == 2 and want["ranks"] == 1
    varying = VARYING + (BLOCKING if name.startswith("split") else ())
    same_document({k: v for k, v in got.items() if k not in varying},
                  {k: v for k, v in want.items() if k not in varying})


@pytest.mark.parametrize("name", ["full", "cross", "diagonal", "one-sample", "cross-wide",
                                  "resnet", "onet"])
def test_two_ranks_write_the_file_one_process_writes_and_remove_their_parts(runs, folder,
                                                                           name):
    assert not (folder / f"{name}.h5.parts").exists()
    with h5py.File(folder / f"{name}.h5", "r") as got, \
            h5py.File(folder / f"{name}-one.h5", "r") as want:
        assert _items(got) == _items(want)
        for item in ["/", *_items(want)]:
            if isinstance(want[item], h5py.Dataset) and name in ("resnet", "onet"):
                # two processes' convolutions may round differently (seen: 1 ulp)
                np.testing.assert_allclose(got[item][()], want[item][()], rtol=1e-13,
                                           atol=1e-15, err_msg=item)
            elif isinstance(want[item], h5py.Dataset):
                np.testing.assert_array_equal(got[item][()], want[item][()], err_msg=item)
            assert _attrs(got[item]).keys() == _attrs(want[item]).keys(), item
            for key, value in _attrs(want[item]).items():
                assert np.all(got[item].attrs[key] == value), (item, key)


def _items(f) -> list[str]:
    names = []
    f.visit(names.append)
    return sorted(names)


def _attrs(item) -> dict:
    return {k: v for k, v in item.attrs.items() if k not in RUN_ATTRS}


def test_the_ranked_kernels_are_the_jacrev_ones(runs, folder):
    model, x, x2 = reference(folder)
    theta = reference_ntk(model, x)
    torch.testing.assert_close(read(folder / "full.h5"), theta, **TOL)
    for layer, part in reference_layer_ntk(model, x).items():
        torch.testing.assert_close(read(folder / "full.h5", f"ntk/layers/{layer}/kernel"),
                                   part, **TOL, msg=layer)
    summary = json.loads(runs["ranked"][0]["full"]["stdout"])
    assert summary["trace"] == pytest.approx(float(torch.einsum("nncc->", theta)), rel=1e-10)
    layers = {row["layer"]: row["trace"] for row in summary["layers"]}
    parts = reference_layer_ntk(model, x)
    assert layers.keys() == parts.keys()
    for layer, part in parts.items():  # each row's share counted once over the two runs
        assert layers[layer] == pytest.approx(float(torch.einsum("nncc->", part)), rel=1e-10)
    cross = reference_ntk(model, x, x2)
    torch.testing.assert_close(read(folder / "cross.h5"), torch.einsum("nmcc->nm", cross),
                               **TOL)
    for layer, part in reference_layer_ntk(model, x, x2).items():
        torch.testing.assert_close(read(folder / "cross.h5", f"ntk/layers/{layer}/kernel"),
                                   torch.einsum("nmcc->nm", part), **TOL, msg=layer)
    cross_summary = json.loads(runs["ranked"][0]["cross"]["stdout"])  # Σᵢ Θ(xᵢ, xᵢ) of DATA
    assert cross_summary["trace"] == pytest.approx(summary["trace"], rel=1e-10)
    torch.testing.assert_close(read(folder / "diagonal.h5"), torch.einsum("nncd->ncd", theta),
                               **TOL)
    torch.testing.assert_close(read(folder / "one-sample.h5"), theta[:1, :1], **TOL)
    torch.testing.assert_close(read(folder / "cross-wide.h5"), reference_ntk(model, x2, x),
                               **TOL)
    n, c = theta.shape[0], theta.shape[2]
    eig = np.linalg.eigvalsh(theta.permute(0, 2, 1, 3).reshape(n * c, n * c).numpy())[::-1]
    spectrum = json.loads(runs["ranked"][0]["spectrum"]["stdout"])["spectrum"]
    np.testing.assert_allclose(spectrum["top_eigenvalues"], eig[:4], rtol=1e-9)
    assert spectrum["lambda_min"] == pytest.approx(eig[-1], abs=1e-9 * eig[0])


def test_real_architectures_from_deployable_files_give_the_jacrev_kernels(runs, folder):
    resnet, onet = zoo_model("resnet")[0].double(), AllOutputs(zoo_model("mtcnn")[0].double())
    for name, model in (("resnet", resnet), ("onet", onet)):
        rank0 = runs["ranked"][0][name]
        assert rank0["code"] == 0, rank0["stderr"]
        x = torch.from_numpy(np.load(folder / f"{name}.npy"))
        torch.testing.assert_close(read(folder / f"{name}.h5"), reference_ntk(model, x),
                                   **TOL, msg=name)
        assert json.loads(rank0["stdout"])["engine"].startswith("graph"), name
    x = torch.from_numpy(np.load(folder / "resnet.npy"))
    for layer, part in reference_layer_ntk(resnet, x).items():
        torch.testing.assert_close(read(folder / "resnet.h5", f"ntk/layers/{layer}/kernel"),
                                   part, **TOL, msg=layer)
    assert json.loads(runs["ranked"][0]["onet"]["stdout"])["n_outputs"] == 6


def test_the_plan_under_torchrun_names_the_ranks(runs):
    plan = json.loads(runs["ranked"][0]["plan"]["stdout"])
    assert plan["ranks"] == 2 and plan["blocks"] == 15 and plan["block_size"] == 2


def test_a_kernel_that_fits_one_block_is_split_over_the_ranks(runs, folder):
    one = runs["one"]["split-plan"]
    ranked = json.loads(runs["ranked"][0]["split-plan"]["stdout"])
    assert (one["block_size"], one["blocks"]) == (9, 1)
    # 9 samples, 8 blocks wanted for 2 ranks: 3 or 4 rows of blocks give 6, 5 rows 15.
    assert (ranked["block_size"], ranked["blocks"]) == (2, 15)
    assert json.loads(runs["ranked"][0]["split"]["stdout"])["blocks"] == 15
    model, x, _ = reference(folder)
    traces = {k: torch.einsum("nmcc->nm", v) for k, v in reference_layer_ntk(model, x).items()}
    for layer, trace in traces.items():
        torch.testing.assert_close(read(folder / "split.h5", f"ntk/layers/{layer}/kernel"),
                                   trace, **TOL, msg=layer)
    torch.testing.assert_close(read(folder / "split.h5"), sum(traces.values()), **TOL)
    with h5py.File(folder / "split.h5", "r") as f:
        assert f.attrs["block_size"] == 2


def _block_count(n: int, m: int, mode: str, symmetric: bool, b: int) -> int:
    """The blocks of an N×M kernel in blocks of `b`, counted by listing them."""
    starts = range(0, n, b)
    if mode == "diagonal":
        return len(starts)
    return len([(i, j) for i in starts for j in range(0, m, b) if not symmetric or j >= i])


@pytest.mark.parametrize("n,m,mode,symmetric", [
    (9, 9, "trace", True), (1000, 1000, "full", True), (7, 40, "full", False),
    (50, 3, "trace", False), (30, 30, "diagonal", False), (3, 3, "full", True),
    (1, 1, "trace", True), (2000, 2000, "trace", True)])
@pytest.mark.parametrize("wanted", [1, 4, 8, 16, 64])
def test_split_block_size_gives_the_fewest_rows_with_enough_blocks(n, m, mode, symmetric,
                                                                    wanted):
    for largest in sorted({1, 2, n // 3 or 1, n}):
        b = split_block_size(n, m, mode, symmetric, largest, wanted)
        fits = [k for k in range(1, min(largest, n) + 1)
                if _block_count(n, m, mode, symmetric, k) >= wanted]
        rows = -(-n // max(fits)) if fits else n  # the fewest rows of blocks that do
        assert b <= max(largest, 1) and -(-n // b) == rows, (largest, b)
        assert b == -(-n // rows)  # the rows as equal as they can be
        assert not fits or _block_count(n, m, mode, symmetric, b) >= wanted
    assert split_block_size(2000, 2000, "trace", True, 2000, 8) == 500  # not 666, 666, 666, 2


@pytest.mark.parametrize("costs,world", [
    ([4] * 15, 2), ([4] * 15, 4), ([1, 1, 1], 5), ([], 2), ([3, 2, 1] * 3, 1),
    ([250_000, 250_000, 250_000, 250_000, 500, 500, 500, 500, 1, 1], 2),
    ([100, 0, 0, 100, 7, 90, 1, 1, 1, 1, 50], 3), ([0, 0, 0, 0], 3), ([9, 1], 4)])
def test_rank_run_splits_the_blocks_once_in_order_by_cost(costs, world):
    runs = [rank_run(costs, r, world) for r in range(world)]
    assert [k for start, stop in runs for k in range(start, stop)] == list(range(len(costs)))
    total, largest = sum(costs), max(costs, default=0)
    for start, stop in runs:
        assert sum(costs[start:stop]) <= total / world + largest
    if total == 0:  # no pairs: split by count
        assert max(b - a for a, b in runs) - min(b - a for a, b in runs) <= 1


INJECT = failing_rank_1("ntk_ranks", "compute_blocks", "JaccliError",
                        "injected: the blocks of rank 1 failed")


def test_a_failing_rank_stops_every_rank_and_leaves_no_file(folder):
    failed = ranks(2, "ntk", *MODEL, "-o", "fail.h5", "--quiet", cwd=folder, script=INJECT)
    assert [r.returncode for r in failed] == [1, 1], [r.stderr for r in failed]
    assert "jaccli: error: rank 1: injected: the blocks of rank 1 failed" in failed[1].stderr
    assert "rank 0: stopped because rank 1 failed" in failed[0].stderr
    assert "--resume" not in failed[0].stderr  # ntk's part files are not kept
    assert not (folder / "fail.h5").exists()
    assert not (folder / "fail.h5.parts").exists()


# A rank that is refused must not leave the others waiting: without an answer in 60 s a
# collective fails (the test then sees that error, not the refusal).
PATIENCE = 'import os\nos.environ["JACCLI_DIST_TIMEOUT"] = "60"\n'


@pytest.mark.parametrize("output", ["a-folder", "x.npy"])
def test_rank_0_refusing_the_output_stops_every_rank_at_once(folder, output):
    (folder / "a-folder").mkdir(exist_ok=True)
    before = (folder / "x.npy").read_bytes()
    failed = ranks(2, "ntk", *MODEL, "-o", output, "--quiet", cwd=folder, script=PATIENCE)
    assert [r.returncode for r in failed] == [1, 1], [r.stderr for r in failed]
    why = "is a folder" if output == "a-folder" else "is an input of this run"
    assert f"jaccli: error: rank 0: -o {output} {why}" in failed[0].stderr
    assert f"jaccli: error: rank 1: stopped because rank 0 failed: -o {output} {why}" in \
        failed[1].stderr
    assert (folder / "x.npy").read_bytes() == before
    assert not (folder / f"{output}.parts").exists()


def test_a_file_named_as_the_parts_folder_is_refused_and_kept(folder):
    (folder / "blocked.h5.parts").write_text("not ours")
    failed = ranks(2, "ntk", *MODEL, "-o", "blocked.h5", "--quiet", cwd=folder)
    assert [r.returncode for r in failed] == [1, 1], [r.stderr for r in failed]
    for rank, result in enumerate(failed):
        assert f"jaccli: error: rank {rank}: blocked.h5.parts exists and is not a folder" in \
            result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert (folder / "blocked.h5.parts").read_text() == "not ours"
    assert not (folder / "blocked.h5").exists()


def test_data2_from_standard_input_is_refused_on_every_rank(folder):
    failed = ranks(2, "ntk", MODEL[0], "x.npy", "-", *MODEL[2:], "--quiet", cwd=folder)
    assert [r.returncode for r in failed] == [2, 2], [r.stderr for r in failed]
    for rank, result in enumerate(failed):
        assert f"jaccli: error: rank {rank}: under torchrun every rank reads DATA2" in \
            result.stderr


# Rank 1 started with other arguments than rank 0 (`jaccli.cli.main` wrapped on rank 1).
OTHER_ARGS = PATIENCE + """
if os.environ["RANK"] == "1":
    import jaccli.cli
    run = jaccli.cli.main
    jaccli.cli.main = lambda args: run([CHANGE.get(a, a) for a in args] + EXTRA)
"""


def test_ranks_started_on_other_samples_refuse_to_mix_their_blocks(folder):
    np.save(folder / "x3.npy", np.load(folder / "x.npy")[::-1])  # same shape, other rows
    script = OTHER_ARGS.replace("CHANGE", '{"x.npy": "x3.npy"}').replace("EXTRA", "[]")
    failed = ranks(2, "ntk", *MODEL, "-o", "mixed.h5", "--quiet", cwd=folder, script=script)
    assert [r.returncode for r in failed] == [2, 2], [r.stderr for r in failed]
    for rank, result in enumerate(failed):
        assert f"jaccli: error: rank {rank}: rank 1 was started on another kernel than " \
               "rank 0 (its data_sha256 differs)" in result.stderr
    assert not (folder / "mixed.h5").exists()
    assert not (folder / "mixed.h5.parts").exists()


def test_the_rank_with_the_least_memory_sets_every_rank_s_block_size(folder):
    small = ["--max-memory", "50KiB"]  # blocks of 2 samples, where 9 fit rank 0
    plan = invoke(folder, ["ntk", *MODEL[:4], *small, "--dry-run", "--json"])
    assert plan.exit_code == 0, plan.output
    size = json.loads(plan.stdout)["block_size"]
    alone = invoke(folder, ["ntk", *MODEL[:4], "--dry-run", "--json"])
    assert size < json.loads(alone.stdout)["block_size"]  # rank 0 alone would take more
    script = OTHER_ARGS.replace("CHANGE", "{}").replace("EXTRA", repr(small))
    done = ranks(2, "ntk", *MODEL[:4], "-o", "small.h5", "--quiet", cwd=folder,
                 script=script)
    assert [r.returncode for r in done] == [0, 0], [r.stderr for r in done]
    with h5py.File(folder / "small.h5", "r") as f:
        assert f["ntk"].attrs["block_size"] == size
    model, x, _ = reference(folder)
    torch.testing.assert_close(read(folder / "small.h5"), reference_ntk(model, x), **TOL)
    assert not (folder / "small.h5.parts").exists()


KILL = PATIENCE + """
if os.environ["RANK"] == "1":
    import jaccli.pipelines.ntk_ranks as ranked

    def killed(*args, **kwargs):
        os._exit(9)  # as the kernel's OOM killer would: no report, no clean-up

    ranked.compute_blocks = killed
"""


def test_a_killed_rank_stops_the_others_with_one_clear_line(folder):
    failed = ranks(2, "ntk", *MODEL, "-o", "killed.h5", "--quiet", cwd=folder, script=KILL)
    assert failed[1].returncode == 9
    assert failed[0].returncode == 1, failed[0].stderr
    assert failed[0].stderr.startswith("jaccli: error: rank 0: lost contact with the other "
                                       "ranks"), failed[0].stderr
    assert len(failed[0].stderr.strip().splitlines()) == 1, failed[0].stderr
    assert not (folder / "killed.h5").exists()
    assert not (folder / "killed.h5.parts" / "rank-00000.h5").exists()  # rank 0's own
