"""The planner: sizes, batch size and chunk size from the memory budget, before running."""

import pytest
import torch
from torch import nn

from jaccli.engine.engine import JacobianEngine
from jaccli.errors import OutOfMemoryError
from jaccli.pipelines.planner import make_plan
from jaccli.tracing.layers import trace_layers

from .conftest import reference_jacobian


class Odd(nn.Module):
    """No rule: differentiated by the generic path."""

    def forward(self, x):
        return torch.cumsum(x, dim=1)


def plan_for(model, shape, *, n=100, budget=10**9, batch_size=None, store="compact"):
    x = torch.randn(2, *shape)
    trace = trace_layers(model.eval(), x)
    engine = JacobianEngine(model, trace, layers=trace.layers, end_to_end=True, n_samples=n)
    return engine, make_plan(engine, n_samples=n, dtype=torch.float32,
                             device=torch.device("cpu"), budget=budget, budget_source="test",
                             store=store, batch_size=batch_size)


def test_sizes_per_structure():
    _, plan = plan_for(nn.Sequential(nn.Linear(10, 20), nn.ReLU()), (10,))
    linear, relu, e2e = plan.entries
    assert (linear.bytes_per_sample, linear.shared_bytes) == (0, 20 * 10 * 4)
    assert (relu.bytes_per_sample, relu.shared_bytes) == (20 * 4, 0)
    assert e2e.rule == "chain product" and e2e.structure == "row-scaled"
    assert plan.output_bytes == 100 * 20 * 4 + 800 + 100 * 20 * 4 + 800
    _, dense = plan_for(nn.Sequential(nn.Linear(10, 20), nn.ReLU()), (10,), store="dense")
    assert dense.entries[0].bytes_per_sample == 20 * 10 * 4


def test_batch_size_follows_the_budget():
    _, plan = plan_for(nn.Sequential(nn.Linear(100, 100), Odd()), (100,), n=10_000,
                       budget=10 * 2**20)
    # Per sample: Odd's and the end-to-end dense 100x100 Jacobians (40 kB each) and the
    # Linear's output row (400 B), three working copies each, after the shared W (40 kB).
    assert plan.batch_size == (10 * 2**20 - 40_000) // (3 * (40_000 + 40_000 + 400)) == 43
    _, fixed = plan_for(nn.Sequential(nn.Linear(4, 4)), (4,), batch_size=7)
    assert fixed.batch_size == 7


def test_generic_chunk_size_bounds_the_basis_batch():
    engine, plan = plan_for(nn.Sequential(Odd()), (500,), n=64, budget=2**33)
    assert plan.chunk_size is None  # everything fits
    engine, small = plan_for(nn.Sequential(Odd()), (500,), n=64, budget=20 * 2**20,
                             batch_size=64)
    assert small.chunk_size is not None and 1 <= small.chunk_size < 500
    # The plan is a report: planning leaves the engine as it was, and the pipeline hands the
    # chunk size to each computation (which must not change the result).
    assert not hasattr(engine, "chunk_size")
    from jaccli.tracing.recorder import ForwardRecorder

    x = torch.randn(3, 500, dtype=torch.float64)
    _, calls = ForwardRecorder(engine.model).run(x)
    chunked = engine.compute(x, {r.site: r for r in calls}, chunk_size=small.chunk_size)
    expected = reference_jacobian(engine.model, x)
    for name in ("0", "(end-to-end)"):
        torch.testing.assert_close(chunked[name].dense(3), expected)


def test_a_jacobian_too_big_for_the_budget_is_refused_before_running():
    with pytest.raises(OutOfMemoryError, match=r"Jacobian of 0 \(300 x 300\) needs 351.6 KiB"):
        plan_for(nn.Sequential(Odd()), (300,), budget=100_000)
