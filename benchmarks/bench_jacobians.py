"""Per-sample Jacobians: jaccli's structured engine against the usual ways, in one process.

Usage: python benchmarks/bench_jacobians.py [--device cpu|cuda] [--quick] [--cases ...]
Each case runs every method on the same inputs, checks the results agree with jaccli's, and
reports time, jaccli's speed-up, the share of the hardware limit reached and peak memory.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import jacfwd, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    JACOBIAN_CASES,
    Case,
    PeakMemory,
    Row,
    fill_seconds,
    gemm_rate,
    header,
    parse_args,
    timeit,
)

import jaccli  # noqa: E402
from jaccli.engine.engine import JacobianEngine  # noqa: E402
from jaccli.tracing.layers import trace_layers  # noqa: E402
from jaccli.tracing.recorder import ForwardRecorder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def cifar_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


def prepared(model: nn.Module, device, dtype) -> nn.Module:
    model = model.to(device=device, dtype=dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def block_functions(model: nn.Module, x: torch.Tensor, granularity: str):
    """(name, batch function, captured input) per layer, for the peers."""
    trace = trace_layers(model, x, granularity=granularity)
    _, records = ForwardRecorder(model, positions=trace.positions).run(x)
    by_site = {r.site: r for r in records}
    out = []
    for layer in trace.layers:
        record = by_site[layer.sites[0]]
        out.append((layer.name, layer.function(record), record.input))
    return trace, out


def per_sample(fn):
    return lambda xi: fn(xi.unsqueeze(0))[0].reshape(-1)


def jaccli_runner(model, x, trace, *, layers: bool, end_to_end: bool, dense: bool):
    engine = JacobianEngine(model, trace, layers=trace.layers if layers else [],
                            end_to_end=end_to_end, n_samples=x.shape[0])
    recorder = ForwardRecorder(model, positions=trace.positions)

    def run():
        engine.clear_cache()  # a fresh run each time: shared Jacobians are recomputed
        _, records = recorder.run(x)
        results = engine.compute(x, {r.site: r for r in records})
        if dense:
            return [results[k].dense(x.shape[0]) for k in results]
        return list(results.values())

    return engine, run


def row_loop(fn, xi: torch.Tensor) -> torch.Tensor:
    """One backward pass per output unit for one sample (the Theano-scan way)."""
    xi = xi.detach().clone().requires_grad_(True)
    y = fn(xi.unsqueeze(0))[0].reshape(-1)
    rows = [torch.autograd.grad(y[o], xi, retain_graph=True)[0].reshape(-1)
            for o in range(y.numel())]
    return torch.stack(rows)


def extrapolated(method: str, fn_one, inputs: list[torch.Tensor], n: int, device,
                 samples: int) -> Row:
    """Time `fn_one` on the first `samples` samples of each input and scale to n samples."""
    start = time.perf_counter()
    for x in inputs:
        for i in range(samples):
            fn_one(x, i)
    from common import sync
    sync(device)
    per = (time.perf_counter() - start) / samples
    return Row(method, per * n, extrapolated=True, note=f"timed on {samples} sample(s)")


def check(name: str, got: list[torch.Tensor], expected: list[torch.Tensor], case: Case,
          rtol: float) -> None:
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        g = g.reshape(e.shape)
        worst = max(worst, ((g - e).abs().max() / (e.abs().max() + 1e-30)).item())
    if worst > rtol:
        raise AssertionError(f"{case.title}: {name} differs from jaccli (rel. error {worst:.2e})")
    case.notes.append(f"{name}: max relative difference to jaccli {worst:.1e}")


def measure(case: Case, method: str, fn, device, repeat: int) -> tuple[Row, object]:
    with PeakMemory(device) as peak:
        seconds, result = timeit(fn, device, repeat=repeat)
    row = Row(method, seconds, peak_bytes=peak.peak)
    case.rows.append(row)
    return row, result


def case_layers(title: str, model: nn.Module, x: torch.Tensor, granularity: str, device,
                dtype, *, loop_samples: int, repeat: int, peers=("jacrev", "jacfwd")) -> Case:
    """Per-layer dense Jacobians: jaccli vs vmap(jacrev/jacfwd), autograd.functional, loops."""
    case = Case(title)
    n = x.shape[0]
    trace, blocks = block_functions(model, x, granularity)
    _, ours = jaccli_runner(model, x, trace, layers=True, end_to_end=False, dense=True)
    _, jaccli_dense = measure(case, "jaccli (dense per-sample matrices)", ours, device, repeat)
    _, compact = jaccli_runner(model, x, trace, layers=True, end_to_end=False, dense=False)
    measure(case, "jaccli (compact: shared/diagonal/row-scaled, no densify)", compact, device,
            repeat)
    case.rows[-1].method = "jaccli compact (not materialized)"
    if "jacrev" in peers:
        _, got = measure(case, "torch.func vmap(jacrev)",
                         lambda: [vmap(jacrev(per_sample(f)))(h) for _, f, h in blocks],
                         device, repeat)
        check("vmap(jacrev)", got, jaccli_dense, case, 1e-3)
    if "jacfwd" in peers:
        _, got = measure(case, "torch.func vmap(jacfwd)",
                         lambda: [vmap(jacfwd(per_sample(f)))(h) for _, f, h in blocks],
                         device, max(1, repeat - 1))
        check("vmap(jacfwd)", got, jaccli_dense, case, 1e-3)
    case.rows.append(extrapolated(
        "autograd.functional.jacobian(vectorize=True), per sample",
        lambda pair, i: torch.autograd.functional.jacobian(per_sample(pair[1]), pair[2][i],
                                                           vectorize=True),
        blocks, n, device, loop_samples))
    case.rows.append(extrapolated("row-by-row autograd loop", lambda pair, i: row_loop(
        pair[1], pair[2][i]), blocks, n, device, max(1, loop_samples // 4)))
    materialized = sum(j.numel() * j.element_size() for j in jaccli_dense)
    case.limit = Row("limit: one write of the same bytes", fill_seconds(materialized, device,
                                                                        dtype))
    case.notes.append(f"{n} samples, {len(blocks)} layers ({granularity} granularity), "
                      f"{materialized / 2**30:.2f} GiB of dense Jacobians")
    return case


def case_end_to_end(title: str, model: nn.Module, x: torch.Tensor, device, dtype, *,
                    loop_samples: int, repeat: int, with_jacfwd: bool = True) -> Case:
    """End-to-end Jacobian: jaccli's chain product vs vmap, the sum trick, loops; vs GEMM."""
    case = Case(title)
    n = x.shape[0]
    trace = trace_layers(model, x[:2])
    engine, ours = jaccli_runner(model, x, trace, layers=False, end_to_end=True, dense=True)
    _, (expected,) = measure(case, f"jaccli ({engine.end_to_end_method} of structured layer "
                             "Jacobians)", ours, device, repeat)
    ours_seconds = case.rows[-1].seconds

    def model_single(xi):
        return model(xi.unsqueeze(0))[0]

    _, got = measure(case, "torch.func vmap(jacrev)",
                     lambda: vmap(jacrev(model_single))(x), device, repeat)
    check("vmap(jacrev)", [got], [expected], case, 1e-3)
    if with_jacfwd:
        _, got = measure(case, "torch.func vmap(jacfwd)",
                         lambda: vmap(jacfwd(model_single))(x), device, max(1, repeat - 1))
        check("vmap(jacfwd)", [got], [expected], case, 1e-3)

    def sum_trick():
        jac = torch.autograd.functional.jacobian(lambda xb: model(xb).sum(0), x, vectorize=True)
        return jac.permute(1, 0, *range(2, jac.ndim)).reshape(n, -1, x[0].numel())

    _, got = measure(case, "sum trick: autograd.functional.jacobian(Σ_batch f, vectorize=True)",
                     sum_trick, device, repeat)
    check("sum trick", [got], [expected], case, 1e-3)
    case.rows.append(extrapolated(
        "autograd.functional.jacobian(vectorize=True), per sample",
        lambda xx, i: torch.autograd.functional.jacobian(model_single, xx[i], vectorize=True),
        [x], n, device, loop_samples))
    rate = gemm_rate(device, dtype)
    if engine.chain_plan is not None:
        flops = 2 * engine.chain_plan.cost
        how = (f"chain product {flops / 1e9:.1f} GFLOP (forward order would be "
               f"{2 * engine.chain_plan.forward_cost / 1e9:.1f}, reverse "
               f"{2 * engine.chain_plan.reverse_cost / 1e9:.1f})")
    else:  # accumulation: one pass of the model's linear work per output (or input) row
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        rows = min(expected.shape[1], expected.shape[2])
        flops = rows * counter.get_total_flops()
        how = f"{engine.end_to_end_method}: {rows} rows x forward FLOPs = {flops / 1e9:.1f} GFLOP"
    case.limit = Row("limit: GEMM of the same FLOPs", flops / rate)
    case.notes.append(f"{n} samples; {how}; jaccli {flops / ours_seconds / 1e12:.3f} TFLOP/s, "
                      f"GEMM {rate / 1e12:.3f} TFLOP/s")
    return case


