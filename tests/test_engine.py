import pytest
import torch
from torch import nn

import jaccli
from jaccli.engine import per_sample_jacobian
from jaccli.errors import ModelRunError
from jaccli.tracing.independence import check_sample_independence

from .conftest import TwoBranch, reference_jacobian


def _check_all_layers(model, x, granularity="module"):
    model = model.double()
    x = x.double()
    jacobians = jaccli.layer_jacobians(model, x, granularity=granularity, end_to_end=True)
    for layer in jaccli.list_layers(model, x, granularity=granularity):
        modules = [model.get_submodule(call.split("#")[0]) for call in layer.members]
        calls = []
        handle = modules[0].register_forward_pre_hook(
            lambda m, a, calls=calls: calls.append(a[0].clone()))
        model(x)
        handle.remove()
        first_call = layer.members[0]
        occurrence = int(first_call.split("#")[1]) if "#" in first_call else 0
        layer_input = calls[occurrence]

        def layer_fn(xb, modules=modules):
            for module in modules:
                xb = module(xb)
            return xb

        expected = reference_jacobian(layer_fn, layer_input)
        torch.testing.assert_close(jacobians[layer.name], expected, rtol=1e-10, atol=1e-12,
                                   msg=layer.name)
    torch.testing.assert_close(jacobians["(end-to-end)"], reference_jacobian(model, x),
                               rtol=1e-10, atol=1e-12)
    return jacobians


def test_mlp_layers_match_reference(mlp):
    jac = _check_all_layers(mlp, torch.randn(5, 6))
    # A Linear layer's Jacobian is its weight, for every sample.
    torch.testing.assert_close(jac["0"], mlp[0].weight.expand(5, -1, -1))


def test_cnn_layers_and_blocks_match_reference(cnn):
    x = torch.randn(3, 2, 6, 6)
    _check_all_layers(cnn, x)
    _check_all_layers(cnn, x, granularity="block")


def test_non_chain_model_matches_reference():
    _check_all_layers(TwoBranch().eval(), torch.randn(4, 4))


def test_layernorm_and_nested_containers_match_reference():
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7)),
                          nn.Sequential(nn.Sequential(nn.SiLU(), nn.Linear(7, 2)))).eval()
    _check_all_layers(model, torch.randn(4, 5))


@pytest.mark.parametrize("shape", [(3, 8), (8, 3), (5, 5)])
def test_forward_and_reverse_modes_agree(shape):
    d_in, d_out = shape
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Softplus()).double().eval()
    x = torch.randn(4, d_in, dtype=torch.float64)
    fwd = per_sample_jacobian(model, x, mode="fwd", chunk_size=2)
    rev = per_sample_jacobian(model, x, mode="rev", chunk_size=3)
    torch.testing.assert_close(fwd, rev, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwd, reference_jacobian(model, x))


def test_end_to_end_matches_central_finite_differences(mlp):
    model = mlp.double()
    x = torch.randn(3, 6, dtype=torch.float64)
    jac = jaccli.end_to_end_jacobian(model, x)
    eps = 1e-6
    with torch.no_grad():
        for i in range(6):
            step = torch.zeros(6, dtype=torch.float64)
            step[i] = eps
            column = (model(x + step) - model(x - step)) / (2 * eps)
            torch.testing.assert_close(jac[:, :, i], column, rtol=1e-7, atol=1e-8)


def test_extra_batched_inputs_are_held_fixed_per_sample():
    class Gate(nn.Module):
        def forward(self, x, scale):
            return torch.tanh(x) * scale

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.gate = nn.Linear(3, 3), Gate()

        def forward(self, x):
            return self.gate(self.lin(x), x.sum(dim=1, keepdim=True))

    model = Model().double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    jac = jaccli.layer_jacobians(model, x)["gate"]
    pre = model.lin(x)
    scale = x.sum(dim=1, keepdim=True)
    expected = torch.diag_embed((1 - torch.tanh(pre) ** 2) * scale)
    torch.testing.assert_close(jac, expected)


