"""Pointwise nonlinearities y_e = f(x_e).

Backward: G_x = G_y ⊙ f′(x), with f′ enclosed over each element's forward interval [lo, hi].
f′ is continuous on the interval, so its extremes there are at an endpoint or at an interior
critical point of f′ (a zero of f″). Each function lists those points (located in float64,
as in the forward rules of ``lipcert.bounds.rules.activation``); the enclosure is the
minimum and maximum of f′ over the endpoints and the listed points inside [lo, hi], widened
by 1e-12·(1 + |f′|) for the rounding of erf/exp/tanh and for the error of a numerically
located point (where f″ = 0 that error changes f′ only to second order). Beyond |x| = 60
every smooth f′ here is flat to 1e-26, so endpoints are clamped there.

Non-smooth functions (ReLU, clamp, abs, leaky ReLU) use their Clarke generalised
derivative: at a kink the derivative interval is the hull of the one-sided slopes. The
margins are then Lipschitz and piecewise smooth, and Lebourg's mean value theorem,
m(x′) − m(x) ∈ ⟨∂m(ξ), x′ − x⟩ for a ξ on the segment, with the chain rule inclusion
∂(f∘g) ⊆ co(∂f·∂g), keeps the certificate sound.

Forward: the image of [lo, hi] (monotone pieces), the centre value f(x₀), row deviations
scaled by the largest |f′| of the row, and the Taylor remainder
e_y = f′(x₀)·e_x + R with R = f(x) − f(x₀) − f′(x₀)(x − x₀) = (x − x₀)·(S − f′(x₀)), S the
secant slope, which lies in the derivative's enclosure over [lo, hi] (mean value theorem;
Clarke's for the kinks): the op's own remainder; f′(x₀) is the derivative automatic
differentiation uses, so the first-order parts agree. For a continuously differentiable f
the own remainder is also enclosed piece by piece (:func:`remainder_range`), which keeps
its sign (R ≥ 0 where f is convex) and halves its size: the secant bound takes
|S − f′(x₀)| up to the whole variation of f′ over [lo, hi], R itself only about half of it
times |x − x₀|. The two enclosures are intersected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lipcert.bounds.backward.interval import Box, Grad, iv_times, mid_rad, mul
from lipcert.bounds.backward.registry import BackCtx, FwdCtx, backward_rule, forward_rule
from lipcert.bounds.rules.activation import (
    _GELU,
    _GELU_TANH,
    _SIGMOID,
    _SILU,
    _TANH,
    _gelu_prime,
    _gelu_tanh_prime,
    _silu_prime,
)
from lipcert.bounds.state import F64
from lipcert.errors import LipcertError

aten = torch.ops.aten
PAD = 1e-12
CLAMP = 60.0
PIECES = 8  # pieces of an interval for the own remainder of a smooth function
U = 2.0**-53

Pair = tuple[Tensor, Tensor]


def derivative_range(fprime: Callable[[Tensor], Tensor], points: list[float], lo: Tensor,
                     hi: Tensor) -> Pair:
    """[min, max] of f′ over [lo, hi] elementwise, given every interior critical point of f′
    (module docstring), widened by PAD·(1 + |f′|)."""
    a, b = lo.clamp(-CLAMP, CLAMP), hi.clamp(-CLAMP, CLAMP)
    fa, fb = fprime(a), fprime(b)
    d_lo, d_hi = torch.minimum(fa, fb), torch.maximum(fa, fb)
    for p in points:
        inside = (lo <= p) & (p <= hi)
        fp = float(fprime(torch.tensor(p, dtype=F64)))
        d_lo = torch.where(inside, torch.clamp(d_lo, max=fp), d_lo)
        d_hi = torch.where(inside, torch.clamp(d_hi, min=fp), d_hi)
    return d_lo - PAD * (1 + d_lo.abs()), d_hi + PAD * (1 + d_hi.abs())


def _positive(x: Box, what: str) -> None:
    if not bool((x.lo > 0).all()):
        raise LipcertError(f"{what} of an activation that may be ≤ 0 on the ball has no "
                           "bounded derivative")


def _tanh_prime(t: Tensor) -> Tensor:
    return 1 - torch.tanh(t) ** 2


def _sigmoid_prime(t: Tensor) -> Tensor:
    s = torch.sigmoid(t)
    return s * (1 - s)


@dataclass(frozen=True)
class Pointwise:
    """One function: f, f′ at the centre (as autograd computes it), the enclosure of f′ over
    [lo, hi] and the enclosure of f([lo, hi])."""

    f: Callable[[Tensor], Tensor]
    prime0: Callable[[Tensor], Tensor]
    slope: Callable[[Box], Pair]
    image: Callable[[Tensor, Tensor], Pair]
    # f′'s enclosure over [lo, hi] for a continuously differentiable f (None otherwise)
    prime_range: Callable[[Tensor, Tensor], Pair] | None = None


def _smooth(f: Callable[[Tensor], Tensor], prime: Callable[[Tensor], Tensor],
            points: list[float], image: Callable[[Tensor, Tensor], Pair]) -> Pointwise:
    def prime_range(lo: Tensor, hi: Tensor) -> Pair:
        return derivative_range(prime, points, lo, hi)

    return Pointwise(f, prime, lambda x: prime_range(x.lo, x.hi), image, prime_range)


def remainder_range(fn: Pointwise, x0: Tensor, lo: Tensor, hi: Tensor,
                    pieces: int = PIECES) -> Pair:
    """An enclosure of R(x) = f(x) − f(x₀) − f′(x₀)(x − x₀) over x ∈ [lo, hi] ∋ x₀ for a
    continuously differentiable f: [lo, x₀] and [x₀, hi] are cut into pieces/2 pieces each.
    On a piece [a, b] of length L, with [m, M] the range of f′ − f′(x₀) there,
    R(x) ≤ R(a) + α(x − a) and R(x) ≤ R(b) + β(b − x) (α = max(M, 0), β = max(−m, 0)), so
    R ≤ (βR(a) + αR(b) + αβL)/(α + β), the value where the two lines cross (no point of the
    piece is above both); symmetrically R ≥ (αR(a) + βR(b) − αβL)/(α + β). R at the cut
    points is evaluated, with the rounding of f (PAD, module docstring) and of the sums."""
    assert fn.prime_range is not None
    p0 = fn.prime0(x0)
    t = torch.linspace(0, 1, pieces // 2 + 1, dtype=F64).reshape(-1, *([1] * x0.dim()))
    left = lo + (x0 - lo) * t[:-1]
    right = x0 + (hi - x0) * t[1:-1]
    cuts = torch.cat([left, right, hi.unsqueeze(0)])
    cuts[pieces // 2] = x0
    f0 = fn.f(x0)
    fc = fn.f(cuts)
    lin = p0 * (cuts - x0)
    rem = fc - f0 - lin
    err = PAD * (2 + fc.abs() + f0.abs()) + 4 * U * (fc.abs() + f0.abs() + lin.abs())
    a, b = cuts[:-1], cuts[1:]
    d_lo, d_hi = fn.prime_range(a, b)
    alpha = (d_hi - p0).clamp(min=0) * (1 + 4 * U)
    beta = (p0 - d_lo).clamp(min=0) * (1 + 4 * U)
    length = (b - a) * (1 + 4 * U)
    ra_lo, ra_hi = rem[:-1] - err[:-1], rem[:-1] + err[:-1]
    rb_lo, rb_hi = rem[1:] - err[1:], rem[1:] + err[1:]
    both = alpha + beta
    flat = both == 0
    safe = torch.where(flat, torch.ones_like(both), both)
    up = (beta * ra_hi + alpha * rb_hi + alpha * beta * length) / safe
    down = (alpha * ra_lo + beta * rb_lo - alpha * beta * length) / safe
    up = torch.where(flat, torch.maximum(ra_hi, rb_hi), up + 8 * U * up.abs())
    down = torch.where(flat, torch.minimum(ra_lo, rb_lo), down - 8 * U * down.abs())
    return down.amin(0), up.amax(0)


def _step(lo_cond: Tensor, hi_cond: Tensor) -> Pair:
    return lo_cond.to(F64), hi_cond.to(F64)


_SQRT2 = math.sqrt(2.0)
_GELU_TANH_POINTS = [-1.4185040087908285, 1.4185040087908285]
_SILU_POINTS = [-2.399357280515468, 2.399357280515467]

GELU = _smooth(F.gelu, _gelu_prime, [-_SQRT2, _SQRT2], _GELU[1])
GELU_TANH = _smooth(lambda t: F.gelu(t, approximate="tanh"), _gelu_tanh_prime,
                    _GELU_TANH_POINTS, _GELU_TANH[1])
SILU = _smooth(F.silu, _silu_prime, _SILU_POINTS, _SILU[1])
TANH = _smooth(torch.tanh, _tanh_prime, [0.0], _TANH[1])
SIGMOID = _smooth(torch.sigmoid, _sigmoid_prime, [0.0], _SIGMOID[1])


def _exp_range(lo: Tensor, hi: Tensor) -> Pair:
    return torch.exp(lo) * (1 - PAD), torch.exp(hi) * (1 + PAD) + 1e-300


EXP = Pointwise(torch.exp, torch.exp, lambda x: _exp_range(x.lo, x.hi),
                lambda lo, hi: (torch.exp(lo), torch.exp(hi)), _exp_range)
SQRT = Pointwise(torch.sqrt, lambda t: 0.5 / torch.sqrt(t),
                 lambda x: (0.5 / torch.sqrt(x.hi) * (1 - PAD), 0.5 / torch.sqrt(x.lo) * (1 + PAD)),
                 lambda lo, hi: (torch.sqrt(lo), torch.sqrt(hi)))
RSQRT = Pointwise(torch.rsqrt, lambda t: -0.5 * t.pow(-1.5),
                  lambda x: (-0.5 * x.lo.pow(-1.5) * (1 + PAD), -0.5 * x.hi.pow(-1.5) * (1 - PAD)),
                  lambda lo, hi: (torch.rsqrt(hi), torch.rsqrt(lo)))


def _reciprocal_slope(x: Box) -> Pair:
    small = torch.minimum(x.lo.abs(), x.hi.abs())
    big = torch.maximum(x.lo.abs(), x.hi.abs())
    return -(1 + PAD) / small.square(), -(1 - PAD) / big.square()


RECIPROCAL = Pointwise(torch.reciprocal, lambda t: -1.0 / t.square(), _reciprocal_slope,
                       lambda lo, hi: (1.0 / hi, 1.0 / lo))
RELU = Pointwise(torch.relu, lambda t: (t > 0).to(F64),
                 lambda x: _step(x.lo > 0, x.hi >= 0),
                 lambda lo, hi: (lo.clamp(min=0), hi.clamp(min=0)))
ABS = Pointwise(torch.abs, torch.sign,
                lambda x: (torch.where(x.lo > 0, 1.0, -1.0).to(F64),
                           torch.where(x.hi < 0, -1.0, 1.0).to(F64)),
                lambda lo, hi: (torch.where(lo > 0, lo, torch.where(hi < 0, -hi,
                                                                    torch.zeros_like(lo))),
                                torch.maximum(lo.abs(), hi.abs())))


def leaky(a: float) -> Pointwise:
    """Leaky ReLU with slope a ≥ 0 below 0 (derivative in {a, 1}; the hull at 0)."""
    if a < 0:
        raise LipcertError("leaky_relu with a negative slope")

    def f(t: Tensor) -> Tensor:
        return torch.where(t > 0, t, a * t)

    def slope(x: Box) -> Pair:
        pos, neg = (x.lo > 0).to(F64), (x.hi < 0).to(F64)
        mixed = 1 - pos - neg
        return (pos + neg * a + mixed * min(a, 1.0), pos + neg * a + mixed * max(a, 1.0))

    return Pointwise(f, lambda t: torch.where(t > 0, 1.0, a).to(F64), slope,
                     lambda lo, hi: (f(lo), f(hi)))


def clamped(a: float, b: float, open_kinks: bool) -> Pointwise:
    """clamp to [a, b] (derivative 1 inside, 0 outside, [0, 1] at a kink); autograd's
    derivative at a kink is 1 for clamp and 0 for hardtanh (``open_kinks``)."""

    def f(t: Tensor) -> Tensor:
        return t.clamp(a, b)

    def prime0(t: Tensor) -> Tensor:
        inside = (t > a) & (t < b) if open_kinks else (t >= a) & (t <= b)
        return inside.to(F64)

    return Pointwise(f, prime0, lambda x: _step((x.lo > a) & (x.hi < b),
                                                (x.hi >= a) & (x.lo <= b)),
                     lambda lo, hi: (f(lo), f(hi)))


def power(p: float) -> Pointwise:
    """x^p for a constant p: p·x^(p−1) is linear (p = 2), monotone or even with its extreme
    at 0 (integer p ≥ 3), or monotone on positive intervals (any other p)."""

    def slope(x: Box) -> Pair:
        if p == int(p) and p >= 2:
            a, b = p * x.lo.pow(p - 1), p * x.hi.pow(p - 1)
            d_lo, d_hi = torch.minimum(a, b), torch.maximum(a, b)
            zero = (x.lo <= 0) & (x.hi >= 0)
            d_lo = torch.where(zero, d_lo.clamp(max=0), d_lo)
            d_hi = torch.where(zero, d_hi.clamp(min=0), d_hi)
        else:
            _positive(x, f"pow(x, {p})")
            a, b = p * x.lo.pow(p - 1), p * x.hi.pow(p - 1)
            d_lo, d_hi = torch.minimum(a, b), torch.maximum(a, b)
        pad = PAD * (1 + torch.maximum(d_lo.abs(), d_hi.abs()))
        return d_lo - pad, d_hi + pad

    def image(lo: Tensor, hi: Tensor) -> Pair:
        a, b = lo.pow(p), hi.pow(p)
        out_lo, out_hi = torch.minimum(a, b), torch.maximum(a, b)
        if p == int(p) and int(p) % 2 == 0 and p > 0:
            out_lo = torch.where((lo <= 0) & (hi >= 0), torch.zeros_like(out_lo), out_lo)
        return out_lo, out_hi

    return Pointwise(lambda t: t.pow(p), lambda t: p * t.pow(p - 1), slope, image)


def _gelu(approximate: str = "none") -> Pointwise:
    return GELU_TANH if approximate == "tanh" else GELU


def _clamp_of(ctx: Any, lo: Any, hi: Any) -> Pointwise:
    hard = ctx.target is not None and ctx.target.overloadpacket is aten.hardtanh
    if hard:
        lo = -1.0 if lo is None else lo
        hi = 1.0 if hi is None else hi
    if isinstance(lo, Box) or isinstance(hi, Box):
        raise LipcertError("clamp with bounds that depend on the input")
    return clamped(-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi),
                   hard)


def _pow_of(x: Any, exponent: Any) -> Pointwise:
    if isinstance(exponent, Box) or not isinstance(x, Box):
        raise LipcertError("pow with an exponent that depends on the input")
    p = float(exponent)
    if p != int(p):
        _positive(x, f"pow(x, {p})")
    return power(p)


def _check(fn: Pointwise, x: Box) -> None:
    if fn in (SQRT, RSQRT):
        _positive(x, "sqrt" if fn is SQRT else "rsqrt")
    if fn is RECIPROCAL and not bool(((x.lo > 0) | (x.hi < 0)).all()):
        raise LipcertError("reciprocal (or division) by an activation whose interval contains 0")


# which function an op is, given its arguments after the input
_FUNCTIONS: dict[Any, Callable[..., Pointwise]] = {
    aten.gelu: lambda ctx, approximate="none": _gelu(approximate),
    aten.silu: lambda ctx: SILU,
    aten.tanh: lambda ctx: TANH,
    aten.sigmoid: lambda ctx: SIGMOID,
    aten.exp: lambda ctx: EXP,
    aten.sqrt: lambda ctx: SQRT,
    aten.rsqrt: lambda ctx: RSQRT,
    aten.reciprocal: lambda ctx: RECIPROCAL,
    aten.relu: lambda ctx: RELU,
    aten.abs: lambda ctx: ABS,
    aten.leaky_relu: lambda ctx, negative_slope=0.01: leaky(float(negative_slope)),
    aten.hardtanh: lambda ctx, min_val=None, max_val=None: _clamp_of(ctx, min_val, max_val),
    aten.clamp: lambda ctx, min=None, max=None: _clamp_of(ctx, min, max),
    aten.clip: lambda ctx, min=None, max=None: _clamp_of(ctx, min, max),
}


def _function(ctx: Any, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Pointwise:
    packet = ctx.target.overloadpacket
    if packet is aten.pow:
        return _pow_of(x, args[0] if args else kwargs["exponent"])
    fn = _FUNCTIONS[packet](ctx, *args, **kwargs)
    _check(fn, x)
    return fn


@backward_rule(*_FUNCTIONS, aten.pow)
def pointwise_backward(ctx: BackCtx, g: Grad, x: Box, *args: Any, **kwargs: Any
                       ) -> tuple[Any, ...]:
    """G_x = G ⊙ [f′ over the interval] (module docstring)."""
    d_lo, d_hi = _function(ctx, x, args, kwargs).slope(x)
    dc, dr = mid_rad(d_lo, d_hi)
    return (mul(g, dc, dr), *([None] * len(args)))


@forward_rule(*_FUNCTIONS, aten.pow)
def pointwise_forward(ctx: FwdCtx, x: Box, *args: Any, **kwargs: Any) -> Box:
    """Image, centre value, row deviations and Taylor remainder (module docstring)."""
    fn = _function(ctx, x, args, kwargs)
    lo, hi = fn.image(x.lo, x.hi)
    value = fn.f(x.value)
    pad = PAD * (1 + torch.maximum(lo.abs(), hi.abs()))
    d_lo, d_hi = fn.slope(x)
    steep = torch.maximum(d_lo.abs(), d_hi.abs()).expand(x.shape)
    rdev = x.row_dev() * steep.amax(-1) if x.dim() >= 1 else None
    l2 = x.l2 * steep.flatten(1).amax(1) if x.l2 is not None and x.dim() >= 2 else None
    e_lo = e_hi = None
    own: tuple[Tensor | None, Tensor | None] = (None, None)
    if x.has_e:
        p0 = fn.prime0(x.value)
        lin_lo, lin_hi = _times(p0, x.e_lo, x.e_hi)
        r_lo, r_hi = iv_times(*x.delta(), d_lo - p0, d_hi - p0)
        if fn.prime_range is not None:
            s_lo, s_hi = remainder_range(fn, x.value, x.lo, x.hi)
            r_lo, r_hi = torch.maximum(r_lo, s_lo), torch.minimum(r_hi, s_hi)
        e_pad = pad + 4 * U * (lin_hi.abs() + lin_lo.abs() + r_hi.abs() + r_lo.abs())
        e_lo, e_hi = lin_lo + r_lo - e_pad, lin_hi + r_hi + e_pad
        own = (r_lo - e_pad, r_hi + e_pad)
    return Box(value, torch.minimum(lo - pad, value), torch.maximum(hi + pad, value), l2, rdev,
               e_lo, e_hi, None, *own)


def _times(c: Tensor, lo: Tensor, hi: Tensor) -> Pair:
    a, b = c * lo, c * hi
    return torch.minimum(a, b), torch.maximum(a, b)
