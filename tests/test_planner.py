"""The planner: sizes, batch size and chunk size from the memory budget, before running."""

import pytest
import torch
from torch import nn

from jaccli.errors import OutOfMemoryError
from jaccli.graph import capture
from jaccli.pipelines.engines import GraphRun
from jaccli.pipelines.hook_engine import HookRun
from jaccli.pipelines.planner import make_plan
from jaccli.tracing.layers import trace_layers

from .conftest import reference_jacobian


class Odd(nn.Module):
    """No rule (neither for the module nor for its op): the generic path."""

    def forward(self, x):
        return torch.logcumsumexp(x, dim=1)


def plan_for(model, shape, *, n=100, budget=10**9, batch_size=None, store="compact",
             hooks=False):
    x = torch.randn(2, *shape)
    model = model.eval()
    if hooks:
        trace = trace_layers(model, x)
        engine = HookRun(model, trace, hookable=True, layers=trace.layers, end_to_end=True,
                         n_samples=n, strict=False, mode="auto", note="test")
    else:
        engine = GraphRun(capture(model, x), granularity="module", patterns=None,
                          include_layers=True, end_to_end=True, module=model, samples=n)
    return engine, make_plan(engine, n_samples=n, dtype=torch.float32,
                             device=torch.device("cpu"), budget=budget, budget_source="test",
                             store=store, batch_size=batch_size)


def test_sizes_per_structure():
    _, plan = plan_for(nn.Sequential(nn.Linear(10, 20), nn.ReLU()), (10,))
    linear, relu, e2e = plan.entries
    assert (linear.bytes_per_sample, linear.shared_bytes) == (0, 20 * 10 * 4)
    assert (relu.bytes_per_sample, relu.shared_bytes) == (20 * 4, 0)
    assert e2e.structure == "row-scaled"
    assert plan.output_bytes == 100 * 20 * 4 + 800 + 100 * 20 * 4 + 800
    _, dense = plan_for(nn.Sequential(nn.Linear(10, 20), nn.ReLU()), (10,), store="dense")
    assert dense.entries[0].bytes_per_sample == 20 * 10 * 4


def test_batch_size_follows_the_budget():
    """The batch grows with the room the budget leaves after what is shared, and stops at
    what is asked for."""
    model = nn.Sequential(nn.Linear(100, 100), Odd())
    sizes = {budget: plan_for(model, (100,), n=10_000, budget=budget)[1].batch_size
             for budget in (4 * 2**20, 8 * 2**20, 32 * 2**20)}
    small, medium, large = sizes.values()
    assert 1 < small < medium < large < 4096
    assert medium == pytest.approx(2 * small, abs=2) and large == pytest.approx(8 * small, abs=8)
    _, fixed = plan_for(nn.Sequential(nn.Linear(4, 4)), (4,), batch_size=7)
    assert fixed.batch_size == 7


def test_generic_chunk_size_bounds_the_basis_batch():
    engine, plan = plan_for(nn.Sequential(Odd()), (500,), n=64, budget=2**33, hooks=True)
    assert plan.chunk_size is None  # everything fits
    engine, small = plan_for(nn.Sequential(Odd()), (500,), n=64, budget=20 * 2**20,
                             batch_size=3, hooks=True)
    assert small.chunk_size is not None and 1 <= small.chunk_size < 500
    # The plan is a report: planning leaves the engine as it was, and the pipeline hands the
    # chunk size to each computation (which must not change the result).
    assert not hasattr(engine.engine, "chunk_size")
    x = torch.randn(3, 500, dtype=torch.float64)
    chunked = engine.compute(x, chunk_size=small.chunk_size)
    expected = reference_jacobian(engine.model, x)
    for name in ("0", "(end-to-end)"):
        torch.testing.assert_close(chunked[name].dense(3), expected)


def test_a_jacobian_too_big_for_the_budget_is_refused_before_running():
    with pytest.raises(OutOfMemoryError, match=r"one sample's per-layer Jacobians \(largest: 0, "
                                              r"300 x 300\) need 2.1 MiB"):
        plan_for(nn.Sequential(Odd()), (300,), budget=100_000)
