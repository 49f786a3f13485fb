"""Pointwise nonlinearities, softmax and dropout.

Pointwise y_e = f(x_e): by the mean value theorem |Δy_e| ≤ s_e·|Δx_e| with
s_e = sup |f'| over the element's interval [lo_e, hi_e], so lip ≤ (max_e s_e)·lip_x and
lip_tok ≤ (max_e s_e)·lip_tok_x, with the max over each sample's elements. For the smooth
functions, |f'| on an interval is largest at an endpoint or at an interior critical point of
f' (listed per function, computed in float64 by bisection on f'' and padded by 1e-12: the
error of a critical point's location changes f' there only to second order). Over the whole
real line this gives the global slopes: GELU 1.12890415 (at √2; the paper's 1.1289 is
slightly too small), tanh-GELU 1.12899307,
SiLU 1.09983932, tanh 1, sigmoid 1/4, ReLU 1, hardswish 3/2, hardsigmoid 1/6. Functions with
|f(x)| ≤ |x| (ReLU, GELU, SiLU, tanh, hardswish, clamps around 0, ...) also keep the norm
bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lipcert.bounds.errors import UnsupportedOpError
from lipcert.bounds.registry import Exact, rule
from lipcert.bounds.rules.order import extreme
from lipcert.bounds.rules.shape import broadcast
from lipcert.bounds.state import F64, Bound, Const, Ctx, Opaque, reduce_sid, sample_max

aten = torch.ops.aten
_PAD = 1e-12  # added to slopes and extreme values taken at numerically located points
_CLAMP = 60.0  # |x| beyond which the smooth functions' slopes are flat to 1e-26


def pointwise(
    ctx: Ctx,
    x: Bound,
    *,
    slope: Callable[[Tensor, Tensor], Tensor],
    image: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    contractive: bool,
) -> Bound:
    """Bounds of y = f(x) elementwise, given ``slope(lo, hi)`` = sup|f'| over [lo, hi]
    elementwise and ``image(lo, hi)`` = an enclosure of f([lo, hi]) elementwise.
    ``contractive``: |f(t)| ≤ |t| for all t, so norms do not grow."""
    s = sample_max(slope(x.lo, x.hi), x.sid, ctx.n)
    lo, hi = image(x.lo, x.hi)
    inf = ctx.full(math.inf)
    return Bound(
        lo,
        hi,
        s * x.lip,
        s * x.lip_tok,
        x.norm if contractive else inf,
        x.tok_norm if contractive else inf,
        sid=x.sid,
    )


def _smooth(
    f: Callable[[Tensor], Tensor],
    fprime: Callable[[Tensor], Tensor],
    slope_points: list[float],
    min_point: float | None,
) -> tuple[Callable, Callable]:
    """slope/image functions of a smooth f whose f' is monotone between ``slope_points``
    and which is monotone except for one minimum at ``min_point`` (None: increasing)."""
    pts = torch.tensor(slope_points, dtype=F64)
    pt_slopes = fprime(pts).abs() + _PAD
    f_min = None if min_point is None else float(f(torch.tensor(min_point, dtype=F64))) - _PAD

    def slope(lo: Tensor, hi: Tensor) -> Tensor:
        a, b = lo.clamp(-_CLAMP, _CLAMP), hi.clamp(-_CLAMP, _CLAMP)
        s = torch.maximum(fprime(a).abs(), fprime(b).abs()) + _PAD
        for p, sp in zip(pts.tolist(), pt_slopes.tolist(), strict=True):
            s = torch.where((lo <= p) & (p <= hi), torch.clamp(s, min=sp), s)
        return s

    def image(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        a, b = f(lo.clamp(min=-1e6)), f(hi)
        if min_point is None:
            return a, b
        m = min_point
        out_lo = torch.where(hi <= m, b, torch.where(lo >= m, a, torch.full_like(a, f_min)))
        out_lo = torch.minimum(out_lo, torch.minimum(a, b))
        return out_lo, torch.maximum(a, b)

    return slope, image


def _gelu_prime(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) / math.sqrt(
        2 * math.pi
    )


_K = math.sqrt(2 / math.pi)


def _gelu_tanh_prime(x: Tensor) -> Tensor:
    u = _K * (x + 0.044715 * x**3)
    t = torch.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _K * (1 + 3 * 0.044715 * x * x)


def _silu_prime(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


_GELU = _smooth(F.gelu, _gelu_prime, [-math.sqrt(2), math.sqrt(2)], -0.7517915246935645)
_GELU_TANH = _smooth(
    lambda t: F.gelu(t, approximate="tanh"),
    _gelu_tanh_prime,
    [-1.4185040087908285, 1.4185040087908285],
    -0.7524614220710162,
)
_SILU = _smooth(F.silu, _silu_prime, [-2.399357280515468, 2.399357280515467], -1.278464542761074)
_TANH = _smooth(torch.tanh, lambda t: 1 - torch.tanh(t) ** 2, [0.0], None)
_SIGMOID = _smooth(torch.sigmoid, lambda t: torch.sigmoid(t) * (1 - torch.sigmoid(t)), [0.0], None)
GELU_MAX_SLOPE = float(_gelu_prime(torch.tensor(math.sqrt(2), dtype=F64))) + _PAD


@rule(aten.gelu)
def gelu(ctx: Ctx, x: Bound, approximate: str = "none") -> Bound:
    """GELU x·Φ(x): f'' = φ(x)(2 − x²), so f' is extreme at ±√2 (f'(√2) = 1.128904145…,
    f'(−√2) = −0.128904…); minimum of f at −0.75179 (−0.1699712). |gelu(x)| ≤ |x|.
    approximate="tanh": extremes of f' at ±1.41850 (1.128993…), minimum at −0.75246."""
    slope, image = _GELU_TANH if approximate == "tanh" else _GELU
    return pointwise(ctx, x, slope=slope, image=image, contractive=True)


