"""An ntk results file (`jaccli ntk -o`, layout in docs/FORMAT.md) read back as the summary
the command printed, without torch."""

from __future__ import annotations

import numpy as np

from ..errors import ResultsFormatError
from ..io.results import Results
from ..io.results.format import decode_attr

NTK_ATTRS = ("mode", "method", "per_layer", "cross", "symmetric", "dtype", "n_samples",
             "m_samples", "n_outputs", "trace", "block_size", "blocks")


def ntk_summary(results: Results) -> dict:
    """The summary of an ntk file: kernel shape and size, trace, per-layer shares, spectrum."""
    if "ntk" not in results.file or "kernel" not in results.file["ntk"]:
        raise ResultsFormatError(f"{results.path} is damaged: it has no /ntk/kernel")
    group = results.file["ntk"]
    a = {k: decode_attr(v) for k, v in group.attrs.items()}
    missing = [k for k in NTK_ATTRS if k not in a]
    if missing:
        raise ResultsFormatError(f"{results.path} is damaged: /ntk lacks {', '.join(missing)}")
    kernel = group["kernel"]
    summary = {k: a[k] for k in NTK_ATTRS}
    summary = {k: (bool(v) if isinstance(v, np.bool_) else v.item()
                   if isinstance(v, np.generic) else v) for k, v in summary.items()}
    root = results.attrs
    summary |= {
        "schema": "jaccli/ntk-summary", "schema_version": 1, "command": "ntk",
        "model": str(root.get("model_path", "")), "data": str(root.get("data_path", "")),
        "data2": root.get("data2_path") or None,
        "model_format": str(root.get("model_format", "")),
        "engine": str(root.get("engine", "")), "device": str(root.get("device", "")),
        "model_output": str(a.get("model_output", "")),
        "kernel_shape": list(kernel.shape),
        "kernel_bytes": int(np.prod(kernel.shape)) * kernel.dtype.itemsize,
        "layers": list(a.get("layer_traces", [])), "routes": dict(a.get("routes", {})),
        "factor_passes": None, "spectrum": None, "output": str(results.path),
        "seconds": float(root.get("seconds", 0.0)),
    }
    if "spectrum" in group:
        s = group["spectrum"]
        values = np.asarray(s["eigenvalues"], dtype=np.float64)
        top_k = int(s.attrs.get("top_k", 10))
        summary["spectrum"] = {"top_eigenvalues": values[:top_k].tolist(),
                               "size": int(values.shape[0]),
                               **{k: float(s.attrs[k]) for k in (
                                   "lambda_max", "lambda_min", "condition", "effective_rank")}}
    return summary
