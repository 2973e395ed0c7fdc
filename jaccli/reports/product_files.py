"""Products (`jaccli jvp/vjp -o`) and Hessian (`jaccli hessian -o`) files (layout in
docs/FORMAT.md) read back as the summaries those commands printed, without torch."""

from __future__ import annotations

import numpy as np

from ..errors import ResultsFormatError
from ..io.results import Results
from ..io.results.format import decode_attr
from .stats import aggregate

PRODUCT_GROUP = "products/product"
HESSIAN_GROUP = "hessian_results/hessian"


def products_summary(results: Results) -> dict:
    """The `jaccli/products-summary` of a products file: what was multiplied, the products'
    shape `(N, D)` and their per-sample norms."""
    group, a = _group(results, PRODUCT_GROUP, ("product", "norm"),
                      ("direction", "wrt", "layer"))
    root = results.attrs
    return {"schema": "jaccli/products-summary", "schema_version": 1,
            "command": str(a["direction"]), "wrt": str(a["wrt"]), "layer": str(a["layer"]),
            "model": str(root.get("model_path", "")), "data": str(root.get("data_path", "")),
            "n_samples": results.n_samples, "shape": [int(d) for d in group["product"].shape],
            "norm": aggregate(np.asarray(group["norm"])), "output": str(results.path),
            "engine": str(root.get("engine", "")),
            "seconds": float(root.get("seconds", 0.0))}


def hessian_summary(results: Results) -> dict:
    """The `jaccli/hessian-summary` of a Hessian file: top eigenvalues (`(1, k)` for the
    parameters, `(N, k)` per sample for the inputs), trace, convergence and density."""
    group, a = _group(results, HESSIAN_GROUP, ("eigenvalues", "residual", "trace",
                                               "trace_se"), ("wrt", "loss", "dim", "which"))
    root = results.attrs
    eigen = np.asarray(group["eigenvalues"], dtype=np.float64)
    residuals = np.asarray(group["residual"], dtype=np.float64)
    trace = np.asarray(group["trace"], dtype=np.float64)
    converged = (np.asarray(group["converged"], dtype=bool) if "converged" in group
                 else np.ones(eigen.shape, dtype=bool))
    tolerance = a.get("tolerance")
    summary = {"schema": "jaccli/hessian-summary", "schema_version": 1, "command": "hessian",
               "wrt": str(a["wrt"]), "loss": str(a["loss"]),
               "model": str(root.get("model_path", "")), "data": str(root.get("data_path", "")),
               "n_samples": results.n_samples, "dim": int(a["dim"]), "which": str(a["which"]),
               "krylov_vectors": int(a.get("krylov_vectors", 0)),
               "tolerance": None if tolerance is None else float(tolerance),
               "unconverged": int((~converged).sum()), "output": str(results.path),
               "seconds": float(root.get("seconds", 0.0))}
    if summary["wrt"] == "params":
        summary |= {"eigenvalues": eigen[0].tolist(), "residuals": residuals[0].tolist(),
                    "converged": converged[0].tolist(), "trace": float(trace[0]),
                    "trace_se": float(np.asarray(group["trace_se"])[0])}
    else:
        summary |= {"top_eigenvalue": aggregate(eigen[:, 0]), "trace": aggregate(trace),
                    "max_residual": float(residuals.max())}
    if "density" in group and "density_grid" in group:
        summary["density"] = {"grid": np.asarray(group["density_grid"]).tolist(),
                              "density": np.asarray(group["density"]).tolist()}
    return summary


def _group(results: Results, name: str, datasets: tuple[str, ...], attrs: tuple[str, ...]):
    """The result group `name` and its attributes, checked for what a summary reads."""
    if name not in results.file:
        raise ResultsFormatError(f"{results.path} is damaged: it has no /{name}")
    group = results.file[name]
    a = {k: decode_attr(v) for k, v in group.attrs.items()}
    missing = [f"/{name}/{d}" for d in datasets if d not in group] + [
        f"attribute {k}" for k in attrs if k not in a]
    if missing:
        raise ResultsFormatError(f"{results.path} is damaged: it lacks {', '.join(missing)}")
    return group, a
