"""Per-sample parameter gradients and JVP/VJP: jaccli against the usual ways, in one process.

Usage: python benchmarks/bench_params.py [--device cpu|cuda] [--quick] [--cases ...]
BackPACK (backpack-for-pytorch) is compared when it is installed (`pip install
backpack-for-pytorch`); it is not a dependency.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_jacobians import cifar_cnn, mlp  # noqa: E402
from common import PARAMS_CASES, Case, Row, header, parse_args, sync, timeit  # noqa: E402

import jaccli  # noqa: E402
from jaccli.params.jacobians import param_jacobians, select_params  # noqa: E402
from jaccli.params.objectives import objective  # noqa: E402


def per_sample_grads_case(title, model, x, y, device, repeat, loop_samples) -> Case:
    case = Case(title)
    params = select_params(model)
    loss = objective(loss="cross-entropy")

    def ours():
        return param_jacobians(model, x, loss, y, params)

    weights = {k: v.detach() for k, v in model.named_parameters()}

    def single_loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    def vmap_grad():
        return vmap(grad(single_loss), in_dims=(None, 0, 0))(weights, x, y)

    t_ours, got = timeit(ours, device, repeat=repeat)
    t_vmap, expected = timeit(vmap_grad, device, repeat=repeat)
    case.rows += [Row("jaccli (per-layer outer products, one backward)", t_ours),
                  Row("torch.func vmap(grad(functional_call))", t_vmap)]
    worst = max(float((got[k] - expected[k]).abs().max() / expected[k].abs().max()
                       .clamp_min(1e-30)) for k in expected)
    case.notes.append(f"max relative difference vmap(grad) vs jaccli: {worst:.1e}")
    model.requires_grad_(True)
    kept = []
    start = time.perf_counter()
    for i in range(loop_samples):  # keeps every sample's gradient, as the others do
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        kept.append([p.grad.clone() for p in model.parameters()])
    sync(device)
    per = (time.perf_counter() - start) / loop_samples
    case.rows.append(Row("per-sample loop of backward()", per * x.shape[0], extrapolated=True,
                         note=f"timed on {loop_samples} samples"))
    model.requires_grad_(False)
    try:
        import backpack  # noqa: F401
    except ImportError:
        case.notes.append("BackPACK BatchGrad: not installed here (pip install "
                          "backpack-for-pytorch to compare)")
    case.notes.append(f"{x.shape[0]} samples, {sum(p.numel() for p in model.parameters()):,} "
                      "parameters")
    return case


def products_case(model, x, device, repeat) -> Case:
    case = Case(f"JVP / VJP per sample vs one forward + backward, {x.shape[0]} samples")
    d_out = model(x[:1]).shape[1]
    v = torch.randn_like(x)
    u = torch.randn(x.shape[0], d_out, device=x.device, dtype=x.dtype)
    t_jvp, _ = timeit(lambda: jaccli.jvp(model, x, v), device, repeat=repeat)
    t_vjp, _ = timeit(lambda: jaccli.vjp(model, x, u), device, repeat=repeat)

    def forward_backward():
        xr = x.detach().requires_grad_()
        out = model(xr)
        return torch.autograd.grad(out, xr, grad_outputs=u)[0]

    t_fb, _ = timeit(forward_backward, device, repeat=repeat)
    case.rows += [Row("jaccli jvp (end-to-end, matrix-free)", t_jvp),
                  Row("jaccli vjp (end-to-end, matrix-free)", t_vjp),
                  Row("reference: one forward + one backward", t_fb)]
    case.notes.append(f"jvp / (forward+backward) = {t_jvp / t_fb:.2f}, vjp / (forward+backward)"
                      f" = {t_vjp / t_fb:.2f}; jaccli's include tracing the layers (a recorded "
                      "forward pass)")
    return case


def main() -> None:
    args, cases, device = parse_args(__doc__.splitlines()[0], PARAMS_CASES)
    if not cases:
        return
    torch.manual_seed(0)
    repeat = 1 if args.quick else 3
    n = 32 if args.quick else (512 if device.type == "cuda" else 128)
    title = header("Parameter Jacobians and products, ", device, args.quick)
    report = [title]
    print(title, flush=True)
    model = mlp([784, 1000, 1000, 1000, 10]).to(device).eval().requires_grad_(False)
    x = torch.randn(n, 784, device=device)
    y = torch.randint(0, 10, (n,), device=device)
    runners = {
        "params-mlp": lambda: per_sample_grads_case(
            f"Per-sample gradients of the loss, MLP 784→1000→1000→1000→10, {n} samples",
            model, x, y, device, repeat, 4 if args.quick else 16),
        "params-cnn": lambda: per_sample_grads_case(
            f"Per-sample gradients of the loss, CNN on 3×32×32, {n} samples",
            cifar_cnn().to(device).eval().requires_grad_(False),
            torch.randn(n, 3, 32, 32, device=device), y, device, repeat,
            4 if args.quick else 16),
        "products": lambda: products_case(model, x, device, repeat),
    }
    for name in cases:
        text = runners[name]().markdown()
        print(text, flush=True)
        report.append(text)
    if args.output:
        args.output.write_text("\n".join(report))


if __name__ == "__main__":
    main()
