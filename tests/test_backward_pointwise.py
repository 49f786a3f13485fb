"""The piecewise enclosure of a smooth activation's own Taylor remainder
(``rules/pointwise.py``: :func:`remainder_range`), checked directly on a dense grid of
each interval: sound, and within a few percent of the true range (so that a bound off by
a factor cannot pass, which the end-to-end rule tests cannot promise)."""

from __future__ import annotations

import pytest
import torch

from lipcert.bounds.backward.rules.pointwise import (
    EXP,
    GELU,
    GELU_TANH,
    SIGMOID,
    SILU,
    TANH,
    remainder_range,
)

F64 = torch.float64
FUNCTIONS = {"gelu": GELU, "gelu_tanh": GELU_TANH, "silu": SILU, "tanh": TANH,
             "sigmoid": SIGMOID, "exp": EXP}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_remainder_range_holds_and_is_tight(name: str) -> None:
    """200 random intervals [lo, hi] ∋ x₀ (widths from 1e-4 to 4, centres from −6 to 6):
    R(x) = f(x) − f(x₀) − f′(x₀)(x − x₀) on 4001 points of each lies in the enclosure, and
    the enclosure's ends are within 10% of the range's width from the extremes found."""
    fn = FUNCTIONS[name]
    g = torch.Generator().manual_seed(0)
    n = 200
    x0 = torch.empty(n, dtype=F64).uniform_(-6, 6, generator=g)
    width = 10 ** torch.empty(n, dtype=F64).uniform_(-4, 0.6, generator=g)
    share = torch.rand(n, generator=g, dtype=F64)
    lo, hi = x0 - width * share, x0 + width * (1 - share)
    down, up = remainder_range(fn, x0, lo, hi)
    t = torch.linspace(0, 1, 4001, dtype=F64)[:, None]
    x = torch.cat([lo + (hi - lo) * t, x0[None]])
    rem = fn.f(x) - fn.f(x0) - fn.prime0(x0) * (x - x0)
    r_lo, r_hi = rem.amin(0), rem.amax(0)
    tol = 1e-11 * (1 + fn.f(x).abs().amax(0))
    assert bool((r_lo >= down - tol).all()) and bool((r_hi <= up + tol).all())
    spread = r_hi - r_lo
    assert bool((up - r_hi <= 0.1 * spread + tol).all()), float(((up - r_hi) / spread).max())
    assert bool((r_lo - down <= 0.1 * spread + tol).all()), float(((r_lo - down) / spread).max())