def case_pipeline(device, *, samples: int) -> Case:
    """`jaccli compute` end to end (load, compute, write) vs the engine time alone."""
    from jaccli.pipelines.compute import run_compute
    from jaccli.settings import ComputeSettings

    case = Case(f"`jaccli compute` on {samples} samples of the sample MLP (load, compute, write)")
    data = np.load(ROOT / "sample_models" / "digits_test.npy")
    tiled = np.resize(data, (samples, data.shape[1])).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", tiled)
        for store in ("compact", "dense"):
            config = ComputeSettings.from_options(
                model=ROOT / "sample_models" / "digits_mlp.safetensors",
                data=Path(tmp) / "x.npy", output=Path(tmp) / "out.h5", device=str(device),
                store=store)
            with PeakMemory(device) as peak:
                start = time.perf_counter()
                summary = run_compute(config)
                wall = time.perf_counter() - start
            engine = sum(e.seconds for e in summary.entries)
            case.rows.append(Row(f"jaccli compute --store {store} (wall)", wall,
                                 peak_bytes=peak.peak,
                                 note=f"{wall / engine:.2f}× the engine time; file "
                                      f"{summary.output_bytes / 2**20:.0f} MiB"))
            case.rows.append(Row(f"jaccli engine only (--store {store})", engine))
    return case


