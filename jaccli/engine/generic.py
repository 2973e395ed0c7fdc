"""The generic Jacobian path: `torch.func` transforms for any differentiable batch function,
each result checked by jvp/vjp probes without vmap before it is returned.

Routes, from fastest to most robust (`N` samples, `D_in`/`D_out` per sample):
    vmap-rev    vmap over samples of `jacrev` (an inner vmap over the D_out output basis)
    vmap-fwd    vmap over samples of a vmap of `jvp` over the D_in input basis
    chunk1-rev  vmap over samples; one `vjp` per output basis vector (one vmap level only)
    chunk1-fwd  vmap over samples; one `jvp` per input basis vector
    loop-rev    no vmap: per sample, one `vjp` per output basis vector
    loop-fwd    no vmap: per sample, one `jvp` per input basis vector
Routes that the hazard table (`vmap_hazards.py`) knows to be broken for an op the function
runs are skipped; a route that raises or fails the probe check is replaced by the next one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import jacrev, jvp, vjp, vmap

from ..errors import JaccliError, ModelRunError, is_out_of_memory
from .probes import first_line, probe_error, tolerance
from .vmap_hazards import (
    CHUNK1_FWD,
    CHUNK1_REV,
    LOOP_FWD,
    LOOP_REV,
    VMAP_FWD,
    VMAP_REV,
    run_and_scan,
    skipped_routes,
)

MODES = ("auto", "fwd", "rev")
# Cost of a check, in one-sample passes: the forward pass that scans for hazards (once per
# call), and per checked sample a jvp (~2), a vjp (~2) and J·v, uᵀJ on the result (~1).
SCAN_PASSES, PROBE_PASSES = 1, 5
# The one-vector-at-a-time route of the chosen mode is tried before the vmapped route of the
# other mode when that one needs more than this many times as many basis vectors.
OTHER_MODE_PENALTY = 4

# Draws the checked samples when no seed is given: seeded once, so a process is reproducible,
# and advancing, so successive batches check different samples.
_GENERATOR = torch.Generator().manual_seed(0)


@dataclass
class GenericReport:
    """How a generic Jacobian was produced.

    name: the function or layer; route: the route whose Jacobian was returned (see module
    docstring); checked: indices of the samples verified by probes (empty when not verified);
    error: the largest relative probe error of the returned Jacobian (nan when not verified);
    tolerance: the bound it met; rejected: `(route, why)` for each route skipped or tried and
    refused, in order; hazards: the aten ops of the hazard table that the function runs.
    """

    name: str
    route: str
    checked: tuple[int, ...]
    error: float
    tolerance: float
    rejected: list[tuple[str, str]] = field(default_factory=list)
    hazards: tuple[str, ...] = ()

    @property
    def verified(self) -> bool:
        return bool(self.checked)


_last_report: GenericReport | None = None


def choose_mode(d_in: int, d_out: int, mode: str = "auto") -> str:
    """Forward mode costs one pass per input, reverse one per output: pick the fewer."""
    if mode != "auto":
        return mode
    return "fwd" if d_in < d_out else "rev"


def verification_cost(d_in: int, d_out: int, n: int = 1, mode: str = "auto",
                      checks: int = 1) -> float:
    """Cost of the probe check relative to computing the Jacobians of a batch of `n` samples.

    Counted in one-sample passes: the Jacobian needs a forward pass and one backward (reverse)
    or tangent (forward) pass per basis vector for each sample; the check needs `SCAN_PASSES`
    plus `PROBE_PASSES` per checked sample. Below 0.1 once N·min(D_in, D_out) exceeds ~60.
    """
    basis = d_out if choose_mode(d_in, d_out, mode) == "rev" else d_in
    return (SCAN_PASSES + checks * PROBE_PASSES) / (n * (1 + basis))


def route_order(mode: str, d_in: int, d_out: int) -> list[str]:
    """The routes to try for `mode` ("fwd"/"rev"), in order: the vmapped route of `mode`, the
    vmapped route of the other mode and the one-vector-at-a-time route of `mode` (the cheaper
    first), then the loop without vmap."""
    basis = {"rev": d_out, "fwd": d_in}
    other = "fwd" if mode == "rev" else "rev"
    same_vmap, other_vmap, same_chunk1, same_loop = {
        "rev": (VMAP_REV, VMAP_FWD, CHUNK1_REV, LOOP_REV),
        "fwd": (VMAP_FWD, VMAP_REV, CHUNK1_FWD, LOOP_FWD)}[mode]
    middle = [other_vmap, same_chunk1]
    if basis[other] > OTHER_MODE_PENALTY * basis[mode]:
        middle.reverse()
    return [same_vmap, *middle, same_loop]


def per_sample_jacobian(fn: Callable[..., torch.Tensor], x: torch.Tensor,
                        extras: Sequence[torch.Tensor] = (), *, mode: str = "auto",
                        chunk_size: int | None = None, name: str | None = None,
                        verify: bool = True) -> torch.Tensor:
    """Jacobian of `fn` for each sample, flattened: `(N, D_out, D_in)`.

    See `per_sample_jacobian_verified` for the arguments; `last_report()` tells how it was made.
    """
    global _last_report
    jac, _last_report = per_sample_jacobian_verified(fn, x, extras, mode=mode,
                                                     chunk_size=chunk_size, name=name,
                                                     verify=verify)
    return jac


def last_report() -> GenericReport | None:
    """The report of the latest `per_sample_jacobian` call (None before the first)."""
    return _last_report


def per_sample_jacobian_verified(
        fn: Callable[..., torch.Tensor], x: torch.Tensor, extras: Sequence[torch.Tensor] = (),
        *, mode: str = "auto", chunk_size: int | None = None, name: str | None = None,
        verify: bool = True, checks: int = 1,
        seed: int | None = None) -> tuple[torch.Tensor, GenericReport]:
    """Jacobian of `fn` for each sample, and how it was produced.

    fn: maps a batch `(B, *in_shape)` (plus batched extra inputs `(B, ...)`, held fixed) to
        `(B, *out_shape)`, treating rows independently.
    x: `(N, *in_shape)`. Returns `(N, D_out, D_in)` with `D = prod(shape)`, and the report.
    mode: "fwd", "rev" or "auto" (the fewer basis vectors). chunk_size: how many basis vectors
        the inner vmap of the vmapped routes processes at once (None: all).
    name: the function or layer, for the report and errors (default: derived from `fn`).
    verify: check `checks` samples, drawn at random (from `seed`, or from a generator seeded
        once per process), with jvp/vjp probes without vmap; a route that disagrees is
        replaced by the next one. Raises `ModelRunError` when no route passes.
    """
    n, d_in = x.shape[0], x[0].numel()
    name = name or _describe(fn)
    out, hazards = run_and_scan(fn, x[:1].clone(), *(e[:1] for e in extras))
    d_out = out[0].numel()
    mode = choose_mode(d_in, d_out, mode)
    single = _one_sample(fn)
    tol = tolerance(_coarser(x.dtype, out.dtype), d_in, d_out)
    generator = _GENERATOR if seed is None else torch.Generator().manual_seed(seed)
    checked = tuple(torch.randperm(n, generator=generator)[:checks].tolist()) if verify else ()
    skipped = skipped_routes(hazards)
    rejected: list[tuple[str, str]] = []
    for route in route_order(mode, d_in, d_out):
        if route in skipped:
            rejected.append((route, skipped[route]))
            continue
        try:
            jac = ROUTES[route](single, x, extras, d_out, chunk_size).reshape(n, d_out, d_in)
        except JaccliError:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            rejected.append((route, f"raised {first_line(exc)}"))
            continue
        error, why = _check(single, x, extras, jac, checked, generator, tol)
        if why:
            rejected.append((route, why))
            continue
        return jac, GenericReport(name, route, checked, error, tol, rejected,
                                  tuple(h.op for h in hazards))
    tried = "; ".join(f"{route}: {why}" for route, why in rejected)
    if all(why.startswith("raised") for _, why in rejected):
        # The function itself cannot go through torch.func (`.item()`, NumPy, data-dependent
        # control flow): that is the model's doing, not a wrong route.
        raise ModelRunError(f"{name} cannot be differentiated by torch.func ({rejected[-1][1]})"
                            f"; leave it out with --layers (or --no-end-to-end for the whole "
                            "model), or make its forward differentiable")
    raise ModelRunError(f"{name}: no route of the generic Jacobian path passed the jvp/vjp "
                        f"check with torch {torch.__version__}, so no Jacobian is returned "
                        f"({tried}); please report the model")


def _check(single, x, extras, jac, checked, generator, tol) -> tuple[float, str]:
    """The largest probe error over the checked samples, and why it is refused ('' if not)."""
    if not checked:
        return math.nan, ""
    error = 0.0
    for i in checked:
        result = probe_error(single, x[i], [e[i] for e in extras], jac[i], generator)
        if not result.error <= tol:
            why = f"probe error {result.error:.2g} > tolerance {tol:.1g} on sample {i}"
            return result.error, "; ".join((why, *result.unavailable))
        error = max(error, result.error)
    return error, ""


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two dtypes (the input's, the output's), floating ones only."""
    floating = [dtype for dtype in (a, b) if dtype.is_floating_point] or [torch.float64]
    return max(floating, key=lambda dtype: torch.finfo(dtype).eps)


