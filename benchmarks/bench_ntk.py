"""The empirical NTK: jaccli against the two methods of the torch.func NTK tutorial, in one
process (Jacobian contraction; NTK-vector products), written here as the tutorial does.

Usage: python benchmarks/bench_ntk.py [--device cpu|cuda] [--quick] [--cases ...]
       [--peer-memory GIB]
The tutorial methods hold N·C·P (contraction) or N·M·C·P (NTK-vector products) numbers; a
peer whose estimated peak exceeds --peer-memory runs on fewer samples (said in the table),
and jaccli is timed on those samples too, so every ratio compares equal work.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NTK_CASES, Case, PeakMemory, Row, header, parse_args, timeit  # noqa: E402

import jaccli  # noqa: E402
from jaccli.api import _engine, ntk_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def empirical_ntk_jacobian_contraction(fnet_single, params, x1, x2):
    """The tutorial's first method: per-sample Jacobians of all parameters, contracted."""
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = jac1.values()
    jac1 = [j.flatten(2) for j in jac1]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = jac2.values()
    jac2 = [j.flatten(2) for j in jac2]
    result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(
        jac1, jac2, strict=True)])
    return result.sum(0)


def empirical_ntk_ntk_vps(func, params, x1, x2):
    """The tutorial's second method: NTK-vector products (vjp then jvp) per pair of samples."""
    def get_ntk(x1, x2):
        def func_x1(params):
            return func(params, x1)

        def func_x2(params):
            return func(params, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device).view(
            output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    return vmap(vmap(get_ntk, (None, 0)), (0, None))(x1, x2)


def digits_cnn() -> nn.Module:
    return jaccli.load_model(ROOT / "sample_models" / "digits_cnn.safetensors").module


def wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 1000), nn.Tanh(), nn.Linear(1000, 1000), nn.Tanh(),
                         nn.Linear(1000, 1000), nn.Tanh(), nn.Linear(1000, 10))


def peer_samples(n: int, c: int, p: int, itemsize: int, budget: float, pairs: bool) -> int:
    """The most samples (≤ n) whose tutorial intermediates stay under `budget` bytes."""
    while n > 1:
        held = (n * n if pairs else 2 * n) * c * p * itemsize * 1.5
        if held <= budget:
            break
        n //= 2
    return n


def measure(method: str, fn, device, repeat: int, note: str = ""):
    with PeakMemory(device) as peak:
        fn()
    seconds, result = timeit(fn, device, repeat=repeat, warmup=0)
    return Row(method, seconds, peak_bytes=peak.peak, note=note), result


def ntk_case(title: str, model: nn.Module, x: torch.Tensor, device, repeat: int,
             budget: float) -> Case:
    case = Case(title)
    model = model.to(device).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    p = sum(v.numel() for v in params.values())
    n = x.shape[0]
    c = model(x[:1]).numel()

    def fnet_single(params, xi):
        return functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)

    engine = _engine(model, x, end_to_end=False, include_layers=False).engine
    row, ours = measure(f"jaccli (graph captured once; N={n})",
                        lambda: ntk_kernel(engine, x, None, "full")[0], device, repeat)
    case.rows.append(row)
    row, _ = measure(f"jaccli.ntk (API call, capture included; N={n})",
                     lambda: jaccli.ntk(model, x), device, repeat)
    case.rows.append(row)
    for label, method, pairs in (
            ("tutorial: Jacobian contraction", lambda xs: empirical_ntk_jacobian_contraction(
                fnet_single, params, xs, xs), False),
            ("tutorial: NTK-vector products", lambda xs: empirical_ntk_ntk_vps(
                fnet_single, params, xs, xs), True)):
        m = peer_samples(n, c, p, x.element_size(), budget, pairs)
        xs = x[:m]
        note = "" if m == n else f"N={m}: N={n} needs more than --peer-memory"
        row, theirs = measure(f"{label} (N={m})", lambda xs=xs, method=method: method(xs),
                              device, 1 if m < n or pairs else repeat, note)
        if m < n:
            mine, _ = measure(f"jaccli (N={m}, for the row above)",
                              lambda xs=xs: ntk_kernel(engine, xs, None, "full")[0], device,
                              repeat)
            row.note += f"; jaccli on these N={m}: {mine.seconds * 1e3:.1f} ms, " \
                        f"{(mine.peak_bytes or 0) / 2**20:.0f} MiB"
        case.rows.append(row)
        error = float((ours[:m, :m] - theirs).abs().max() / theirs.abs().max())
        case.notes.append(f"{label}: max relative difference to jaccli {error:.1e}")
    case.notes.append(f"P = {p:,} parameters, C = {c} outputs, float32")
    return case


def main() -> None:
    import argparse  # noqa: F401  (parse_args builds the parser)

    extra = "--peer-memory"
    budget_gib = 6.0
    if extra in sys.argv:
        i = sys.argv.index(extra)
        budget_gib = float(sys.argv[i + 1])
        del sys.argv[i:i + 2]
    args, cases, device = parse_args(__doc__.splitlines()[0], NTK_CASES)
    n = 8 if args.quick else 64
    repeat = 1 if args.quick else 3
    report = [header("Empirical NTK, ", device, args.quick)]
    torch.manual_seed(0)
    budget = budget_gib * 2**30
    if "ntk-cnn" in cases:
        x = torch.from_numpy(__import__("numpy").load(
            ROOT / "sample_models" / "digits_test_images.npy")[:n]).to(device)
        report.append(ntk_case(f"sample CNN (digits_cnn), N = {n}, full C×C", digits_cnn(), x,
                               device, repeat, budget).markdown())
    if "ntk-mlp" in cases:
        x = torch.randn(n, 784, device=device)
        report.append(ntk_case(f"784→1000→1000→1000→10 tanh MLP, N = {n}, full C×C",
                               wide_mlp(), x, device, repeat, budget).markdown())
    text = "\n".join(report)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    with torch.no_grad():
        main()