def test_batch_coupling_is_detected():
    coupled = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()
    with pytest.raises(ModelRunError, match="fails on a batch of one sample"):
        check_sample_independence(coupled, torch.randn(4, 3))

    class MixRows(nn.Module):
        def forward(self, x):
            return x - x.mean(dim=0, keepdim=True) + x

    with pytest.raises(ModelRunError, match="changes with the other samples in its batch"):
        check_sample_independence(MixRows(), torch.randn(4, 3))
    check_sample_independence(nn.Sequential(nn.Linear(3, 3)).eval(), torch.randn(4, 3))


class Square(nn.Module):
    """A module with no rule: the generic torch.func path handles it."""

    def forward(self, x):
        return x * x.sum(dim=1, keepdim=True)


def test_module_without_rule_uses_generic_path_and_strict_rules_refuses_it():
    from jaccli.engine.engine import JacobianEngine
    from jaccli.errors import UnsupportedModuleError
    from jaccli.tracing.layers import trace_layers

    model = nn.Sequential(nn.Linear(3, 4), Square(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    trace = trace_layers(model, x)
    engine = JacobianEngine(model, trace, layers=trace.layers, end_to_end=True, n_samples=5)
    assert [p.rule_name for p in engine.site_plans["1"]] == ["generic"]
    assert engine.site_plans["1"][0].mode == "rev"  # D_in == D_out: reverse mode
    jac = jaccli.layer_jacobians(model, x, end_to_end=True)
    pre = model[0](x)
    torch.testing.assert_close(jac["1"], reference_jacobian(model[1], pre))
    torch.testing.assert_close(jac["(end-to-end)"], reference_jacobian(model, x))
    with pytest.raises(UnsupportedModuleError, match=r"--strict-rules: no structured rule for "
                                                     r"1 \(Square\)"):
        JacobianEngine(model, trace, layers=trace.layers, end_to_end=True, n_samples=5,
                       strict=True)


def test_end_to_end_by_chain_equals_direct(cnn):
    model = cnn.double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    structured = jaccli.layer_jacobians(model, x, end_to_end=True, structured=True)
    torch.testing.assert_close(structured["(end-to-end)"].dense(4),
                               jaccli.end_to_end_jacobian(model, x))


def test_shared_jacobians_are_computed_once_per_run(tmp_path, cnn, monkeypatch):
    import numpy as np

    from jaccli.graph.rules.linear_maps import LinearMapRule
    from jaccli.pipelines.compute import run_compute
    from jaccli.settings import ComputeSettings
    compute_settings = ComputeSettings.from_options

    from .conftest import CNN_SPEC

    calls = []
    original = LinearMapRule.jacobian
    monkeypatch.setattr(LinearMapRule, "jacobian",
                        lambda self, call, position: calls.append(call) or original(
                            self, call, position))
    jaccli.save_model(cnn, CNN_SPEC, tmp_path / "cnn.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(6, 2, 6, 6)))
    run_compute(compute_settings(model=tmp_path / "cnn.safetensors", data=tmp_path / "x.npy",
                              batch_size=2))
    assert len(calls) == 1  # one conv layer, three batches: its shared map is built once


def test_out_of_memory_halves_the_batch_and_retries(tmp_path, mlp, monkeypatch):
    import numpy as np

    from jaccli.pipelines.compute import prepare, run_compute
    from jaccli.pipelines.engines import GraphRun
    from jaccli.settings import ComputeSettings
    compute_settings = ComputeSettings.from_options

    from .conftest import MLP_SPEC

    jaccli.save_model(mlp, MLP_SPEC, tmp_path / "m.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(7, 6)))
    config = compute_settings(model=tmp_path / "m.safetensors", data=tmp_path / "x.npy",
                           dtype="float64", batch_size=7, output=tmp_path / "small.h5")
    reference = run_compute(config)
    original = GraphRun.compute

    def tight(self, x, **options):
        if x.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return original(self, x, **options)

    monkeypatch.setattr(GraphRun, "compute", tight)
    config.output.path = tmp_path / "split.h5"
    prepared = prepare(config)
    summary = run_compute(config, prepared=prepared)
    assert summary.batch_size == 1  # 7 -> 3 -> 1 (3 still too big)
    with jaccli.open_results(tmp_path / "split.h5") as r:
        assert r.attrs["batch_size"] == 1  # the size actually used, not the planned 7
    for a, b in zip(summary.entries, reference.entries, strict=True):
        assert a.frobenius_mean == pytest.approx(b.frobenius_mean, rel=1e-12)
    with jaccli.open_results(tmp_path / "split.h5") as r1, \
            jaccli.open_results(tmp_path / "small.h5") as r2:
        for g1, g2 in zip(r1.groups(), r2.groups(), strict=True):
            np.testing.assert_allclose(np.asarray(g1.jacobian), np.asarray(g2.jacobian))


@pytest.mark.parametrize(("model", "shape", "method"), [
    (nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                   nn.Linear(12, 4)), (2, 4, 4), "reverse accumulation"),
    (nn.Sequential(nn.ConvTranspose2d(1, 2, 2, stride=2), nn.Tanh(), nn.Flatten(),
                   nn.Linear(32, 40)), (1, 2, 2), "forward accumulation"),
    (nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid()), (3,),
     "chain product"),
])
def test_end_to_end_strategies_match_reference(model, shape, method):
    from jaccli.engine.engine import END_TO_END, JacobianEngine
    from jaccli.tracing.layers import trace_layers
    from jaccli.tracing.recorder import ForwardRecorder

    model = model.double().eval()
    x = torch.randn(3, *shape, dtype=torch.float64)
    trace = trace_layers(model, x)
    engine = JacobianEngine(model, trace, layers=[], end_to_end=True, n_samples=3)
    assert engine.end_to_end_method == method
    _, records = ForwardRecorder(model).run(x)
    result = engine.compute(x, {r.site: r for r in records})
    assert list(result) == [END_TO_END]
    torch.testing.assert_close(result[END_TO_END].dense(3), reference_jacobian(model, x))


def test_block_operators_equal_dense_products():
    """J V and Jᵀ U without forming J, for every kind of site (conv, selection, dense rule,
    generic) and for the end-to-end Jacobian."""
    from jaccli.engine.engine import END_TO_END, JacobianEngine
    from jaccli.tracing.layers import trace_layers
    from jaccli.tracing.recorder import ForwardRecorder

    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(12, 4), nn.LayerNorm(4), Square()
                          ).double().eval()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    trace = trace_layers(model, x)
    engine = JacobianEngine(model, trace, layers=trace.layers, end_to_end=True, n_samples=3)
    _, calls = ForwardRecorder(model).run(x)
    records = {r.site: r for r in calls}
    dense = {name: j.dense(3) for name, j in engine.compute(x, records).items()}
    operators = {layer.name: engine.layer_operator(layer, records) for layer in trace.layers}
    operators[END_TO_END] = engine.end_to_end_operator(x, records)
    for name, (apply_j, apply_jt) in operators.items():
        jac = dense[name]
        v = torch.randn(3, jac.shape[2], 5, dtype=torch.float64)
        u = torch.randn(3, jac.shape[1], 5, dtype=torch.float64)
        torch.testing.assert_close(apply_j(v), jac @ v, msg=name)
        torch.testing.assert_close(apply_jt(u), jac.transpose(1, 2) @ u, msg=name)


def test_hook_fallback_sees_in_place_changes_between_modules():
    """`h *= 2` between two modules keeps the tensor, not its value: the module-hook path (the
    fallback when no graph can be captured) must not chain the layer Jacobians then."""
    from jaccli.pipelines.hook_engine import HookRun
    from jaccli.tracing.layers import trace_layers

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            h = self.a(x)
            h *= 2
            return self.b(h)

    model = Scaled().double().eval()
    x = torch.randn(4, 3, dtype=torch.float64)
    trace = trace_layers(model, x)
    assert not trace.chain
    run = HookRun(model, trace, hookable=True, layers=trace.layers, end_to_end=True,
                  n_samples=4, strict=False, mode="auto", note="test")
    torch.testing.assert_close(run.compute(x)["(end-to-end)"].dense(4),
                               reference_jacobian(model, x))