def _describe(fn: Callable) -> str:
    if isinstance(fn, nn.Module):  # TorchScript modules keep the Python class name here
        return getattr(fn, "original_name", None) or type(fn).__name__
    return getattr(fn, "__qualname__", None) or repr(fn)


def _one_sample(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`(*in_shape, *extra shapes) -> (D_out,)`: `fn` on a batch of one."""
    def single(xi: torch.Tensor, *ei: torch.Tensor) -> torch.Tensor:
        out = fn(xi.unsqueeze(0).clone(), *(e.unsqueeze(0) for e in ei))
        return out[0].reshape(-1)
    return single


def _fixing(single: Callable, ei: Sequence[torch.Tensor]) -> Callable:
    return lambda xx: single(xx, *ei)


def _input_basis(x: torch.Tensor) -> torch.Tensor:
    """`(D_in, *in_shape)`: the unit vectors of one sample's input."""
    d_in = x[0].numel()
    return torch.eye(d_in, dtype=x.dtype, device=x.device).reshape(d_in, *x.shape[1:])


def _output_basis(x: torch.Tensor, d_out: int) -> torch.Tensor:
    return torch.eye(d_out, dtype=x.dtype, device=x.device)


# Each route: (single, x, extras, d_out, chunk_size) -> (N, D_out, *in_shape) or
# (N, D_out, D_in); the caller flattens.

def _vmap_rev(single, x, extras, d_out, chunk_size):
    return vmap(jacrev(single, chunk_size=chunk_size))(x, *extras)


def _vmap_fwd(single, x, extras, d_out, chunk_size):
    basis = _input_basis(x)

    def columns(xi, *ei):
        sample = _fixing(single, ei)
        return vmap(lambda v: jvp(sample, (xi,), (v,))[1], chunk_size=chunk_size)(basis).T
    return vmap(columns)(x, *extras)


def _chunk1_rev(single, x, extras, d_out, chunk_size):
    cotangents = _output_basis(x, d_out)

    def rows(xi, *ei):
        _, pull = vjp(_fixing(single, ei), xi)
        return torch.stack([pull(u)[0] for u in cotangents])
    return vmap(rows)(x, *extras)


def _chunk1_fwd(single, x, extras, d_out, chunk_size):
    basis = _input_basis(x)

    def columns(xi, *ei):
        sample = _fixing(single, ei)
        return torch.stack([jvp(sample, (xi,), (v,))[1] for v in basis], dim=1)
    return vmap(columns)(x, *extras)


def _loop_rev(single, x, extras, d_out, chunk_size):
    cotangents = _output_basis(x, d_out)
    jacs = []
    for i in range(x.shape[0]):
        _, pull = vjp(_fixing(single, [e[i] for e in extras]), x[i])
        jacs.append(torch.stack([pull(u)[0].reshape(-1) for u in cotangents]))
    return torch.stack(jacs)


def _loop_fwd(single, x, extras, d_out, chunk_size):
    basis = _input_basis(x)
    jacs = []
    for i in range(x.shape[0]):
        sample = _fixing(single, [e[i] for e in extras])
        jacs.append(torch.stack([jvp(sample, (x[i],), (v,))[1] for v in basis], dim=1))
    return torch.stack(jacs)


ROUTES: dict[str, Callable[..., torch.Tensor]] = {
    VMAP_REV: _vmap_rev, VMAP_FWD: _vmap_fwd, CHUNK1_REV: _chunk1_rev, CHUNK1_FWD: _chunk1_fwd,
    LOOP_REV: _loop_rev, LOOP_FWD: _loop_fwd}


def per_sample_frobenius(jac: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each sample's Jacobian: `(N, D_out, D_in)` -> `(N,)`."""
    return torch.linalg.matrix_norm(jac, ord="fro")
