"""Spectra of per-sample Jacobians: jaccli's structure-aware and matrix-free methods against
materialize-then-svdvals, in one process.

Usage: python benchmarks/bench_spectra.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.func import jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_jacobians import mlp, prepared  # noqa: E402
from common import SPECTRA_CASES, Case, Row, header, parse_args, timeit  # noqa: E402

from jaccli.engine.engine import JacobianEngine  # noqa: E402
from jaccli.spectra.exact import exact_spectrum  # noqa: E402
from jaccli.spectra.lanczos import top_singular_values  # noqa: E402
from jaccli.tracing.layers import trace_layers  # noqa: E402
from jaccli.tracing.recorder import ForwardRecorder  # noqa: E402


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((got - expected).abs() / expected.abs().clamp_min(1e-300)).max())


def setup(n: int, device, dtype):
    torch.manual_seed(0)
    model = prepared(mlp([784, 1000, 1000, 1000, 10]), device, dtype)
    x = torch.randn(n, 784, device=device, dtype=dtype)
    trace = trace_layers(model, x[:2], granularity="block")
    engine = JacobianEngine(model, trace, layers=trace.layers, end_to_end=False, n_samples=n)
    recorder = ForwardRecorder(model, positions=trace.positions)
    return model, x, trace, engine, recorder


def case_all_values(n: int, device, dtype, repeat: int) -> Case:
    model, x, trace, engine, recorder = setup(n, device, dtype)
    case = Case(f"All singular values of every layer, MLP 784→1000→1000→1000→10 tanh "
                f"(blocks), {n} samples, {str(dtype).removeprefix('torch.')}")

    def ours():
        engine.clear_cache()
        _, records = recorder.run(x)
        jacobians = engine.compute(x, {r.site: r for r in records})
        cache: dict = {}
        return [exact_spectrum(j, n, cache=cache, key=name).values
                for name, j in jacobians.items()]

    def materialize_then_svdvals():
        _, records = recorder.run(x)
        by_site = {r.site: r for r in records}
        out = []
        for layer in trace.layers:
            record = by_site[layer.sites[0]]
            f = layer.function(record)
            jac = vmap(jacrev(lambda xi, f=f: f(xi[None])[0]))(record.input)
            out.append(torch.linalg.svdvals(jac))
        return out

    t_ours, got = timeit(ours, device, repeat=repeat)
    t_ref, expected = timeit(materialize_then_svdvals, device, repeat=1, warmup=0)
    case.rows += [Row("jaccli spectrum (Gram of the smaller side; shared SVD once)", t_ours),
                  Row("vmap(jacrev) then torch.linalg.svdvals", t_ref)]
    error = max(relative_error(g, e) for g, e in zip(got, expected, strict=True))
    case.notes.append(f"max relative error of all singular values vs svdvals: {error:.1e}")
    return case


def case_top_k(n: int, k: int, device, dtype, repeat: int) -> Case:
    model, x, trace, engine, recorder = setup(n, device, dtype)
    layer = trace.layers[1]  # tanh(W2 h + b2): a 1000 x 1000 row-scaled Jacobian
    case = Case(f"Top-{k} singular values of a 1000×1000 block Jacobian, {n} samples, "
                f"{str(dtype).removeprefix('torch.')}")
    _, records = recorder.run(x)
    by_site = {r.site: r for r in records}
    apply_j, apply_jt = engine.layer_operator(layer, by_site)
    dense = engine.compute(x, by_site)[layer.name].dense(n)

    def ours():
        return top_singular_values(apply_j, apply_jt, n=n, d_in=1000, d_out=1000, k=k,
                                   dtype=dtype, device=device, tol=1e-6)

    def power_iteration():
        v = torch.randn(n, 1000, 1, device=device, dtype=dtype)
        for _ in range(30):
            v = apply_jt(apply_j(v))
            v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
        return torch.linalg.vector_norm(apply_j(v), dim=(1, 2))

    t_ours, result = timeit(ours, device, repeat=repeat)
    t_full, full = timeit(lambda: torch.linalg.svdvals(dense), device, repeat=1)
    t_power, top1 = timeit(power_iteration, device, repeat=repeat)
    case.rows += [Row(f"jaccli block Lanczos, top {k} (matrix-free)", t_ours,
                      note=f"{result.steps} Krylov vectors, max residual "
                           f"{float(result.residuals.max()):.1e}"),
                  Row("torch.linalg.svdvals on the materialized matrices", t_full),
                  Row("30 power iterations (top 1 only)", t_power,
                      note=f"top-1 relative error {relative_error(top1, full[:, 0]):.1e}")]
    case.notes.append(f"max relative error of the top {k} vs svdvals: "
                      f"{relative_error(result.values, full[:, :k]):.1e}")
    return case


def main() -> None:
    args, cases, device = parse_args(__doc__.splitlines()[0], SPECTRA_CASES)
    if not cases:
        return
    n = 2 if args.quick else (64 if device.type == "cuda" else 8)
    repeat = 1 if args.quick else 3
    report = [header("Spectra, ", device, args.quick)]
    runners = {"spectra-all": lambda: case_all_values(n, device, torch.float64, repeat),
               "spectra-topk": lambda: case_top_k(n, 10, device, torch.float64, repeat)}
    for name in cases:
        case = runners[name]()
        text = case.markdown(reference="jaccli")
        print(text, flush=True)
        report.append(text)
    if args.output:
        args.output.write_text("\n".join(report))


if __name__ == "__main__":
    main()
