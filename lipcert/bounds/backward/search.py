"""The certified-radius search (derivation: docs/local-margin.md, "Radius search").

The radii are those of a geometric bisection with ``steps`` steps on [r_max·SPAN, r_max]:
the grid u_k = ln r_max + ln SPAN·(1 − k/K), K = 2^steps, k = 1 … K − 1. For a test that
holds at every radius below its threshold, that bisection returns the largest grid radius
at which the test passes; so does this search, with fewer evaluations: it keeps per sample
the largest passing grid index ``lo`` and the smallest failing one ``hi`` (k = 0 and k = K
are never evaluated and stand for "pass" and "fail", as in the bisection), and stops when
they are adjacent. Each step evaluates the index where the log of the consumed fraction of
the margin, v = ln ρ (``MarginBounds.consumed``; the test passes iff ρ < 1), is 0 by the
secant through the two bracketing evaluations (Illinois: the value of an end kept twice in
a row is halved, which keeps the steps from stalling on one side where ρ saturates), or,
with one of them, by a slope of 2 in ln r (the second-order regime); a first guess at
r_max·10^−2.5; and a bisection step whenever three steps in a row have not halved the
bracket.

Whatever the test does, only radii at which it was evaluated and passed are returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

F64 = torch.float64
FIRST_GUESS = -2.5 * math.log(10)  # ln(r/r_max) of the first evaluation
SLOPE = 2.0  # d ln ρ / d ln r assumed with one bracketing evaluation

# evaluate(radius (n,)) -> (passed (n,) bool, ln ρ (n,), per-sample value to keep (n,))
Evaluate = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def grid_search(evaluate: Evaluate, r_max: Tensor, active: Tensor, steps: int, span: float,
                keep: Tensor) -> tuple[Tensor, Tensor, int]:
    """(radius, kept value at that radius, evaluations) per sample: the largest passing
    grid radius of the samples in ``active`` (0 where none passed, and for the others);
    ``keep``: the values for samples without a passing radius."""
    n = r_max.shape[0]
    grid = 2**steps
    safe = torch.where(active, r_max, 1.0)
    floor = torch.log(safe) + math.log(span)
    du = -math.log(span) / grid
    lo = torch.zeros(n, dtype=torch.long)
    hi = torch.full((n,), grid, dtype=torch.long)
    v_lo = torch.full((n,), math.nan, dtype=F64)
    v_hi = torch.full((n,), math.nan, dtype=F64)
    side = torch.zeros(n, dtype=torch.long)  # which end the last step moved: −1 lo, +1 hi
    slow = torch.zeros(n, dtype=torch.long)
    best = torch.zeros(n, dtype=F64)
    kept = keep.clone()
    evaluations = 0
    first = torch.full((n,), grid * (1 + FIRST_GUESS / -math.log(span)), dtype=F64)
    while evaluations < 2 * steps + 2:
        open_ = active & (hi - lo > 1)
        if not bool(open_.any()):
            break
        k = _propose(lo, hi, v_lo, v_hi, slow, du, first if evaluations == 0 else None)
        radius = torch.where(open_, torch.exp(floor + k.double() * du), 0.0)
        passed, v, value = evaluate(radius)
        passed = passed & open_
        failed = open_ & ~passed
        width = hi - lo
        # Illinois: an end kept twice in a row has its value halved for the secant
        v_hi = torch.where(passed & (side < 0), v_hi / 2, v_hi)
        v_lo = torch.where(failed & (side > 0), v_lo / 2, v_lo)
        lo = torch.where(passed, k, lo)
        hi = torch.where(failed, k, hi)
        v_lo = torch.where(passed, v, v_lo)
        v_hi = torch.where(failed, v, v_hi)
        side = torch.where(passed, -1, torch.where(failed, 1, side))
        best = torch.where(passed, radius, best)
        kept = torch.where(passed, value, kept)
        slow = torch.where(open_, torch.where(2 * (hi - lo) > width, slow + 1, 0), slow)
        evaluations += 1
    return best, kept, evaluations


def _propose(lo: Tensor, hi: Tensor, v_lo: Tensor, v_hi: Tensor, slow: Tensor, du: float,
             first: Tensor | None) -> Tensor:
    """The next grid index per sample, strictly inside (lo, hi)."""
    mid = (lo + hi).double() / 2
    est = mid.clone()
    has_lo, has_hi = torch.isfinite(v_lo), torch.isfinite(v_hi)
    both = has_lo & has_hi & (v_hi > v_lo)
    secant = lo.double() + (-v_lo) * (hi - lo).double() / (v_hi - v_lo)
    est = torch.where(both, secant, est)
    est = torch.where(has_hi & ~has_lo, hi.double() - v_hi / (SLOPE * du), est)
    est = torch.where(has_lo & ~has_hi, lo.double() - v_lo / (SLOPE * du), est)
    if first is not None:
        est = first
    est = torch.where((slow >= 3) | ~torch.isfinite(est), mid, est)
    k = torch.round(est.clamp(-1e18, 1e18)).long()
    return torch.minimum(torch.maximum(k, lo + 1), hi - 1)
