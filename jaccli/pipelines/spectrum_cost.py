"""`spectrum --dry-run`: per Jacobian, the method the run will use, its predicted time (from
this machine's measured rates, `jaccli.spectra.cost`) and the memory a batch of it holds."""

from __future__ import annotations

from ..spectra.cost import measure_rates, predict_seconds
from ..spectra.plan import FACTORED, READ_OFF, SHARED_MAPS, SpectrumEntry
from .spectrum import KRYLOV_VECTORS, SpectrumRun, shared_krylov_bytes


def method_label(entry: SpectrumEntry, exact: bool) -> str:
    """What computes the spectrum, in words: exact structured, FFT, Gram, dense SVD, Lanczos."""
    if entry.method == "fft":
        return "FFT (exact, circular)"
    if entry.method == "lanczos":
        return f"Lanczos (top {entry.k}{', once' if entry.shared else ''})"
    if entry.structure in READ_OFF or entry.structure in FACTORED \
            or entry.structure in SHARED_MAPS:
        return "exact structured"
    if entry.structure == "row-scaled" and not exact:
        return "Gram (eigvalsh)"
    return "dense SVD"


def spectrum_dry_run(run: SpectrumRun) -> dict:
    """The plan of a spectrum run as a dict (no spectra computed).

    entries: name, type, d_in, d_out, structure, method, k, reason, seconds (predicted for
    all N samples; Lanczos at its step cap, an upper bound) and batch_bytes (what one batch
    of this Jacobian holds: its stored parts, its shared matrices, a Krylov basis).
    """
    inputs, settings = run.inputs, run.settings
    n, itemsize = len(inputs.data), inputs.dtype.itemsize
    rates = measure_rates(inputs.device, inputs.dtype)
    stored = {e.name: e for e in run.plan.entries}
    rows = []
    for entry in run.entries:
        seconds = predict_seconds(entry, n, rates, max_steps=settings.max_steps)
        held = stored.get(entry.name)
        if entry.method == "lanczos" and entry.shared:
            batch_bytes = shared_krylov_bytes(entry, itemsize, settings.max_steps)
        elif entry.method == "lanczos":
            batch_bytes = 3 * min(entry.d_in, entry.d_out) * KRYLOV_VECTORS * itemsize \
                * run.batch_size
        elif held is not None:
            batch_bytes = held.bytes_per_sample * run.batch_size + held.shared_bytes
        else:
            batch_bytes = 0
        rows.append({"name": entry.name, "kind": entry.kind, "type": entry.type_name,
                     "d_in": entry.d_in, "d_out": entry.d_out, "structure": entry.structure,
                     "method": method_label(entry, settings.exact), "k": entry.k,
                     "reason": entry.reason, "seconds": seconds, "batch_bytes": batch_bytes})
    return {"dry_run": True, "n_samples": n, "batch_size": run.batch_size,
            "memory_budget_bytes": run.plan.budget,
            "memory": run.plan.memory.to_dict(run.batch_size) if run.plan.memory else None,
            "device": str(inputs.device),
            "dtype": str(inputs.dtype).removeprefix("torch."),
            "engine": run.engine.path, "entries": rows,
            "seconds": sum(r["seconds"] for r in rows),
            "rates": {"gemm": rates.gemm, "svd": rates.svd, "eigh": rates.eigh},
            "note": "predicted times come from a micro-benchmark on this machine (GEMM, SVD, "
                    "eigvalsh) and count the decompositions, not computing the Jacobians"}
