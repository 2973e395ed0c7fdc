"""The generic (torch.func) path never returns a wrong Jacobian: every route is checked against
per-sample `torch.autograd.functional.jacobian` in float64, broken routes are detected and
replaced, and a function no route can differentiate is refused with a one-line error."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jaccli.api import end_to_end_jacobian, jacobian
from jaccli.engine import generic
from jaccli.engine.generic import (
    last_report,
    per_sample_jacobian,
    per_sample_jacobian_verified,
    verification_cost,
)
from jaccli.engine.vmap_hazards import HAZARDS, TORCH_VERSION_SWEPT, VMAP_FWD, VMAP_REV
from jaccli.errors import ModelRunError

from .conftest import reference_jacobian

D_IN, HIDDEN, D_OUT = 3, 6, 4


def prelu_net() -> nn.Module:
    """The reproduction: vmap(jacrev) over it is wrong at N = D_out = 4 and raises at N = 5."""
    model = nn.Sequential(nn.Linear(8, 16), nn.PReLU(16), nn.Linear(16, 4)).double()
    with torch.no_grad():
        model[1].weight.uniform_(-1.0, 1.0)  # distinct slopes, some negative
    return model.eval()


class ConvNet(nn.Module):
    """`(N, 9)` -> `(N, 1, 3, 3)` -> Conv2d(1, 2, 2) -> `(N, 2, 2, 2)` -> module -> Linear -> 4."""

    def __init__(self, module: nn.Module, flat: int = 8):
        super().__init__()
        self.conv, self.module, self.head = nn.Conv2d(1, 2, 2), module, nn.Linear(flat, D_OUT)

    def forward(self, x):
        return self.head(self.module(self.conv(x.reshape(-1, 1, 3, 3))).flatten(1))


def between_linears(module: nn.Module, width_out: int = HIDDEN) -> nn.Module:
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), module, nn.Linear(width_out, D_OUT))


SWEEP = {
    "ReLU": lambda: between_linears(nn.ReLU()),
    "ReLU6": lambda: between_linears(nn.ReLU6()),
    "LeakyReLU": lambda: between_linears(nn.LeakyReLU(0.1)),
    "PReLU": lambda: between_linears(nn.PReLU()),
    "PReLU(C)": lambda: between_linears(nn.PReLU(HIDDEN)),
    "RReLU(eval)": lambda: between_linears(nn.RReLU()),
    "ELU": lambda: between_linears(nn.ELU()),
    "CELU": lambda: between_linears(nn.CELU(0.7)),
    "SELU": lambda: between_linears(nn.SELU()),
    "GELU": lambda: between_linears(nn.GELU()),
    "GELU(tanh)": lambda: between_linears(nn.GELU(approximate="tanh")),
    "SiLU": lambda: between_linears(nn.SiLU()),
    "Mish": lambda: between_linears(nn.Mish()),
    "Softplus": lambda: between_linears(nn.Softplus(beta=2.0)),
    "Softsign": lambda: between_linears(nn.Softsign()),
    "Softshrink": lambda: between_linears(nn.Softshrink(0.1)),
    "Hardshrink": lambda: between_linears(nn.Hardshrink(0.1)),
    "Tanhshrink": lambda: between_linears(nn.Tanhshrink()),
    "Hardtanh": lambda: between_linears(nn.Hardtanh(-0.5, 0.5)),
    "Hardswish": lambda: between_linears(nn.Hardswish()),
    "Hardsigmoid": lambda: between_linears(nn.Hardsigmoid()),
    "Sigmoid": lambda: between_linears(nn.Sigmoid()),
    "LogSigmoid": lambda: between_linears(nn.LogSigmoid()),
    "Tanh": lambda: between_linears(nn.Tanh()),
    "Threshold": lambda: between_linears(nn.Threshold(0.1, 2.0)),
    "Softmax": lambda: between_linears(nn.Softmax(dim=1)),
    "LogSoftmax": lambda: between_linears(nn.LogSoftmax(dim=1)),
    "Softmin": lambda: between_linears(nn.Softmin(dim=1)),
    "GLU": lambda: between_linears(nn.GLU(), HIDDEN // 2),
    "LayerNorm": lambda: between_linears(nn.LayerNorm(HIDDEN)),
    "RMSNorm": lambda: between_linears(nn.RMSNorm(HIDDEN)),
    "GroupNorm": lambda: between_linears(nn.GroupNorm(2, HIDDEN)),
    "BatchNorm1d(eval)": lambda: between_linears(nn.BatchNorm1d(HIDDEN)),
    "BatchNorm2d(eval)": lambda: ConvNet(nn.BatchNorm2d(2)),
    "InstanceNorm2d(eval)": lambda: ConvNet(nn.InstanceNorm2d(2, affine=True,
                                                              track_running_stats=True)),
    "InstanceNorm2d": lambda: ConvNet(nn.InstanceNorm2d(2, affine=True)),
    "GroupNorm(conv)": lambda: ConvNet(nn.GroupNorm(1, 2)),
    "LayerNorm(conv)": lambda: ConvNet(nn.LayerNorm([2, 2, 2])),
    "LocalResponseNorm(conv)": lambda: ConvNet(nn.LocalResponseNorm(2)),
    "Softmax2d(conv)": lambda: ConvNet(nn.Softmax2d()),
    "PReLU(conv, C)": lambda: ConvNet(nn.PReLU(2)),
    "MaxPool2d(conv)": lambda: ConvNet(nn.MaxPool2d(2), 2),
}
# Classes whose op is in the hazard table: their broken routes are skipped up front.
HAZARDOUS = {"PReLU": {VMAP_REV}, "PReLU(C)": {VMAP_REV}, "PReLU(conv, C)": {VMAP_REV},
             "RReLU(eval)": {VMAP_REV, VMAP_FWD, "chunk1-rev", "chunk1-fwd"}}


def nontrivial(model: nn.Module) -> nn.Module:
    """float64, eval mode, running statistics and affine parameters away from their defaults."""
    for m in model.modules():
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        if isinstance(m, nn.PReLU):
            m.weight.data.uniform_(-1.0, 1.0)
        elif not isinstance(m, (nn.Linear, nn.Conv2d)):
            for name, p in m.named_parameters(recurse=False):
                p.data.uniform_(0.5, 1.5) if name == "weight" else p.data.uniform_(-0.5, 0.5)
    return model.double().eval()


def test_prelu_reproduction_is_correct_at_and_around_n_equal_d_out():
    model = prelu_net()
    for n in (4, 5, 1):
        x = torch.randn(n, 8, dtype=torch.float64)
        expected = reference_jacobian(model, x)
        torch.testing.assert_close(per_sample_jacobian(model, x, mode="rev"), expected,
                                   rtol=1e-10, atol=1e-12)
        report = last_report()
        assert report.route != VMAP_REV and report.rejected[0][0] == VMAP_REV
        assert "known hazard aten._prelu_kernel" in report.rejected[0][1]
        assert report.hazards == ("aten._prelu_kernel",)
        torch.testing.assert_close(end_to_end_jacobian(model, x), expected,
                                   rtol=1e-10, atol=1e-12)


def test_prelu_in_torchscript_is_recognized():
    model = torch.jit.script(prelu_net())
    x = torch.randn(4, 8, dtype=torch.float64)
    jac, report = per_sample_jacobian_verified(model, x, mode="rev")
    torch.testing.assert_close(jac, reference_jacobian(model, x), rtol=1e-10, atol=1e-12)
    assert report.name == "Sequential" and report.rejected[0][0] == VMAP_REV


def test_the_probe_check_alone_catches_the_prelu_bug(monkeypatch):
    """With the hazard table switched off, vmap(jacrev) runs: its wrong numbers at N = D_out
    are refused by the probes, its RuntimeError at N = 5 is caught, and the next route is used."""
    monkeypatch.setattr(generic, "skipped_routes", lambda hazards: {})
    model = prelu_net()
    for n, why in ((4, "probe error"), (5, "raised RuntimeError")):
        x = torch.randn(n, 8, dtype=torch.float64)
        jac, report = per_sample_jacobian_verified(model, x, mode="rev", name="prelu net")
        torch.testing.assert_close(jac, reference_jacobian(model, x), rtol=1e-10, atol=1e-12)
        assert report.route == VMAP_FWD and report.rejected[0][0] == VMAP_REV
        assert report.rejected[0][1].startswith(why), report.rejected
        assert report.error <= report.tolerance
        if n == 4:  # "probe error 0.17 > tolerance ...": far off, not a rounding matter
            assert float(report.rejected[0][1].split()[2]) > 1e-3


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # GLU's jvp under vmap
@pytest.mark.parametrize("case", list(SWEEP))
def test_sweep_every_activation_and_normalization(case):
    """N = 1..D_out+1, both modes, float64: equal to the per-sample autograd reference, and
    only the hazard table's routes are ever skipped or refused (the table is complete)."""
    torch.manual_seed(1)
    model = nontrivial(SWEEP[case]())
    d_in = 9 if isinstance(model, ConvNet) else D_IN
    for mode in ("rev", "fwd"):
        for n in range(1, D_OUT + 2):
            x = torch.randn(n, d_in, dtype=torch.float64)
            jac, report = per_sample_jacobian_verified(model, x, mode=mode, seed=n)
            torch.testing.assert_close(jac, reference_jacobian(model, x), rtol=1e-10,
                                       atol=1e-12, msg=f"{case} {mode} N={n}")
            assert {route for route, _ in report.rejected} <= HAZARDOUS.get(case, set())
            assert all("known hazard" in why for _, why in report.rejected)
            assert report.error <= report.tolerance < 1e-7