@rule(aten.silu)
def silu(ctx: Ctx, x: Bound) -> Bound:
    """SiLU x·σ(x): f' extreme at ±2.39936 (1.0998393…, −0.0998393…); minimum at −1.27846
    (−0.2784645). |silu(x)| ≤ |x|."""
    slope, image = _SILU
    return pointwise(ctx, x, slope=slope, image=image, contractive=True)


@rule(aten.tanh)
def tanh(ctx: Ctx, x: Bound) -> Bound:
    """tanh: increasing, f' = 1 − tanh² ≤ 1 (at 0), |tanh x| ≤ |x|."""
    slope, image = _TANH
    return pointwise(ctx, x, slope=slope, image=image, contractive=True)


@rule(aten.sigmoid)
def sigmoid(ctx: Ctx, x: Bound) -> Bound:
    """sigmoid: increasing, f' = σ(1 − σ) ≤ 1/4 (at 0); values in (0, 1)."""
    slope, image = _SIGMOID
    return pointwise(ctx, x, slope=slope, image=image, contractive=False)


@rule(aten.relu)
def relu(ctx: Ctx, x: Bound) -> Bound:
    """ReLU: 1-Lipschitz, slope 0 on intervals with hi ≤ 0; increasing; |relu(x)| ≤ |x|."""
    return pointwise(
        ctx,
        x,
        slope=lambda lo, hi: (hi > 0).to(F64),
        image=lambda lo, hi: (lo.clamp(min=0), hi.clamp(min=0)),
        contractive=True,
    )


@rule(aten.leaky_relu)
def leaky_relu(ctx: Ctx, x: Bound, negative_slope: float = 0.01) -> Bound:
    """Leaky ReLU: slope 1 for x > 0, a for x < 0; increasing for a ≥ 0."""
    a = float(negative_slope)
    if a < 0:
        raise UnsupportedOpError("leaky_relu with a negative slope")

    def f(t: Tensor) -> Tensor:
        return torch.where(t > 0, t, a * t)

    return pointwise(
        ctx,
        x,
        slope=lambda lo, hi: torch.maximum((hi > 0).to(F64), (lo < 0).to(F64) * a),
        image=lambda lo, hi: (f(lo), f(hi)),
        contractive=a <= 1,
    )


