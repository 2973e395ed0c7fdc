"""The empirical NTK: jaccli against the two methods of the torch.func NTK tutorial, in one
process (Jacobian contraction; NTK-vector products), written here as the tutorial does.

Usage: python benchmarks/bench_ntk.py [--device cpu|cuda] [--quick] [--cases ...]
       [--peer-memory GIB]
The tutorial methods hold N·C·P (contraction) or N·M·C·P (NTK-vector products) numbers; a
peer whose estimated peak exceeds --peer-memory runs on fewer samples (said in the table),
and jaccli is timed on those samples too, so every ratio compares equal work.

Case `ntk-resnet`: `jaccli ntk --trace` (the CLI pipeline, from a `.pt2` file) on a
ResNet-style CNN built here, with a memory budget (`RESNET_BUDGET`) that the tutorial
methods' Jacobians alone exceed at N = 64; they run on a few samples only, to check the
values.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NTK_CASES, Case, PeakMemory, Row, header, parse_args, timeit  # noqa: E402

import jaccli  # noqa: E402
from jaccli.api import _engine, ntk_kernel  # noqa: E402
from jaccli.graph.ntk import ntk_factors, param_routes  # noqa: E402
from jaccli.params.ntk import kernel_total  # noqa: E402

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


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, `out += identity` (1×1 conv-BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += identity
        return self.relu(out)


def resnet_cnn() -> nn.Module:
    """A CIFAR-style ResNet (3×16×16 inputs, stages of 16, 32, 64 channels, two basic blocks
    each, global average pool, 10 outputs), BatchNorm in eval with random statistics."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    for c_in, c_out, stride in ((16, 16, 1), (16, 32, 2), (32, 64, 2)):
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


RESNET_BUDGET = 512 * 2**20


def resnet_trace_case(n: int, device, budget: int = RESNET_BUDGET) -> Case:
    """`jaccli ntk model.pt2 x.npy --trace --max-memory 512MiB` on `resnet_cnn` against what
    the tutorial methods would hold; the tutorial contraction on 4 samples checks values."""
    import tempfile

    import numpy as np

    from jaccli.pipelines.ntk import prepare_ntk
    from jaccli.pipelines.ntk_run import run_ntk
    from jaccli.pipelines.ntk_settings import NtkSettings

    model = resnet_cnn().to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    p = sum(v.numel() for v in params.values())
    c, itemsize = 10, 4
    x = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    case = Case(f"ResNet-style CNN (basic blocks, `out += identity`, BatchNorm eval), "
                f"N = {n}, `--trace`, --max-memory {budget / 2**20:.0f} MiB")
    with tempfile.TemporaryDirectory() as folder:
        path, data = Path(folder) / "resnet.pt2", Path(folder) / "x.npy"
        program = torch.export.export(model.cpu(), (x[:2],),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, path)
        model.to(device)
        np.save(data, x.numpy())
        settings = NtkSettings.from_options(model=path, data=data, trace=True,
                                            max_memory=budget, device=str(device))
        started = time.perf_counter()
        run = prepare_ntk(settings)  # load, capture, plan: before the budget's baseline
        prepared = time.perf_counter() - started
        with PeakMemory(device) as peak:
            started = time.perf_counter()
            summary = run_ntk(settings, run=run)
            seconds = time.perf_counter() - started
        case.rows.append(Row(f"jaccli ntk --trace (N={n}; blocks only)", seconds,
                             peak_bytes=peak.peak,
                             note=f"{summary['blocks']} blocks of {summary['block_size']} "
                                  f"samples; planned peak "
                                  f"{run.blocks.peak_bytes / 2**20:.0f} MiB; load, capture "
                                  f"and plan before: {prepared:.1f} s"))
        small = 4
        settings = NtkSettings.from_options(model=path, data=data, trace=True, limit=small,
                                            max_memory=budget, device=str(device))
        started = time.perf_counter()
        ours = _trace_kernel(settings)
        ours_seconds = time.perf_counter() - started

    def fnet_single(params, xi):
        return functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)

    xs = x[:small].to(device)
    with PeakMemory(device) as peak:
        started = time.perf_counter()
        theirs = empirical_ntk_jacobian_contraction(fnet_single, params, xs, xs)
        seconds = time.perf_counter() - started
    theirs = torch.einsum("nmcc->nm", theirs).cpu()
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    contraction = 2 * n * c * p * itemsize
    products = n * n * c * p * itemsize
    over = {True: "over", False: "within"}
    case.notes += [
        f"P = {p:,} parameters, C = {c} outputs, float32",
        f"tutorial: Jacobian contraction at N = {n}: not run, its two N×C×P Jacobians alone "
        f"hold {contraction / 2**30:.2f} GiB, {over[contraction > budget]} the "
        f"{budget / 2**20:.0f} MiB budget",
        f"tutorial: NTK-vector products at N = {n}: not run, its N·N·C·P vjps hold "
        f"{products / 2**30:.1f} GiB, {over[products > budget]} the budget",
        f"check on N = {small}: the tutorial contraction {seconds:.2f} s (peak "
        f"{peak.peak / 2**20:.0f} MiB), jaccli ntk --trace {ours_seconds:.2f} s (load and "
        f"capture included); max relative difference {error:.1e}"]
    return case


def _trace_kernel(settings) -> torch.Tensor:
    """The `(N, N)` trace kernel `jaccli ntk --trace -o` writes, read back."""
    import tempfile

    import h5py
    import numpy as np

    from jaccli.pipelines.ntk_run import run_ntk

    with tempfile.TemporaryDirectory() as folder:
        settings.output.path = Path(folder) / "trace.h5"
        run_ntk(settings)
        with h5py.File(settings.output.path, "r") as f:
            return torch.from_numpy(np.asarray(f["ntk/kernel"]))


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

    def kernel(xs):  # what `jaccli ntk` computes per block without --per-layer
        routes = param_routes(engine)
        return kernel_total(ntk_factors(engine, xs, routes), None, "full")

    row, ours = measure(f"jaccli (graph captured once; N={n})", lambda: kernel(x), device,
                        repeat)
    case.rows.append(row)
    row, _ = measure(f"jaccli with per-layer parts (graph captured once; N={n})",
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
                              lambda xs=xs: kernel(xs), device, repeat)
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
    if "ntk-resnet" in cases:
        report.append(resnet_trace_case(n, device).markdown())
    text = "\n".join(report)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    with torch.no_grad():
        main()
