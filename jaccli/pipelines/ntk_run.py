"""The `ntk` pipeline, its run: blocks of samples over the pairs (as `ntk.plan_blocks`
planned), each block of Θ written to the HDF5 file as it is computed (Θ(X, X): blocks above
the diagonal once, mirrored below), the trace and its per-layer shares, the spectrum.

Shapes: N samples of DATA, M of DATA2, C outputs, B samples per block; blocks
`(B, B, C, C)` (full), `(B, B)` (trace), `(B, C, C)` (diagonal).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import numpy as np
import torch

from ..io.results.writer import ResultsWriter
from ..params.ntk import kernel_total, layer_parts, layer_traces
from .common import provenance, to_tensor
from .ntk import NtkRun, ntk_plan, prepare_ntk
from .resources import tf32_mode


def run_ntk(settings, *, run: NtkRun | None = None, on_block=None) -> dict:
    """Compute the kernel block by block; write it when an output is set; the summary.
    `on_block()` is called after each block."""
    started = time.perf_counter()
    run = run or prepare_ntk(settings)
    return write_kernel(run, lambda sink: compute_blocks(run, block_pairs(run), sink,
                                                         on_block), started)


def write_kernel(run: NtkRun, fill, started: float, **facts) -> dict:
    """The summary of the kernel that `fill(sink)` puts into a `KernelSink` (computing its
    blocks, or copying those other ranks computed), written to the output when one is set;
    `facts` join the summary (e.g. the device of every rank)."""
    settings = run.settings
    sink = KernelSink(run)
    writer = _writer(run) if settings.output.path is not None else nullcontext()
    with writer as w, tf32_mode(settings.run.tf32):
        sink.start(w)
        fill(sink)
        summary = _summary(run, sink) | facts
        if w is not None:
            sink.finish(summary)
            w.finish({"seconds": time.perf_counter() - started,
                      "block_size": run.blocks.block_size})
            summary["output"] = str(settings.output.path)
    summary["seconds"] = time.perf_counter() - started
    return summary


def _ranges(n: int, b: int) -> list[tuple[int, int]]:
    return [(start, min(start + b, n)) for start in range(0, n, b)]


def block_pairs(run: NtkRun) -> list[tuple[int, int | None]]:
    """The blocks of the kernel, row by row, as (row block, column block) indices: all of
    them for a cross kernel, those on and above the diagonal for Θ(X, X) (the others are
    their mirrors), `(i, None)` for the diagonal blocks of `--diagonal`."""
    rows = run.blocks.row_blocks
    if run.settings.mode == "diagonal":
        return [(i, None) for i in range(rows)]
    if run.symmetric:
        return [(i, j) for i in range(rows) for j in range(i, rows)]
    return [(i, j) for i in range(rows) for j in range(run.blocks.col_blocks)]


def compute_blocks(run: NtkRun, pairs: list[tuple[int, int | None]], sink, on_block
                   ) -> None:
    """Compute the blocks `pairs` (of `block_pairs`, in its order) into `sink`
    (`sink.write(parts, rows, cols, mirror=...)`), and each row block's traces
    (`sink.add_traces(traces, row=i)`) with the first block of its row, so that blocks
    split over several callers count every row once."""
    inputs, mode, b = run.inputs, run.settings.mode, run.blocks.block_size
    first_data = inputs.data
    other = run.second if run.second is not None else first_data
    rows, cols = _ranges(len(first_data), b), _ranges(len(other), b)
    cache: dict[int, dict] = {}
    row_index, row = None, None

    def factors(source, start, stop):  # DATA's rows go with those of the held inputs
        held = inputs.held(start, stop) if source is first_data else ()
        return run.factors(to_tensor(source.read(start, stop), inputs.device, inputs.dtype),
                           held)

    def blocks(row, col, how):  # {layer: Θ_l}, or without --per-layer {"": Θ} at once
        if run.settings.per_layer:
            return layer_parts(row, col, how)
        return {"": kernel_total(row, col, how)}

    for i, j in pairs:
        (r0, r1) = rows[i]
        if i != row_index:  # Θ(X, X): a column block's cached factors are this row's
            row_index = i
            row = cache[i] if run.symmetric and i in cache else factors(first_data, r0, r1)
            if run.symmetric and run.blocks.cache_factors:
                cache[i] = row
        if j is None:
            sink.add_traces(layer_traces(row), row=i)
            sink.write(blocks(row, None, "diagonal"), (r0, r1), None, mirror=False)
            _tick(on_block)
            continue
        if j == (i if run.symmetric else 0):
            sink.add_traces(layer_traces(row), row=i)
        (c0, c1) = cols[j]
        if run.symmetric and j == i:
            col = None
        elif j in cache:
            col = cache[j]
        else:
            col = factors(other, c0, c1)
            if run.blocks.cache_factors:
                cache[j] = col
        sink.write(blocks(row, col, mode), (r0, r1), (c0, c1),
                   mirror=run.symmetric and j != i)
        _tick(on_block)


def _tick(on_block) -> None:
    if on_block is not None:
        on_block()


def _writer(run: NtkRun) -> ResultsWriter:
    settings, inputs = run.settings, run.inputs
    facts = {"mode": settings.mode, "per_layer": settings.per_layer,
             "cross": run.second is not None, "engine": run.engine_path,
             "engine_note": run.engine_note}
    if run.second is not None:
        facts |= {"data2_path": str(run.second.path), "m_samples": len(run.second)}
    return ResultsWriter(settings.output.path, kind="ntk", sample_index=inputs.data.indices,
                         attrs=provenance(settings.command_line, inputs, **facts),
                         compression=settings.output.compression,
                         compression_level=settings.output.compression_level)


class KernelSink:
    """Where the blocks go: the HDF5 datasets (when writing), the dense (N·C)² matrix for
    `--spectrum`, and the per-layer traces Σᵢ Σ_c Θ_l(xᵢ, xᵢ)_cc."""

    def __init__(self, run: NtkRun):
        self.run = run
        self.traces = {layer: 0.0 for layer in run.layers}
        self.kernel = None
        self.layers: dict[str, object] = {}
        self.group = None
        n, c = len(run.inputs.data), run.n_outputs
        self.matrix = np.zeros((n * c, n * c)) if run.settings.spectrum else None

    def start(self, writer: ResultsWriter | None) -> None:
        if writer is None:
            return
        run = self.run
        dtype = np.float64 if run.inputs.dtype == torch.float64 else np.float32
        self.writer = writer
        self.group = writer.file.create_group("ntk")
        self.kernel = writer.create_dataset(self.group, "kernel", run.kernel_shape, dtype)
        if run.second is not None:
            writer.file["samples"].create_dataset("index2", data=run.second.indices)
        if run.settings.per_layer:
            parent = self.group.create_group("layers", track_order=True)
            for layer in run.layers:
                group = parent.create_group(layer)
                group.attrs["name"] = layer
                self.layers[layer] = writer.create_dataset(group, "kernel", run.kernel_shape,
                                                           dtype)

    def add_traces(self, traces: dict[str, float], row: int | None = None) -> None:
        """Σᵢ Σ_c Θ_l(xᵢ, xᵢ)_cc of a row block, per layer (`layer_traces`); the row
        blocks come in order."""
        for layer, value in traces.items():
            self.traces[layer] = self.traces.get(layer, 0.0) + value

    def write(self, parts: dict[str, torch.Tensor], rows, cols, *, mirror: bool) -> None:
        total = sum(parts.values())
        if self.matrix is not None:
            self._place(total, rows, cols, mirror)
        if self.kernel is None:
            return
        self.writer.check()
        self._store(self.kernel, total, rows, cols, mirror)
        for layer, block in parts.items():
            if layer in self.layers:
                self._store(self.layers[layer], block, rows, cols, mirror)

    @staticmethod
    def _store(dataset, block: torch.Tensor, rows, cols, mirror: bool) -> None:
        values = block.detach().cpu().numpy()
        if cols is None:
            dataset[rows[0]:rows[1]] = values
            return
        dataset[rows[0]:rows[1], cols[0]:cols[1]] = values
        if mirror:  # Θ(xⱼ, xᵢ) = Θ(xᵢ, xⱼ)ᵀ
            flipped = values.transpose(1, 0, 3, 2) if values.ndim == 4 else values.T
            dataset[cols[0]:cols[1], rows[0]:rows[1]] = flipped

    def _place(self, block: torch.Tensor, rows, cols, mirror: bool) -> None:
        c = self.run.n_outputs
        flat = block.detach().double().cpu().permute(0, 2, 1, 3).reshape(
            (rows[1] - rows[0]) * c, (cols[1] - cols[0]) * c).numpy()
        self.matrix[rows[0] * c:rows[1] * c, cols[0] * c:cols[1] * c] = flat
        if mirror:
            self.matrix[cols[0] * c:cols[1] * c, rows[0] * c:rows[1] * c] = flat.T

    def finish(self, summary: dict) -> None:
        """The attributes and the spectrum that the summary knows (docs/FORMAT.md)."""
        from ..io.results.format import encode_attr

        g = self.group
        g.attrs.update({"mode": summary["mode"], "method": summary["method"],
                        "per_layer": summary["per_layer"], "cross": summary["cross"],
                        "dtype": summary["dtype"], "n_samples": summary["n_samples"],
                        "m_samples": summary["m_samples"], "n_outputs": summary["n_outputs"],
                        "model_output": summary["model_output"],
                        "symmetric": summary["symmetric"], "trace": summary["trace"],
                        "block_size": summary["block_size"], "blocks": summary["blocks"],
                        "layer_traces": encode_attr(summary["layers"]),
                        "routes": encode_attr(summary["routes"])})
        if "layers" in g:
            for row in summary["layers"]:
                if row["layer"] in g["layers"]:
                    g["layers"][row["layer"]].attrs.update({"trace": row["trace"],
                                                            "share": row["share"]})
        spectrum = summary.get("spectrum")
        if spectrum is not None:
            s = g.create_group("spectrum")
            s.create_dataset("eigenvalues", data=self.eigenvalues)
            s.attrs.update({k: spectrum[k] for k in ("lambda_max", "lambda_min", "condition",
                                                     "effective_rank")})
            s.attrs["top_k"] = len(spectrum["top_eigenvalues"])


def kernel_spectrum(matrix: np.ndarray, top_k: int) -> tuple[np.ndarray, dict]:
    """Eigenvalues of the symmetric (N·C)² kernel matrix, descending (float64), and the
    summary: top-k, λ_max, λ_min, condition number λ_max/λ_min (inf when λ_min ≤ 0), and
    the effective rank exp(H(p)) with p = max(λ, 0)/Σ max(λ, 0) (Roy & Vetterli, 2007)."""
    values = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))[::-1].copy()
    top, low = float(values[0]), float(values[-1])
    positive = np.clip(values, 0.0, None)
    total = positive.sum()
    p = positive[positive > 0] / total if total > 0 else np.ones(1)
    effective = float(np.exp(-(p * np.log(p)).sum())) if total > 0 else 0.0
    return values, {"top_eigenvalues": values[:top_k].tolist(), "lambda_max": top,
                    "lambda_min": low,
                    "condition": top / low if low > 0 else float("inf"),
                    "effective_rank": effective, "size": int(values.shape[0])}


def _summary(run: NtkRun, sink: KernelSink) -> dict:
    settings, inputs = run.settings, run.inputs
    plan = ntk_plan(run)
    trace = sum(sink.traces.values())
    layers = [{"layer": layer, "trace": value, "share": value / trace if trace else 0.0}
              for layer, value in sink.traces.items()]
    summary = {
        "schema": "jaccli/ntk-summary", "schema_version": 1, "command": "ntk",
        "model": plan["model"], "data": plan["data"], "data2": plan["data2"],
        "model_format": inputs.loaded.source, "engine": run.engine_path,
        "method": "structured factors on the operator graph" if run.engine_path.startswith(
            "graph") else "structured factors by module hooks",
        "mode": settings.mode, "cross": run.second is not None,
        "symmetric": run.symmetric, "per_layer": settings.per_layer,
        "n_samples": plan["n_samples"], "m_samples": plan["m_samples"],
        "n_outputs": run.n_outputs, "model_output": run.model_output,
        "kernel_shape": plan["kernel_shape"],
        "kernel_bytes": plan["kernel_bytes"], "device": plan["device"], "ranks": 1,
        "dtype": plan["dtype"], "block_size": run.blocks.block_size,
        "blocks": run.blocks.computed_blocks, "factor_passes": run.blocks.factor_passes,
        "trace": trace, "layers": layers,
        "routes": {p.name: p.route for p in run.params},
        "spectrum": None, "output": None,
    }
    if sink.matrix is not None:
        sink.eigenvalues, summary["spectrum"] = kernel_spectrum(sink.matrix, settings.top_k)
    return summary
