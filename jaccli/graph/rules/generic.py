"""The generic per-op Jacobian: `torch.func` on one op (or one region), never the whole model.

Routes, tried in order: `vmap` over samples of `jacrev` or `jacfwd` (the cheaper first: reverse
when the op has fewer outputs than inputs), then the other, then a plain loop over samples
with `torch.autograd.functional.jacobian`. The route taken is returned, because vmapped
transforms are not always right: in torch 2.13 `vmap(jacrev)` through PReLU gives wrong
numbers when the batch size equals D_out and fails otherwise: each vmapped route's result is
checked on one sample against jvp/vjp probes run without vmap, and replaced by the next route
when they disagree (the loop is the reference the probes come from).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import jacfwd, jacrev

from ...engine.probes import probe_error, tolerance
from ...errors import is_out_of_memory

ROUTES = ("vmap-rev", "vmap-fwd", "loop")
_GENERATOR = torch.Generator().manual_seed(0)  # which sample is checked: seeded


def choose_mode(d_in: int, d_out: int) -> str:
    """Forward mode costs one pass per input entry, reverse one per output entry."""
    return "fwd" if d_in < d_out else "rev"


def op_jacobian_generic(fn: Callable[..., tuple[torch.Tensor, ...]],
                        args: Sequence[torch.Tensor], in_dims: Sequence[int], wrt: int = 0,
                        *, mode: str = "rev") -> tuple[torch.Tensor, str]:
    """Per-sample Jacobian of one op (or region) and the route used.

    fn: takes ONE sample of each arg (batch axis removed) and returns a tuple of tensors;
    args: batched values, the batch on axis `in_dims[i]`. Returns `(B, D_out, D_in)`, the
    outputs flattened and concatenated in order, w.r.t. `args[wrt]`.
    """
    batch = args[wrt].shape[in_dims[wrt]]
    d_in = args[wrt].select(in_dims[wrt], 0).numel()

    def flat(*sample: torch.Tensor) -> torch.Tensor:
        return torch.cat([o.reshape(-1) for o in fn(*sample)])

    order = ("rev", "fwd") if mode == "rev" else ("fwd", "rev")
    for route in order:
        transform = jacrev if route == "rev" else jacfwd
        try:
            jac = torch.vmap(transform(flat, argnums=wrt), in_dims=tuple(in_dims))(*args)
        except Exception as exc:  # no batching rule, or an op forward mode cannot handle
            if is_out_of_memory(exc):
                raise
            continue
        jac = jac.reshape(batch, -1, d_in)
        if _verified(flat, args, in_dims, wrt, jac):
            return jac, f"vmap-{route}"
    rows = []
    for i in range(batch):
        sample = [a.select(d, i) for a, d in zip(args, in_dims, strict=True)]

        def of_wrt(value: torch.Tensor, sample=sample) -> torch.Tensor:
            return flat(*sample[:wrt], value, *sample[wrt + 1:])

        rows.append(torch.autograd.functional.jacobian(of_wrt, sample[wrt])
                    .reshape(-1, d_in))
    return torch.stack(rows), "loop"


def _verified(flat, args, in_dims, wrt: int, jac: torch.Tensor) -> bool:
    """Whether a vmapped route's Jacobian agrees, for one sample drawn at random, with
    jvp/vjp probes of that sample alone (no vmap): the check of `jaccli.engine.probes`."""
    batch = jac.shape[0]
    i = int(torch.randint(batch, (1,), generator=_GENERATOR))
    sample = [a.select(d, i) for a, d in zip(args, in_dims, strict=True)]

    def single(value: torch.Tensor) -> torch.Tensor:
        return flat(*sample[:wrt], value, *sample[wrt + 1:])

    result = probe_error(single, sample[wrt], (), jac[i], _GENERATOR)
    return result.error <= tolerance(jac.dtype, jac.shape[2], jac.shape[1])


def map_columns(fn: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor
                ) -> torch.Tensor:
    """`fn` on each column `(B, *shape)` of blocks `(B, k, *shape)`, stacked on axis 1."""
    try:
        return torch.vmap(fn, in_dims=1, out_dims=1)(blocks)
    except Exception:  # an op without a batching rule: one column at a time
        return torch.stack([fn(blocks[:, j]) for j in range(blocks.shape[1])], dim=1)