def corrupting(route_fn, scale: float):
    def corrupted(*args):
        jac = route_fn(*args)
        return jac + scale * jac.abs().max() * torch.randn(jac.shape, dtype=jac.dtype)
    return corrupted


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float64, 1e-6), (torch.float32, 1e-2)])
def test_an_injected_wrong_route_is_detected_and_replaced(monkeypatch, dtype, scale):
    monkeypatch.setitem(generic.ROUTES, VMAP_REV, corrupting(generic.ROUTES[VMAP_REV], scale))
    model = nontrivial(between_linears(nn.Tanh())).to(dtype)
    x = torch.randn(6, D_IN, dtype=dtype)
    jac, report = per_sample_jacobian_verified(model, x, mode="rev", name="tanh net", seed=3)
    expected = reference_jacobian(model.double(), x).to(dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(jac, expected, rtol=tol, atol=tol)
    assert report.route == VMAP_FWD and [r for r, _ in report.rejected] == [VMAP_REV]
    assert report.rejected[0][1].startswith("probe error")
    assert len(report.checked) == 1 and 0 <= report.checked[0] < 6


def test_an_injected_nan_is_detected(monkeypatch):
    def with_nan(*args):
        jac = generic.ROUTES[VMAP_FWD](*args).clone()
        jac[:, 1, 0] = float("nan")  # the true Jacobian is finite everywhere
        return jac
    monkeypatch.setitem(generic.ROUTES, VMAP_REV, with_nan)
    model = nontrivial(between_linears(nn.SiLU()))
    x = torch.randn(3, D_IN, dtype=torch.float64)
    jac, report = per_sample_jacobian_verified(model, x, mode="rev")
    assert report.rejected[0] == (VMAP_REV, f"probe error inf > tolerance {report.tolerance:.1g} "
                                            f"on sample {report.checked[0]}")
    torch.testing.assert_close(jac, reference_jacobian(model, x), rtol=1e-10, atol=1e-12)


def test_no_false_alarm_in_float32_on_a_wider_deeper_net():
    torch.manual_seed(2)
    layers = [nn.Linear(48, 64)]
    for _ in range(4):
        layers += [nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 64)]
    model = nn.Sequential(*layers).eval()
    x = torch.randn(8, 48)
    jac, report = per_sample_jacobian_verified(model, x, mode="rev", checks=8)
    assert report.route == VMAP_REV and report.rejected == []
    assert report.checked and report.error <= report.tolerance
    expected = reference_jacobian(model.double(), x.double())
    assert float((jac.detach().double() - expected).norm() / expected.norm()) < 1e-5