def _clamp_pointwise(ctx: Ctx, x: Bound, lo_c: Any, hi_c: Any) -> Bound:
    """y = min(max(x, lo_c), hi_c) with constant bounds (numbers, ±inf, or tensors that
    broadcast to x): increasing, slope 1 where the element's interval meets (lo_c, hi_c),
    else 0 (the output is constant there); image [clamp(lo), clamp(hi)] (``torch.clamp``,
    which also gives hi_c wherever lo_c > hi_c, as the op does); |clamp(x)| ≤ |x| when
    lo_c ≤ 0 ≤ hi_c everywhere."""
    if isinstance(lo_c, Tensor) or isinstance(hi_c, Tensor):
        shape = torch.broadcast_shapes(
            x.shape, *(t.shape for t in (lo_c, hi_c) if isinstance(t, Tensor))
        )
        x = broadcast(ctx, x, shape, "clamp")
        lo_c = torch.as_tensor(lo_c, dtype=F64).expand(shape)
        hi_c = torch.as_tensor(hi_c, dtype=F64).expand(shape)
        contractive = bool((lo_c <= 0).all() and (hi_c >= 0).all())
    else:
        contractive = lo_c <= 0 <= hi_c

    def f(t: Tensor) -> Tensor:
        return torch.clamp(t, lo_c, hi_c)

    return pointwise(
        ctx,
        x,
        slope=lambda lo, hi: ((hi > lo_c) & (lo < hi_c)).to(F64),
        image=lambda lo, hi: (f(lo), f(hi)),
        contractive=contractive,
    )


def _clamp_value(v: Any, default: float) -> Any:
    """A clamp bound as a float (``None``: ``default``) or a float64 constant tensor."""
    if v is None:
        return default
    if isinstance(v, Const):
        return v.t.detach().to(F64)
    return float(v)


@rule(aten.clamp, aten.clip)
def clamp(ctx: Ctx, x: Bound, min: Any = None, max: Any = None) -> Bound:
    """clamp(x, min, max) = min(max(x, min), max): constant bounds (numbers or tensors) by
    :func:`_clamp_pointwise`; a bound that depends on the input makes it an elementwise max
    and min of two activations (``order.extreme``)."""
    if isinstance(min, Bound) or isinstance(max, Bound):
        y = x if min is None else extreme(ctx, x, min, largest=True)
        return y if max is None else extreme(ctx, y, max, largest=False)
    return _clamp_pointwise(ctx, x, _clamp_value(min, -math.inf), _clamp_value(max, math.inf))


@rule(aten.clamp_min)
def clamp_min(ctx: Ctx, x: Bound, min: Any) -> Bound:
    """clamp_min(x, a) = clamp(x, a, None): see :func:`clamp`."""
    return clamp(ctx, x, min, None)


@rule(aten.clamp_max)
def clamp_max(ctx: Ctx, x: Bound, max: Any) -> Bound:
    """clamp_max(x, b) = clamp(x, None, b): see :func:`clamp`."""
    return clamp(ctx, x, None, max)


@rule(aten.hardtanh)
def hardtanh(ctx: Ctx, x: Bound, min_val: float = -1.0, max_val: float = 1.0) -> Bound:
    """hardtanh = clamp to [min_val, max_val] (default [−1, 1]): :func:`_clamp_pointwise`."""
    return _clamp_pointwise(ctx, x, float(min_val), float(max_val))


@rule(aten.hardsigmoid)
def hardsigmoid(ctx: Ctx, x: Bound) -> Bound:
    """hardsigmoid(x) = clamp(x/6 + 1/2, 0, 1): increasing, slope 1/6 on (−3, 3) and 0
    outside, so sup|f'| over [lo, hi] is 1/6 when the interval meets (−3, 3), else 0;
    image [f(lo), f(hi)] ⊆ [0, 1]. The slope is padded by float32's epsilon so that it also
    covers torch's gradient of hardsigmoid, which uses a float32 1/6 in float64."""

    def f(t: Tensor) -> Tensor:
        return (t / 6 + 0.5).clamp(0.0, 1.0)

    return pointwise(
        ctx,
        x,
        slope=lambda lo, hi: ((hi > -3) & (lo < 3)).to(F64) / 6 * (1 + 2.0**-22),
        image=lambda lo, hi: (f(lo), f(hi)),
        contractive=False,
    )


def _hardswish(t: Tensor) -> Tensor:
    return torch.where(t <= -3, torch.zeros_like(t), t * (t + 3).clamp(0.0, 6.0) / 6)


