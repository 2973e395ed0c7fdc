"""Check one sample's computed Jacobian against `jvp`/`vjp` probes run without `vmap`.

A route of the generic path can be wrong without raising (a batching rule that mixes the
sample axis with the basis axis, see `vmap_hazards.py`). For one sample, `J·v` and `uᵀ·J` of the
computed Jacobian are compared with `torch.func.jvp` and `torch.func.vjp` of that sample alone,
for random `v`, `u`: two passes instead of D, and independent of every batching rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.func import jvp, vjp

from ..errors import is_out_of_memory


def tolerance(dtype: torch.dtype, d_in: int, d_out: int) -> float:
    """The largest relative probe error accepted for a Jacobian of `dtype`, `(D_out, D_in)`.

    The route and the probe evaluate the same chain of ops in different orders, so they differ
    by rounding: about eps·sqrt(D) relative to ‖J‖_F for the products with `v` and `u`, times
    the cancellation in the chain (‖W2‖‖W1‖ / ‖W2 W1‖, up to ~1e3 in trained nets). sqrt(eps)
    (1.5e-8 in float64, 3.5e-4 in float32) leaves that room, and 32·eps·sqrt(D_in + D_out) takes
    over for very wide float32 layers. A broken route mixes samples or basis vectors and is off
    by O(0.01..1) (0.02 to 1.1 seen for PReLU), far above either.
    """
    eps = torch.finfo(dtype).eps
    return max(math.sqrt(eps), 32.0 * eps * math.sqrt(d_in + d_out))


@dataclass
class ProbeResult:
    """error: the largest relative probe error (inf when the probes could not run or the
    non-finite entries differ); unavailable: why a probe could not run, one line each."""

    error: float
    unavailable: tuple[str, ...] = ()


def first_line(exc: BaseException) -> str:
    """The exception as `Type: first line of its message`, at most 160 characters."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def probe_error(single: Callable[..., torch.Tensor], xi: torch.Tensor,
                extras_i: Sequence[torch.Tensor], jac_i: torch.Tensor,
                generator: torch.Generator) -> ProbeResult:
    """Relative disagreement between `jac_i` and the jvp/vjp of one sample.

    single: `(*in_shape, *extra shapes) -> (D_out,)`, one sample; xi: `(*in_shape)`;
    jac_i: `(D_out, D_in)` as computed by a route. Scale: max(‖jac_i‖_F, ‖J v‖, ‖uᵀJ‖) with
    v, u standard normal, so that ‖J v‖ ≈ ‖uᵀJ‖ ≈ ‖J‖_F and a zero Jacobian is handled.
    A probe that cannot run (an op without a forward- or reverse-mode formula) is left out;
    with neither, the error is inf.
    """
    d_out, d_in = jac_i.shape
    jac_i = jac_i.detach()
    xi = xi.detach()
    v = torch.randn(d_in, generator=generator, dtype=torch.float64).to(jac_i)
    u = torch.randn(d_out, generator=generator, dtype=torch.float64).to(jac_i)

    def sample(xx: torch.Tensor) -> torch.Tensor:
        return single(xx, *extras_i)

    probe_v = probe_u = None  # J·v and uᵀ·J of the sample alone
    unavailable = []
    with torch.no_grad():  # torch.func ignores it inside its transforms; no graph is kept
        try:
            probe_v = jvp(sample, (xi,), (v.reshape(xi.shape).to(xi),))[1].to(jac_i)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            unavailable.append(f"jvp probe: {first_line(exc)}")
        try:
            _, pull = vjp(sample, xi)
            probe_u = pull(u)[0].reshape(-1).to(jac_i)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            unavailable.append(f"vjp probe: {first_line(exc)}")
    if probe_v is None and probe_u is None:
        return ProbeResult(math.inf, tuple(unavailable))
    return ProbeResult(_relative_error(jac_i, v, probe_v, u, probe_u), tuple(unavailable))


def _relative_error(jac: torch.Tensor, v: torch.Tensor, probe_v: torch.Tensor | None,
                    u: torch.Tensor, probe_u: torch.Tensor | None) -> float:
    """max(‖J·v − probe_v‖, ‖uᵀJ − probe_u‖) / scale, over the rows (columns) of J that are
    finite; inf where the probe is not finite there, or where a non-finite entry J[r, c] is
    not matched by a non-finite probe_v[r] or probe_u[c]. Non-finite Jacobians are
    route-dependent (reverse mode gives 0·inf = NaN where forward mode gives 0), so only
    that pattern, not the exact NaN/inf positions, can be required to agree."""
    probes = [p for p in (probe_v, probe_u) if p is not None]
    if bool(jac.isfinite().all()) and all(bool(p.isfinite().all()) for p in probes):
        pairs = [(jac @ v, probe_v)] if probe_v is not None else []
        pairs += [(u @ jac, probe_u)] if probe_u is not None else []
        return _scaled_error(pairs, float(torch.linalg.matrix_norm(jac)), jac.dtype)
    bad = ~jac.isfinite()
    explained = torch.zeros_like(bad)
    if probe_v is not None:
        explained |= ~probe_v.isfinite()[:, None]
    if probe_u is not None:
        explained |= ~probe_u.isfinite()[None, :]
    if bool((bad & ~explained).any()):
        return math.inf
    pairs = []  # (from jac, from the probe) on the finite rows / columns of jac
    if probe_v is not None:
        rows = ~bad.any(dim=1)
        pairs.append((jac[rows] @ v, probe_v[rows]))
    if probe_u is not None:
        columns = ~bad.any(dim=0)
        pairs.append((u @ jac[:, columns], probe_u[columns]))
    if not all(bool(probe.isfinite().all()) for _, probe in pairs):
        return math.inf
    return _scaled_error(pairs, _finite_norm(jac), jac.dtype)


def _scaled_error(pairs: list[tuple[torch.Tensor, torch.Tensor]], jac_norm: float,
                  dtype: torch.dtype) -> float:
    """max ‖computed − probe‖ / max(‖J‖_F, ‖probe‖s), all finite."""
    scale = max([jac_norm] + [float(torch.linalg.vector_norm(p)) for _, p in pairs])
    scale = max(scale, torch.finfo(dtype).tiny)
    return max(float(torch.linalg.vector_norm(c - p)) / scale for c, p in pairs)


def _finite_norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t[t.isfinite()].double()))