def test_every_route_wrong_raises_model_run_error_naming_the_function(monkeypatch):
    for route, fn in list(generic.ROUTES.items()):
        monkeypatch.setitem(generic.ROUTES, route, corrupting(fn, 1e-3))
    x = torch.randn(3, D_IN, dtype=torch.float64)
    with pytest.raises(ModelRunError) as info:
        per_sample_jacobian(nontrivial(between_linears(nn.Tanh())), x, mode="rev",
                            name="block7.act")
    message = str(info.value)
    assert message.startswith("block7.act: ") and "\n" not in message
    for route in ("vmap-rev", "vmap-fwd", "chunk1-rev", "loop-rev"):
        assert f"{route}: probe error" in message


def test_a_function_no_route_can_differentiate_is_refused():
    """NumPy inside the function: it runs, but no torch.func transform can see through it."""
    def through_numpy(xb):
        return torch.from_numpy(xb.detach().numpy() * 2.0)

    with pytest.raises(ModelRunError, match=r"^numpy head cannot be differentiated by "
                                            r"torch\.func \(raised .*\); leave it out with "
                                            r"--layers"):
        per_sample_jacobian(through_numpy, torch.randn(2, 3, dtype=torch.float64),
                            name="numpy head")


def test_out_of_memory_is_not_swallowed(monkeypatch):
    def exhausted(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setitem(generic.ROUTES, VMAP_REV, exhausted)
    with pytest.raises(RuntimeError, match="out of memory"):
        per_sample_jacobian(nontrivial(between_linears(nn.Tanh())),
                            torch.randn(2, D_IN, dtype=torch.float64), mode="rev")


def test_loop_route_with_batched_extra_inputs():
    """RReLU has no vmap batching rule: only the loop without vmap works, extras included."""
    def scaled_rrelu(xb, scale):
        return F.rrelu(xb * scale, 0.1, 0.3, training=False).flip(1)

    x, scale = torch.randn(3, 5, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64)
    jac, report = per_sample_jacobian_verified(scaled_rrelu, x, [scale], mode="fwd")
    expected = torch.stack([
        torch.autograd.functional.jacobian(lambda v, s=s: scaled_rrelu(v[None], s[None])[0], xi)
        for xi, s in zip(x, scale, strict=True)])
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=1e-14)
    assert report.route == "loop-fwd" and report.hazards == ("aten.rrelu_with_noise",)


