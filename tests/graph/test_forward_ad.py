"""`jaccli.graph.forward_ad.jvp`: torch.func.jvp's values, without importing torch's forward-AD
decompositions unless an op needs one (then loaded and used, as torch would). Each case runs
in a fresh interpreter, where nothing has loaded them yet."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_CASES = {
    # tanh has a forward formula: no decompositions, derivative 1 - tanh(x)^2
    "tanh": ("""
        out = jvp(torch.tanh, (x,), (torch.ones_like(x),))[1]
        expected = 1 - torch.tanh(x) ** 2
    """, False),
    # forward AD through a log_softmax backward needs torch's _log_softmax_backward_data
    # decomposition; reference: central finite differences of the VJP, float64
    "log_softmax backward": ("""
        def g(a):
            out, pullback = torch.func.vjp(lambda t: torch.log_softmax(t, -1), a)
            return pullback(w)[0]
        w = torch.randn(4, 5, dtype=torch.float64, generator=gen)
        v = torch.randn(4, 5, dtype=torch.float64, generator=gen)
        out = jvp(g, (x,), (v,))[1]
        h = 1e-6
        expected = (g(x + h * v) - g(x - h * v)) / (2 * h)
    """, True),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_jvp_matches_a_reference_and_loads_decompositions_only_when_needed(case):
    body, needs = _CASES[case]
    script = textwrap.dedent("""
        import sys, torch
        from jaccli.graph.forward_ad import jvp
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    """) + textwrap.dedent(body) + textwrap.dedent("""
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-8)
        print("loaded" if "torch._decomp.decompositions_for_jvp" in sys.modules else "not")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == ("loaded" if needs else "not")
