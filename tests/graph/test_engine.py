"""The engine on non-chain graphs: shared modules, heads, granularities, chain detection, the
generic route and its fallbacks, and per-sample parameter Jacobians of a loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from jaccli.graph import END_TO_END, GraphEngine, capture
from jaccli.graph.rules.generic import op_jacobian_generic
from jaccli.graph.trace import Trace

from .helpers import (
    call_inputs,
    reference_jacobian,
    reference_layer,
    reference_param_jacobians,
    relative_error,
)
from .zoo import ZOO


class SharedActivation(nn.Module):
    """Not a chain: a residual connection and one activation module called twice."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4)))
        self.act = nn.Tanh()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.act(self.inner(x))
        return self.out(self.act(h + x))


def _setup(model, *shape, batch=3):
    torch.manual_seed(0)
    model = model.double().eval()
    x = torch.randn(batch, *shape, dtype=torch.float64)
    return model, x, capture(model, x[:1])


def test_a_module_called_twice_gives_two_layers():
    model, x, graph = _setup(SharedActivation(), 4)
    engine = GraphEngine(graph)
    names = [layer.name for layer in engine.layers]
    assert names == ["inner.0", "inner.1.0", "act#0", "act#1", "out"]
    result = engine.compute(x)
    trace = Trace(graph, x)
    for layer in engine.layers:
        reference = reference_layer(model, x, layer.members, trace.values[layer.output])
        assert relative_error(result[layer.name].dense(3), reference) < 1e-12, layer.name
    assert relative_error(result[END_TO_END].dense(3), reference_jacobian(model, x)) < 1e-12
    assert not engine.is_chain() and engine.plan().end_to_end.chain is False


def test_chains_are_recognised():
    model, _, graph = _setup(nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)), 3)
    assert GraphEngine(graph).is_chain()
    mtcnn, shape = ZOO["mtcnn"]()
    graph = capture(mtcnn, torch.randn(1, *shape))
    assert GraphEngine(graph, output=0).is_chain()  # the box head does not reach output 0
    assert not GraphEngine(graph).is_chain()  # both heads: a branch


def test_several_heads_stack_into_the_end_to_end_jacobian():
    torch.manual_seed(0)
    model, shape = ZOO["mtcnn"]()
    model = model.double()
    x = torch.randn(2, *shape, dtype=torch.float64)
    graph = capture(model, x[:1])
    both = GraphEngine(graph).compute(x)[END_TO_END].dense(2)
    heads = [GraphEngine(graph, output=i).compute(x)[END_TO_END].dense(2) for i in (0, 1)]
    torch.testing.assert_close(both, torch.cat(heads, dim=1), rtol=0, atol=0)


def test_granularities_name_layers_after_modules_blocks_and_ops():
    torch.manual_seed(0)
    model, shape = ZOO["resnet"]()
    graph = capture(model, torch.randn(1, *shape))
    blocks = {layer.name: layer.members for layer in GraphEngine(graph, granularity="block")
              .layers}
    assert blocks["conv1+bn1+relu"] == ["conv1", "bn1", "relu"]
    assert blocks["layer1.0.conv2+layer1.0.bn2"] == ["layer1.0.conv2", "layer1.0.bn2"]
    assert blocks["fc"] == ["fc"]  # (conv2's block stops at bn2: then `+= identity`)
    ops = [layer.name for layer in GraphEngine(graph, granularity="op").layers]
    assert "layer1.0/add" in ops and "layer2.0/relu" in ops  # functional ops inside blocks
    assert "layer1.0.conv1/convolution" in ops and len(ops) == len(set(ops))
    module = [layer.name for layer in GraphEngine(graph, layer_patterns=["layer2.*"]).layers]
    assert module and all(name.startswith("layer2.") for name in module)


def test_the_plan_says_how_each_layer_is_done_before_running():
    torch.manual_seed(0)
    model, shape = ZOO["vit"]()
    engine = GraphEngine(capture(model, torch.randn(1, *shape)))
    plan = {layer.name: layer for layer in engine.plan().layers}
    attention = plan["encoder.self_attn"]
    assert attention.generic and attention.mode in ("rev", "fwd", "mixed")
    assert any("region" in op.note for op in attention.ops)
    assert plan["attn.qkv"].structure == "shared-kronecker" and plan["attn.qkv"].mode == "rule"
    assert plan["norm1"].ops[0].rules == ["layer-norm"]
    assert plan["patch"].input_shape == (3, 8, 8) and plan["patch"].output_shape == (8, 2, 2)