@rule(aten.hardswish)
def hardswish(ctx: Ctx, x: Bound) -> Bound:
    """hardswish(x) = x·clamp(x + 3, 0, 6)/6: 0 for x ≤ −3, x for x ≥ 3, x(x + 3)/6 between,
    where f' = (2x + 3)/6 ∈ [−1/2, 3/2] is increasing. So sup|f'| over [lo, hi] is 1 if
    hi > 3, and on [a, b] = [lo, hi] ∩ [−3, 3] it is max(|2a + 3|, |2b + 3|)/6; 0 when
    hi ≤ −3. f decreases on (−3, −3/2) and increases after it: its minimum over [lo, hi]
    is f(−3/2) = −3/8 when −3/2 ∈ [lo, hi], else min(f(lo), f(hi)), and its maximum is
    max(f(lo), f(hi)). |f(x)| ≤ |x| (|x + 3| ≤ 6 on [−3, 3])."""

    def slope(lo: Tensor, hi: Tensor) -> Tensor:
        a, b = lo.clamp(-3.0, 3.0), hi.clamp(-3.0, 3.0)
        inner = torch.maximum((2 * a + 3).abs(), (2 * b + 3).abs()) / 6
        inner = torch.where((hi > -3) & (lo < 3), inner, torch.zeros_like(inner))
        outer = (hi > 3).to(F64)
        return torch.maximum(inner, outer) * (1 + 1e-15)

    def image(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        fa, fb = _hardswish(lo), _hardswish(hi)
        low = torch.minimum(fa, fb)
        low = torch.where((lo <= -1.5) & (hi >= -1.5), torch.full_like(low, -0.375), low)
        return low, torch.maximum(fa, fb)

    return pointwise(ctx, x, slope=slope, image=image, contractive=True)
@rule(aten.abs)
def abs_(ctx: Ctx, x: Bound) -> Bound:
    """|x|: 1-Lipschitz; image [dist(0, [lo, hi]), max(|lo|, |hi|)]."""
    return pointwise(
        ctx,
        x,
        slope=lambda lo, hi: torch.ones_like(lo),
        image=lambda lo, hi: (
            torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo))),
            torch.maximum(lo.abs(), hi.abs()),
        ),
        contractive=True,
    )


@rule(aten.exp)
def exp(ctx: Ctx, x: Bound) -> Bound:
    """exp: increasing and convex, slope ≤ exp(hi)."""
    return pointwise(
        ctx,
        x,
        slope=lambda lo, hi: torch.exp(hi) * (1 + 4e-16) + 1e-300,
        image=lambda lo, hi: (torch.exp(lo), torch.exp(hi)),
        contractive=False,
    )


def _positive(x: Bound, what: str) -> None:
    if not bool((x.lo > 0).all()):
        raise UnsupportedOpError(
            f"{what} of an activation that may be ≤ 0 over the input set has no finite bound"
        )


@rule(aten.sqrt)
def sqrt(ctx: Ctx, x: Bound) -> Bound:
    """√x on x ≥ lo > 0: increasing, slope 1/(2√lo)."""
    _positive(x, "sqrt")
    return pointwise(
        ctx,
        x,
        slope=lambda lo, hi: 0.5 / torch.sqrt(lo) * (1 + 1e-15),
        image=lambda lo, hi: (torch.sqrt(lo), torch.sqrt(hi)),
        contractive=False,
    )


@rule(aten.rsqrt)
def rsqrt(ctx: Ctx, x: Bound) -> Bound:
    """1/√x on x ≥ lo > 0: decreasing, slope ½·lo^(−3/2)."""
    _positive(x, "rsqrt")
    return pointwise(
        ctx,
        x,
        slope=lambda lo, hi: 0.5 * lo.pow(-1.5) * (1 + 1e-15),
        image=lambda lo, hi: (torch.rsqrt(hi), torch.rsqrt(lo)),
        contractive=False,
    )