def test_non_finite_jacobian_entries_are_returned_not_refused():
    """sqrt at 0 has an infinite derivative: the route and the probes agree on where."""
    x = torch.tensor([[0.0, 1.0, 4.0], [9.0, 0.0, 0.25]], dtype=torch.float64)
    jac, report = per_sample_jacobian_verified(torch.sqrt, x, checks=2)
    expected = reference_jacobian(torch.sqrt, x)
    assert torch.isinf(expected).sum() == 2
    torch.testing.assert_close(jac, expected, equal_nan=True)
    assert report.checked and report.rejected == []


def test_in_place_residual_net_with_prelu():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.act, self.b = nn.Linear(4, 4), nn.PReLU(4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            h += x  # in place, on a non-leaf
            return self.b(self.act(h)).relu_()

    model = nontrivial(Residual())
    x = torch.randn(4, 4, dtype=torch.float64)
    torch.testing.assert_close(per_sample_jacobian(model, x, mode="rev"),
                               reference_jacobian(model, x), rtol=1e-10, atol=1e-12)


def test_create_graph_gradients_survive_the_route_switch():
    """The penalty's parameter gradient through PReLU equals autograd.functional's."""
    model = prelu_net()
    params = list(model.parameters())
    x = torch.randn(4, 8, dtype=torch.float64)
    ours = torch.autograd.grad(jacobian(model, x, create_graph=True).square().sum(), params,
                               materialize_grads=True)
    assert last_report().route == VMAP_FWD
    total = sum(torch.autograd.functional.jacobian(lambda v: model(v[None])[0], xi,
                                                   create_graph=True).square().sum()
                for xi in x)
    theirs = torch.autograd.grad(total, params, materialize_grads=True)
    assert ours[2].abs().max() > 0  # the PReLU slopes do enter the Jacobian
    for mine, expected in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-10, atol=1e-12)


def test_checked_samples_are_seeded_and_vary_between_calls():
    model = nontrivial(between_linears(nn.Tanh()))
    x = torch.randn(50, D_IN, dtype=torch.float64)
    first = per_sample_jacobian_verified(model, x, seed=7)[1].checked
    assert per_sample_jacobian_verified(model, x, seed=7)[1].checked == first
    drawn = {per_sample_jacobian_verified(model, x)[1].checked for _ in range(5)}
    assert len(drawn) > 1
    assert per_sample_jacobian_verified(model, x, verify=False)[1].checked == ()


def test_verification_cost_is_a_small_fraction_for_realistic_sizes():
    assert verification_cost(256, 256) < 0.1
    assert verification_cost(256, 256, n=32, mode="fwd") < 0.01
    assert verification_cost(4, 1, n=1) > 0.1  # a scalar output: the check is not cheap


@pytest.mark.skipif(torch.__version__.split("+")[0] != TORCH_VERSION_SWEPT,
                    reason="the hazard table records torch " + TORCH_VERSION_SWEPT)
def test_the_hazard_table_still_describes_this_torch():
    """Run the raw broken routes: if torch fixed them, the table (and its skips) can go."""
    model = prelu_net()
    x = torch.randn(4, 8, dtype=torch.float64)
    single = generic._one_sample(model)
    wrong = generic.ROUTES[VMAP_REV](single, x, (), 4, None).reshape(4, 4, 8)
    assert (wrong - reference_jacobian(model, x)).abs().max() > 1e-3
    with pytest.raises(RuntimeError):
        generic.ROUTES[VMAP_REV](single, torch.randn(5, 8, dtype=torch.float64), (), 4, None)
    with pytest.raises(RuntimeError, match="rrelu_with_noise"):
        generic.ROUTES[VMAP_FWD](generic._one_sample(nn.RReLU().eval()), x, (), 8, None)
    assert {h.op for h in HAZARDS} == {"aten._prelu_kernel", "aten.rrelu_with_noise"}