class OnlyLoops(torch.autograd.Function):
    """y = x³ with no vmap support at all: every vmapped route fails."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * grad


def test_the_generic_route_falls_back_to_a_loop_and_says_so():
    x = torch.randn(3, 4, dtype=torch.float64)
    jac, route = op_jacobian_generic(lambda xi: (torch.sin(xi) * xi.sum(),), [x], [0])
    assert route == "vmap-rev"
    reference = reference_jacobian(lambda v: torch.sin(v) * v.sum(dim=1, keepdim=True), x)
    assert relative_error(jac, reference) < 1e-12
    jac, route = op_jacobian_generic(lambda xi: (OnlyLoops.apply(xi),), [x], [0])
    assert route == "loop"
    torch.testing.assert_close(jac, torch.diag_embed(3 * x ** 2))


def test_prelu_is_right_where_vmap_jacrev_is_not():
    # torch 2.13: vmap(jacrev) through PReLU is wrong when the batch equals D_out; the
    # pointwise rule never goes through it
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4))
    model[1].weight.data.uniform_(0.1, 0.4)
    model, x, graph = _setup(model, 3, batch=4)
    engine = GraphEngine(graph)
    result = engine.compute(x)
    assert relative_error(result[END_TO_END].dense(4), reference_jacobian(model, x)) < 1e-12
    assert not engine.routes
    slopes = engine.param_jacobians(x, param_names=["1.weight"])["1.weight"]
    params = dict(model.named_parameters())
    for i in range(4):
        reference = torch.autograd.functional.jacobian(
            lambda w, i=i: functional_call(model, {**params, "1.weight": w}, (x[i:i + 1],))[0],
            params["1.weight"].detach())
        assert relative_error(slopes[i], reference) < 1e-12


def test_parameter_jacobians_of_a_per_sample_loss():
    torch.manual_seed(0)
    model, shape = ZOO["mobilenet"]()
    model = model.double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    targets = torch.tensor([0, 2, 1])

    def loss(out, t):
        return F.cross_entropy(out, t, reduction="none")

    engine = GraphEngine(capture(model, x[:1]))
    grads = engine.param_jacobians(
        x, loss, ["se.fc1.*", "depthwise.1.weight", "classifier.3.bias"], targets)
    assert set(grads) == {"se.fc1.weight", "se.fc1.bias", "depthwise.1.weight",
                          "classifier.3.bias"}
    params = dict(model.named_parameters())
    for name, value in grads.items():
        for i in range(3):
            def f(p, i=i, name=name):
                out = functional_call(model, {**params, name: p}, (x[i:i + 1],))
                return loss(out, targets[i:i + 1])[0]
            reference = torch.autograd.functional.jacobian(f, params[name].detach())
            assert value[i].shape == params[name].shape
            assert relative_error(value[i], reference) < 1e-10, name


@pytest.mark.parametrize("what", ["outputs", "index", "cross-entropy", "mse"])
def test_parameter_jacobians_of_the_built_in_objectives(what):
    """The CLI's objectives (differentiated by batch autograd, or the identity for the
    outputs) against per-sample float64 autograd of the eager model."""
    from jaccli.params.objectives import objective

    torch.manual_seed(1)
    model, shape = ZOO["resnet"]()
    model = model.double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    n_out = model(x).shape[1]
    targets = {"cross-entropy": torch.tensor([0, n_out - 1, 1]),
               "mse": torch.randn(3, n_out, dtype=torch.float64)}.get(what)
    fn = objective(output_index=n_out - 1 if what == "index" else None,
                   loss=what if targets is not None else None)
    engine = GraphEngine(capture(model, x[:1]))
    names = [n for n, _ in model.named_parameters()][-3:]
    grads = engine.param_jacobians(x, fn, names, targets)
    params = dict(model.named_parameters())
    for name in names:
        for i in range(3):
            def f(p, i=i, name=name):
                out = functional_call(model, {**params, name: p}, (x[i:i + 1],))
                return fn(out, None if targets is None else targets[i:i + 1])[0]
            reference = torch.autograd.functional.jacobian(f, params[name].detach())
            assert grads[name][i].shape == reference.shape
            assert relative_error(grads[name][i], reference) < 1e-10, (what, name)


def test_a_wrapped_built_in_objective_is_differentiated_as_written():
    """`functools.wraps` copies a built-in objective's attributes onto a user's wrapper; the
    wrapper must still be differentiated itself (twice the outputs: twice the Jacobians)."""
    import functools

    from jaccli.params.objectives import objective

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    base = objective()

    @functools.wraps(base)
    def doubled(out, targets):
        return 2 * base(out, targets)

    engine = GraphEngine(capture(model, x[:1]))
    got = engine.param_jacobians(x, doubled, ["0.weight"])["0.weight"]
    expected = reference_param_jacobians(model, x, ["0.weight"])["0.weight"]
    assert relative_error(got, 2 * expected) < 1e-12


class _Convolutions(nn.Module):
    """1d dilated grouped, 2d transposed strided with output padding, 3d padded."""

    def __init__(self):
        super().__init__()
        self.one = nn.Conv1d(4, 6, 3, dilation=2, groups=2, padding=1)
        self.two = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
        self.three = nn.Conv3d(1, 2, 2, padding=1, bias=False)

    def forward(self, x):  # x: (B, 4, 8)
        h = torch.tanh(self.one(x))                       # (B, 6, 6)
        h = self.two(h.reshape(-1, 2, 3, 6))              # (B, 3, 6, 12)
        return self.three(h[:, None]).flatten(1)          # (B, 2 * 4 * 7 * 13)


def test_parameter_jacobians_of_convolution_variants():
    torch.manual_seed(2)
    model = _Convolutions().double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    engine = GraphEngine(capture(model, x[:1]))
    got = engine.param_jacobians(x)
    expected = reference_param_jacobians(model, x)
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert relative_error(got[name].reshape(value.shape), value) < 1e-12, name


def test_routes_of_generic_ops_are_recorded():
    torch.manual_seed(0)
    model, shape = ZOO["recurrent"]()
    engine = GraphEngine(capture(model.double(), torch.randn(1, *shape, dtype=torch.float64)))
    engine.compute(torch.randn(2, *shape, dtype=torch.float64))
    assert engine.routes and set(engine.routes.values()) <= {"vmap-rev", "vmap-fwd", "loop"}


def test_call_inputs_numbers_calls_like_the_engine():
    model, x, _ = _setup(SharedActivation(), 4)
    assert {"act#0", "act#1"} <= set(call_inputs(model, x))


@pytest.mark.parametrize("granularity", ["module", "block", "op"])
def test_every_granularity_matches_the_end_to_end_reference(granularity):
    model, x, graph = _setup(SharedActivation(), 4)
    result = GraphEngine(graph, granularity=granularity).compute(x)
    assert relative_error(result[END_TO_END].dense(3), reference_jacobian(model, x)) < 1e-12


class Odd(nn.Module):
    """Returns its input untouched, a per-sample scalar, and a constant-free reduction."""

    def forward(self, x):
        return x, (x ** 2).sum(dim=1), torch.cumsum(x, dim=1)


def test_outputs_that_are_the_input_or_per_sample_scalars():
    model, x, graph = _setup(Odd(), 4)
    engine = GraphEngine(graph)
    result = engine.compute(x)
    assert relative_error(result[END_TO_END].dense(3), reference_jacobian(model, x)) < 1e-12
    identity = GraphEngine(graph, output=0).compute(x)[END_TO_END]
    assert identity.tag == "identity"
    op = GraphEngine(graph, output=0).end_to_end_operator(x)
    v = torch.randn(3, 4, 2, dtype=torch.float64)
    torch.testing.assert_close(op.jvp(v), v)
    torch.testing.assert_close(op.vjp(v), v)


def test_shared_factors_are_multiplied_once_for_all_samples():
    linear = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 4), nn.Dropout(0.1), nn.Linear(4, 3))
    model, x, graph = _setup(linear, 5, batch=7)
    engine = GraphEngine(graph)
    jac = engine.compute(x)[END_TO_END]
    assert jac.tag == "shared" and jac.batch == 1  # one matrix, not one per sample
    assert engine.plan().end_to_end.structure == "shared"
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    torch.testing.assert_close(jac.dense()[0], weights[2] @ weights[1] @ weights[0])


class Fuse(nn.Module):
    def forward(self, a, b):
        return a * b + a


class TwoInputModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.fuse = Fuse()

    def forward(self, x):
        return self.fuse(torch.tanh(x), torch.sigmoid(x))


def test_a_module_with_two_inputs_reports_one_pair_and_says_so():
    model, x, graph = _setup(TwoInputModule(), 4)
    engine = GraphEngine(graph)
    (layer,) = engine.layers
    assert layer.name == "fuse" and "2 inputs" in layer.note and layer.input == "tanh"
    reference = reference_layer(model, x, ["fuse"], Trace(graph, x).values[layer.output])
    assert relative_error(engine.compute(x)["fuse"].dense(3), reference) < 1e-12