@rule(aten.reciprocal)
def reciprocal(ctx: Ctx, x: Bound) -> Bound:
    """1/x on an interval that excludes 0: decreasing on each side, |f'| = 1/x² ≤
    1/min(|lo|, |hi|)²."""
    if not bool(((x.lo > 0) | (x.hi < 0)).all()):
        raise UnsupportedOpError(
            "reciprocal (or division) by an activation whose bounds include 0"
        )
    m = torch.minimum(x.lo.abs(), x.hi.abs())
    return pointwise(
        ctx,
        x,
        slope=lambda lo, hi: (1.0 / m.square()) * (1 + 1e-15),
        image=lambda lo, hi: (1.0 / hi, 1.0 / lo),
        contractive=False,
    )


def _dist0(lo: Tensor, hi: Tensor) -> Tensor:
    """dist(0, [lo, hi]) elementwise (0 when the interval contains 0)."""
    return torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo)))


def _integer_pow(ctx: Ctx, x: Bound, n: int) -> Bound:
    """x^n for an integer n. n = 0: the constant 1 (slope 0). n > 0: |f'| = n·|x|^(n−1)
    grows with |x|, so its sup over [lo, hi] is n·M^(n−1), M = max(|lo|, |hi|); odd n is
    increasing (image [lo^n, hi^n]), even n is |x|^n (image [dist(0, I)^n, M^n]). n < 0 needs
    an interval without 0: there |f'| = |n|·|x|^(n−1) decreases with |x|, sup |n|·m^(n−1)
    with m = min(|lo|, |hi|), and f is monotone on it (image between the endpoint values).
    Slopes and images are widened by (|n| + 4) ulps for the float64 powers."""
    rel = (abs(n) + 4) * 2.0**-52
    if n == 0:
        return pointwise(ctx, x, slope=lambda lo, hi: torch.zeros_like(lo),
                         image=lambda lo, hi: (torch.ones_like(lo), torch.ones_like(hi)),
                         contractive=False)
    if n < 0 and not bool(((x.lo > 0) | (x.hi < 0)).all()):
        raise UnsupportedOpError(
            f"pow(x, {n}) of an activation whose bounds include 0 has no finite bound"
        )

    def widen(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return a - rel * a.abs(), b + rel * b.abs()

    def slope(lo: Tensor, hi: Tensor) -> Tensor:
        if n > 0:
            big = torch.maximum(lo.abs(), hi.abs())
            return n * big.pow(n - 1) * (1 + rel)
        small = torch.minimum(lo.abs(), hi.abs())
        return abs(n) * small.pow(n - 1) * (1 + rel)

    def image(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        a, b = lo.pow(n), hi.pow(n)
        if n > 0 and n % 2 == 0:
            return widen(_dist0(lo, hi).pow(n), torch.maximum(a, b))
        return widen(torch.minimum(a, b), torch.maximum(a, b))

    return pointwise(ctx, x, slope=slope, image=image, contractive=False)


def _scalar_base_pow(ctx: Ctx, c: float, x: Bound) -> Bound:
    """c^x = exp(x·ln c) for a constant base c > 0: monotone, |f'| = |ln c|·c^x, largest at
    an endpoint of [lo, hi]; c = 1 is the constant 1."""
    if not c > 0:
        raise UnsupportedOpError(f"pow({c}, x) with a base ≤ 0 is not Lipschitz")
    k = abs(math.log(c))

    def slope(lo: Tensor, hi: Tensor) -> Tensor:
        return k * torch.maximum(torch.pow(c, lo), torch.pow(c, hi)) * (1 + 1e-14) + 1e-300

    def image(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        a, b = torch.pow(c, lo), torch.pow(c, hi)
        return torch.minimum(a, b), torch.maximum(a, b)

    return pointwise(ctx, x, slope=slope, image=image, contractive=False)


@rule(aten.pow)
def pow_(ctx: Ctx, x: Any, exponent: Any) -> Bound:
    """x^p for a constant p: p = 1 is the identity, an integer p goes to
    :func:`_integer_pow` (x³ in GPT-2's tanh GELU, x² in RMSNorm), any other p needs a
    positive interval (monotone, |f'| = |p|·x^(p−1) is largest at an endpoint). A constant
    base and an activation exponent (``pow.Scalar``): :func:`_scalar_base_pow`."""
    if not isinstance(x, Bound):
        if not isinstance(x, int | float):
            raise UnsupportedOpError("pow with a tensor base and an activation exponent")
        return _scalar_base_pow(ctx, float(x), exponent)
    if isinstance(exponent, Const) and exponent.t.numel() == 1:
        exponent = float(exponent.t)
    if not isinstance(exponent, int | float):
        raise UnsupportedOpError("pow with an exponent that depends on the input or varies "
                                 "by element")
    p = float(exponent)
    if p == 1.0:
        return x
    if p.is_integer():
        return _integer_pow(ctx, x, int(p))
    _positive(x, f"pow(x, {p})")

    def slope(lo: Tensor, hi: Tensor) -> Tensor:
        return abs(p) * torch.maximum(lo.pow(p - 1), hi.pow(p - 1)) * (1 + 1e-14)

    def image(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        a, b = lo.pow(p), hi.pow(p)
        return torch.minimum(a, b), torch.maximum(a, b)

    return pointwise(ctx, x, slope=slope, image=image, contractive=False)

@rule(aten._softmax, aten.softmax)
def softmax(ctx: Ctx, x: Bound, dim: int, *args: object) -> Bound:
    """softmax along ``dim``. Its Jacobian J = diag(p) − ppᵀ is positive semidefinite with
    vᵀJv = Var_p(v) ≤ (max v − min v)²/4 ≤ ‖v‖²/2, and J ≼ diag(p), so
    ‖J‖ ≤ min(1/2, max_i p_i) (max p_i from the intervals). Output rows are probability
    vectors: ‖p‖₂ ≤ ‖p‖₁ = 1. Intervals: p_i = 1/(1 + Σ_{j≠i} e^{x_j − x_i}), so
    p_i ≥ e^{lo_i}/(e^{lo_i} + Σ_j e^{hi_j}) and p_i ≤ e^{hi_i}/(e^{hi_i} + Σ_{j≠i} e^{lo_j})."""
    d = dim % x.dim()
    reduce_sid(x.sid, (d,), "softmax")
    lo, hi = x.lo, x.hi
    if bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        shift = hi.amax(dim=d, keepdim=True)
        s_hi = torch.exp(hi - shift).sum(d, keepdim=True)
        e_lo = torch.exp(lo - shift)
        s_lo = e_lo.sum(d, keepdim=True)
        others_lo = (s_lo - e_lo - 4 * 2.0**-53 * lo.shape[d] * s_lo).clamp(min=0)
        p_lo = e_lo / (e_lo + s_hi) * (1 - 1e-14)
        e_hi = torch.exp(hi - shift)
        p_hi = torch.nan_to_num(e_hi / (e_hi + others_lo) * (1 + 1e-14), nan=1.0).clamp(max=1.0)
        p_lo = p_lo.clamp(min=0.0)
    else:
        p_lo, p_hi = torch.zeros_like(lo), torch.ones_like(hi)
    pmax = sample_max(p_hi, x.sid, ctx.n)
    f = torch.clamp(pmax, max=0.5)
    last = d == x.dim() - 1
    one = ctx.full(1.0)
    inf = ctx.full(math.inf)
    return Bound(
        p_lo,
        p_hi,
        f * x.lip,
        f * x.lip_tok if last else f * x.lip,
        inf,
        one if last else inf,
        sid=x.sid,
        tok_l1=one if last else None,
    )


def _eval_only(train: bool | None) -> None:
    """Refuse dropout unless ``train`` is False (``native_dropout`` reads None as True)."""
    if train is None or train:
        raise UnsupportedOpError(
            "dropout in training mode: put the model in eval mode (model.eval()) first"
        )


@rule(aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout)
def dropout(ctx: Ctx, x: Bound, p: float = 0.5, train: bool | None = False) -> Bound:
    """Dropout in eval mode is the identity; in train mode it is random (refused)."""
    _eval_only(train)
    return Exact(x)  # type: ignore[return-value]


@rule(aten.native_dropout)
def native_dropout(ctx: Ctx, x: Bound, p: float, train: bool | None) -> tuple[Any, ...]:
    """native_dropout in eval mode (``train`` False): the identity, and a mask of ones, which
    is an auxiliary output (opaque); in train mode (True, or None) it is random (refused)."""
    _eval_only(train)
    return Exact((x, Opaque("dropout mask")))  # type: ignore[return-value]
