"""`torch.func.jvp` without torch's start-up tax when no op needs it.

The first forward-mode AD call in a process imports `torch._decomp.decompositions_for_jvp`,
which TorchScript-compiles eleven decompositions (~0.3-0.9 s on a 2-core CPU) that forward AD
uses only for ops without a forward formula (`_softmax_backward_data`, `*_norm_backward`,
`nll_loss_backward`...: mostly second derivatives). `jvp` here runs with that import held
back; when an op does need a decomposition, torch raises "Trying to use forward AD with ...",
and the call is run again with the decompositions loaded — as torch would have run it — so
results are the same either way.
"""

from __future__ import annotations

import contextlib

from torch.autograd import forward_ad as _torch_forward_ad
from torch.func import jvp as _jvp

_LOADER = "_maybe_load_decompositions"
_NEEDS_DECOMPOSITION = "Trying to use forward AD with"


def jvp(fn, primals: tuple, tangents: tuple):
    """`torch.func.jvp(fn, primals, tangents)`: (outputs, tangents out)."""
    load = getattr(_torch_forward_ad, _LOADER, None)
    if load is None or _loaded[0]:
        return _jvp(fn, primals, tangents)
    try:
        with _held_back(load):
            return _jvp(fn, primals, tangents)
    except NotImplementedError as exc:
        if _NEEDS_DECOMPOSITION not in str(exc):
            raise
    load()
    _loaded[0] = True
    return _jvp(fn, primals, tangents)


_loaded = [False]  # once loaded, calls go straight to torch


@contextlib.contextmanager
def _held_back(load):
    setattr(_torch_forward_ad, _LOADER, _no_load)
    try:
        yield
    finally:
        setattr(_torch_forward_ad, _LOADER, load)


def _no_load() -> None:
    return None
