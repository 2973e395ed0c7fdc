"""The memory budget is a promise: a real run's peak RSS stays within the budget plus the
baseline the plan states; the batch shrinks with the budget; a refusal names the term that
does not fit and suggests only options that change it (none already in effect)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from jaccli.errors import OutOfMemoryError
from jaccli.graph import capture
from jaccli.pipelines.engines import GraphRun
from jaccli.pipelines.planner import InEffect, make_plan

from .graph.zoo import BasicBlock

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
# Runs jaccli's CLI in this process and prints its peak resident set (VmHWM, KiB).
RUN = """
import sys
from jaccli.cli import app
code = 0
try:
    app(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
def peak_kib():  # this process's own high-water RSS (ru_maxrss also counts the parent
    # that spawned it: Linux carries the spawning mm's high-water mark across exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print("MAXRSS", peak_kib(), file=sys.stderr)
sys.exit(code)
"""


class Stack(nn.Module):
    """A ResNet basic-block stack: convolutions whose shared matrices dominate memory."""

    def __init__(self, c: int = 8, blocks: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.Sequential(*[BasicBlock(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def _stack(shape=(3, 16, 16)):
    torch.manual_seed(0)
    return Stack().eval(), shape


@pytest.fixture(scope="module")
def stack_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    model, shape = _stack()
    program = torch.export.export(model, (torch.randn(2, *shape),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "stack.pt2")
    np.save(folder / "x.npy", np.random.default_rng(0).normal(size=(48, *shape))
            .astype(np.float32))
    return folder


def _run(*args) -> tuple[int, int, str]:
    """(exit code, peak RSS bytes, stdout) of one jaccli command in a fresh process."""
    done = subprocess.run([sys.executable, "-c", RUN, *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)
    peak = int(done.stderr.strip().splitlines()[-1].split()[1]) * 1024
    return done.returncode, peak, done.stdout


def test_peak_rss_stays_within_budget_plus_baseline(stack_files):
    model, data = stack_files / "stack.pt2", stack_files / "x.npy"
    budget = "300MiB"
    code, _, out = _run("compute", model, data, "--max-memory", budget, "--dry-run", "--json")
    assert code == 0, out
    memory = json.loads(out)["memory"]
    assert memory["budget_bytes"] == 300 * MiB and memory["batch_bytes"] <= 300 * MiB
    baseline = memory["baseline_bytes"]
    assert 0 < baseline < 2**31
    code, peak, out = _run("compute", model, data, "--max-memory", budget, "--json",
                           "-o", stack_files / "out.h5")
    assert code == 0, out
    run = json.loads(out)
    assert peak <= baseline + 300 * MiB, (peak / MiB, baseline / MiB, run.get("batch_size"),
                                          run.get("memory"), run.get("engine"))


def test_spectrum_peak_rss_stays_within_budget_plus_baseline(stack_files):
    """`spectrum` (shared convolutions by Lanczos, dense blocks, the end-to-end Jacobian):
    the plan its --dry-run prints is what the run keeps to."""
    model, data = stack_files / "stack.pt2", stack_files / "x.npy"
    options = ("--max-memory", "150MiB", "--top-k", "5")
    code, _, out = _run("spectrum", model, data, *options, "--dry-run", "--json")
    assert code == 0, out
    plan = json.loads(out)
    memory = plan["memory"]
    assert memory["budget_bytes"] == 150 * MiB and memory["batch_bytes"] <= 150 * MiB
    names = {t["name"] for t in memory["terms"]}
    assert {"the decompositions", "the Lanczos bases"} <= names
    code, peak, out = _run("spectrum", model, data, *options, "--json",
                           "-o", stack_files / "spectrum.h5")
    assert code == 0, out
    assert json.loads(out)["n_samples"] == 48
    assert peak <= memory["baseline_bytes"] + 150 * MiB, (
        peak / MiB, memory["baseline_bytes"] / MiB, plan["batch_size"])


def _plan(model, shape, budget, **effect):
    engine = GraphRun(capture(model, torch.randn(2, *shape)), granularity="module",
                      patterns=None, include_layers=True,
                      end_to_end=effect.get("end_to_end", True), module=model, samples=256)
    store = effect.pop("store", "compact")
    return make_plan(engine, n_samples=256, dtype=torch.float32, device=torch.device("cpu"),
                     budget=budget, budget_source="--max-memory", store=store,
                     in_effect=InEffect(store=store, **effect))


def test_batch_size_shrinks_with_the_budget():
    model, shape = _stack()
    sizes = [_plan(model, shape, budget * MiB).batch_size for budget in (400, 250, 200)]
    assert sizes[0] > sizes[1] > sizes[2] >= 1, sizes
    plan = _plan(model, shape, 200 * MiB)
    assert plan.memory.need(plan.batch_size) <= 200 * MiB < plan.memory.need(
        plan.batch_size + 1)
    names = [t["name"] for t in plan.to_dict()["memory"]["terms"]]
    for term in ("inputs", "recorded activations", "per-layer Jacobians", "shared matrices"):
        assert any(term in name for name in names), names


def test_shared_matrices_that_cannot_fit_are_named():
    model, shape = _stack()
    with pytest.raises(OutOfMemoryError) as error:
        _plan(model, shape, 40 * MiB)
    message = str(error.value)
    assert message.startswith("the shared matrices of 10 Jacobians (largest: blocks.0.conv1, "
                              "2048 x 2048, 16.0 MiB) need")
    assert "--layers" in message and "--no-layers" in message
    assert "--store" not in message and "--granularity" not in message  # no effect on them


def test_per_sample_jacobians_name_their_fixes_and_not_those_in_effect():
    model, shape = nn.Sequential(nn.Flatten(), nn.Linear(300, 300), nn.Tanh()).eval(), (300,)
    with pytest.raises(OutOfMemoryError) as dense:
        _plan(model, shape, 1 * MiB, store="dense", end_to_end=False)
    assert dense.value.args[0].startswith("one sample's per-layer Jacobians")
    assert "--store compact" in str(dense.value)
    with pytest.raises(OutOfMemoryError) as compact:
        _plan(model, shape, 200_000, store="compact", end_to_end=False)
    assert "--store compact" not in str(compact.value)  # already the default
    assert "--granularity module" not in str(compact.value)  # already in effect