def main() -> None:
    args, cases, device = parse_args(__doc__.splitlines()[0], JACOBIAN_CASES)
    if not cases:
        return
    args.cases = cases
    dtype = torch.float32
    torch.manual_seed(0)
    quick = args.quick
    repeat = 1 if quick else 3
    widths = [784, 1000, 1000, 1000, 10]
    title = header("", device, quick)
    print(title, flush=True)
    if args.output:
        args.output.write_text(title + "\n")
    cases = _Report(args.output)
    if "mlp-layers" in args.cases:
        n = 16 if quick else (1024 if device.type == "cuda" else 256)
        model = prepared(mlp(widths), device, dtype)
        x = torch.randn(n, 784, device=device, dtype=dtype)
        cases.append(case_layers(f"Per-layer Jacobians, MLP 784→1000→1000→1000→10 tanh, "
                                 f"{n} samples", model, x, "block", device, dtype,
                                 loop_samples=1 if quick else 2, repeat=repeat))
    if "mlp-e2e" in args.cases:
        n = 64 if quick else 4096
        model = prepared(mlp(widths), device, dtype)
        x = torch.randn(n, 784, device=device, dtype=dtype)
        cases.append(case_end_to_end(f"End-to-end Jacobian, MLP 784→1000→1000→1000→10 tanh, "
                                     f"{n} samples", model, x, device, dtype,
                                     loop_samples=2 if quick else 8, repeat=repeat,
                                     with_jacfwd=device.type == "cuda" and not quick))
    if "cnn" in args.cases:
        # vmap(jacrev) needs ~1.8 GiB per sample here: that is what the comparison shows.
        n = 4 if quick or device.type == "cpu" else 16
        model = prepared(cifar_cnn(), device, dtype)
        x = torch.randn(n, 3, 32, 32, device=device, dtype=dtype)
        cases.append(case_layers(f"Per-layer Jacobians, CNN conv/ReLU/pool on 3×32×32, {n} "
                                 "samples", model, x, "block", device, dtype, loop_samples=1,
                                 repeat=repeat, peers=("jacrev",)))
        cases.append(case_end_to_end(f"End-to-end Jacobian, CNN on 3×32×32, {n * 8} samples",
                                     model, torch.randn(n * 8, 3, 32, 32, device=device,
                                                        dtype=dtype), device, dtype,
                                     loop_samples=2, repeat=repeat, with_jacfwd=False))
    if "samples" in args.cases:
        for name, data_file in (("digits_mlp", "digits_test.npy"),
                                ("digits_cnn", "digits_test_images.npy")):
            loaded = jaccli.load_model(ROOT / "sample_models" / f"{name}.safetensors")
            model = prepared(loaded.module, device, dtype)
            x = torch.from_numpy(np.load(ROOT / "sample_models" / data_file)).to(device)
            if quick:
                x = x[:32]
            cases.append(case_layers(f"Per-layer Jacobians, sample model {name}, "
                                     f"{x.shape[0]} samples", model, x, "module", device,
                                     dtype, loop_samples=2, repeat=repeat))
    if "pipeline" in args.cases:
        cases.append(case_pipeline(device, samples=1000 if quick else 10_000))


class _Report(list):
    """Cases, each printed (and appended to the output file) as soon as it is measured."""

    def __init__(self, output: Path | None):
        super().__init__()
        self.output = output

    def append(self, case: Case) -> None:
        super().append(case)
        text = case.markdown()
        print(text, flush=True)
        if self.output:
            with self.output.open("a") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()
