"""The change of the inverse standard deviation of LayerNorm / RMSNorm over an input set
(``rules/norm.py``: :func:`inverse_std_change` and :func:`normalised`), checked directly at
random and extreme points of many random sets, for soundness and for tightness (a bound
twice too small must fail here, which the end-to-end rule tests cannot promise)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lipcert.bounds.backward import Box
from lipcert.bounds.backward.interval import GroupDot
from lipcert.bounds.backward.rules.norm import (
    centre_dot,
    inverse_std_change,
    norm_forward,
    normalised,
)

F64 = torch.float64
CASES = 200


def _case(g: torch.Generator, centred: bool) -> tuple[Tensor, Tensor, Tensor, float]:
    """A centre v (1, d), a box radius ρ and a ball radius D of the deviation, and ε."""
    d = int(torch.randint(2, 65, (), generator=g))
    v = torch.randn(1, d, generator=g, dtype=F64) * float(10 ** torch.empty(()).uniform_(
        -1, 1, generator=g))
    if bool(torch.rand((), generator=g) < 0.3):  # an outlier feature
        v[0, int(torch.randint(0, d, (), generator=g))] *= 20
    u = v - v.mean() if centred else v
    size = float(10 ** torch.empty(()).uniform_(-4, -0.5, generator=g))
    rho = torch.rand(1, d, generator=g, dtype=F64) * size * u.norm() / math.sqrt(d)
    ball = rho.norm() * float(torch.empty(()).uniform_(0.3, 1.0, generator=g))
    eps = float(10 ** torch.empty(()).uniform_(-6, -2, generator=g))
    return v, rho, ball.reshape(1, 1), eps


def _points(g: torch.Generator, u0: Tensor, rho: Tensor, ball: Tensor, centred: bool,
            n: int = 64) -> Tensor:
    """Deviations Δx in the box ∩ ball: random ones, and those that push ⟨u₀, Δx⟩ to
    either end and the norm of Δx up (the extremes of the bounds)."""
    d = rho.shape[-1]
    pts = [(torch.rand(n, d, generator=g, dtype=F64) * 2 - 1) * rho]
    # the maximiser of ⟨u₀, Δx⟩ over the box ∩ ball: clip(λ|u₀|, 0, ρ) with the largest λ
    # that stays in the ball (bisection on λ)
    lo, hi = 0.0, float(rho.max() / u0.abs().clamp(min=1e-300).min()) + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        inside = torch.minimum(mid * u0.abs(), rho).norm() <= ball.squeeze()
        lo, hi = (mid, hi) if bool(inside) else (lo, mid)
    best = torch.minimum(lo * u0.abs(), rho) * torch.sign(u0)
    for sign in (1.0, -1.0):
        for scale in (1.0, 0.5, 0.1):
            pts.append(sign * scale * best)
            pts.append(sign * scale * rho * torch.sign(u0))
    pts.append(rho * torch.where(torch.rand(n, d, generator=g) < 0.5, -1.0, 1.0))
    dx = torch.cat(pts)
    norm = dx.norm(dim=-1, keepdim=True)
    return dx * torch.clamp(ball / norm.clamp(min=1e-300), max=1.0)


def _check_points(u0: Tensor, du: Tensor, eps: float, s_lo: Tensor, s_hi: Tensor,
                  zc: Tensor, zr: Tensor, g_dev: Tensor, h_dev: Tensor) -> Tensor:
    """Assert s ∈ [s_lo, s_hi], ẑ in its box, |g − g₀| ≤ G and |g − g₀ − ∇g₀·Δu| ≤ H
    (g = 1/s) at the centre u₀ moved by each row of ``du``; returns |g − g₀| per point."""
    d = u0.shape[-1]
    s0 = torch.sqrt(u0.square().mean(-1, keepdim=True) + eps)
    s = torch.sqrt((u0 + du).square().mean(-1, keepdim=True) + eps)
    change = 1 / s - 1 / s0
    second = change + (u0 * du).sum(-1, keepdim=True) / d / s0**3
    tol = 1e-12 / s0
    assert bool(((s >= s_lo - tol) & (s <= s_hi + tol)).all()), "s leaves [s_lo, s_hi]"
    z = (u0 + du) / s
    assert bool(((z - zc).abs() <= zr + 1e-12 * (1 + z.abs())).all()), "ẑ leaves its box"
    assert bool((change.abs() <= g_dev + tol).all()), "|g − g₀| above its bound"
    assert bool((second.abs() <= h_dev + tol).all()), "|g − g₀ − ∇g₀Δu| above its bound"
    return change.abs()


@pytest.mark.parametrize("centred", [True, False])
def test_inverse_std_change_holds_and_is_tight(centred: bool) -> None:
    """s ∈ [s_lo, s_hi], ẑ in its enclosure, |g − g₀| ≤ G and |g − g₀ − ∇g₀·Δu| ≤ H
    (g = 1/s) at every point; where the set is
    small against the centre (b ≪ a), the largest |g − g₀| found reaches 0.4 of G, and 0.7
    in the median case."""
    g = torch.Generator().manual_seed(0)
    reached: list[float] = []
    for _ in range(CASES):
        v, rho, ball, eps = _case(g, centred)
        d = v.shape[-1]
        box = Box(v, v - rho, v + rho, None, ball.reshape(1))
        s_lo, s_hi, zc, zr = normalised(box, 1, eps, centred, None, None, None)
        u0 = v - v.mean() if centred else v
        s0 = torch.sqrt(u0.square().mean(-1, keepdim=True) + eps)
        a_lo, a_max = centre_dot(u0, torch.zeros_like(u0), rho, u0.norm(dim=-1, keepdim=True),
                                 ball)
        b_max = ball.square() / d
        g_dev, h_dev = inverse_std_change(s0, s_lo, s_hi, a_lo, a_max, b_max)
        dx = _points(g, u0, rho, ball, centred)
        du = dx - dx.mean(-1, keepdim=True) if centred else dx
        change = _check_points(u0, du, eps, s_lo, s_hi, zc, zr, g_dev, h_dev)
        if float(b_max) < 0.1 * float(a_max):
            reached.append(float(change.max() / g_dev))
    assert len(reached) >= CASES // 4, "too few cases checked for tightness"
    assert min(reached) >= 0.4 and float(torch.tensor(reached).median()) >= 0.7, reached


@pytest.mark.parametrize("centred", [True, False])
def test_a_signed_centre_dot_range_narrows_soundly(centred: bool) -> None:
    """With a range [lo, hi] of ⟨w, Δx⟩ attached to the input (``Box.dot``, w within
    rounding of u₀; here the set is cut to lo = −f·hi, hi the largest value over the set),
    s, ẑ, |g − g₀| and |g − g₀ − ∇g₀·Δu| stay within their bounds at every point of the
    cut set (its lower end included), and s_lo is at least the one without the range."""
    g = torch.Generator().manual_seed(5)
    for _ in range(CASES):
        v, rho, ball, eps = _case(g, centred)
        d = v.shape[-1]
        u0 = v - v.mean() if centred else v
        dx = _points(g, u0, rho, ball, centred)
        w = u0 * (1 + 1e-15 * torch.randn(u0.shape, generator=g, dtype=F64))
        top, at = (dx * w).sum(-1).max(0)
        top = float(top)
        frac = float(torch.rand((), generator=g))
        dx = torch.cat([dx, -frac * dx[at:at + 1] * (1 - 1e-12)])  # the cut's lower end
        dot = GroupDot(w, torch.full((1, 1), -frac * top, dtype=F64),
                       torch.full((1, 1), top, dtype=F64))
        dx = dx[(dx * w).sum(-1) >= -frac * top]
        plain = Box(v, v - rho, v + rho, None, ball.reshape(1))
        box = Box(v, v - rho, v + rho, None, ball.reshape(1), dot=dot)
        s_lo, s_hi, zc, zr = normalised(box, 1, eps, centred, None, None, None)
        assert bool((s_lo >= normalised(plain, 1, eps, centred, None, None, None)[0]).all())
        s0 = torch.sqrt(u0.square().mean(-1, keepdim=True) + eps)
        a_lo, a_hi = centre_dot(u0, torch.zeros_like(u0), rho, u0.norm(dim=-1, keepdim=True),
                                ball, dot)
        assert float(a_lo) >= -frac * top / d * (1 + 1e-9) - 1e-300
        g_dev, h_dev = inverse_std_change(s0, s_lo, s_hi, a_lo, a_hi, ball.square() / d)
        du = dx - dx.mean(-1, keepdim=True) if centred else dx
        _check_points(u0, du, eps, s_lo, s_hi, zc, zr, g_dev, h_dev)


def _into(dx: Tensor, rho: Tensor, ball: Tensor) -> Tensor:
    """Deviations clipped to the box [−ρ, ρ] and scaled into the ball of radius ``ball``."""
    dx = torch.maximum(torch.minimum(dx, rho), -rho)
    return dx * torch.clamp(ball / dx.norm(dim=-1, keepdim=True).clamp(min=1e-300), max=1.0)


@pytest.mark.parametrize("centred", [True, False])
def test_row_remainder_holds_and_is_reached(centred: bool) -> None:
    """The LayerNorm / RMSNorm rule's bound of its own remainder's row norm
    (``Box.own_rows``, from :func:`_norm_remainder`) holds at random points of the set and at
    points pushed by projected gradient ascent on ‖R‖ (R = y − y₀ − J₀Δx, J₀ by
    forward-mode AD), and so do the elementwise bounds it narrows; where the set is small
    against the centre and ε small against the variance, the pushed points reach 0.95 of
    the bound (the constant 1/√3 is attained in the limit; 0.95 of the bound fails)."""
    g = torch.Generator().manual_seed(7)
    reached: list[float] = []
    for i in range(CASES):
        v, rho, ball, eps = _case(g, centred)
        d = v.shape[-1]
        gamma_ = torch.empty(d, dtype=F64).uniform_(0.5, 2.0, generator=g)
        if i % 2:
            gamma_ = torch.full((d,), float(gamma_[0]), dtype=F64)  # max|γ| reached
        gamma_ = gamma_ * torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
        beta = torch.randn(d, generator=g, dtype=F64)
        zero = torch.zeros_like(v)
        box = Box(v, v - rho, v + rho, None, ball.reshape(1), zero, zero)
        out = norm_forward(box, 1, gamma_, beta if centred else None, eps, centred)
        assert out.own_rows is not None and out.own_hi is not None

        def remainder(dx: Tensor, v: Tensor = v, gamma_: Tensor = gamma_, beta: Tensor = beta,
                      eps: float = eps) -> Tensor:
            """y(v + Δx) − y(v) − J₀Δx for each row of Δx."""
            d = v.shape[-1]

            def norm(x: Tensor) -> Tensor:
                if centred:
                    return torch.nn.functional.layer_norm(x, (d,), gamma_, beta, eps)
                return torch.nn.functional.rms_norm(x, (d,), gamma_, eps)

            y0, lin = torch.func.jvp(norm, (v.expand_as(dx).contiguous(),), (dx,))
            return norm(v + dx) - y0 - lin

        u0 = v - v.mean() if centred else v
        points = [_points(g, u0, rho, ball, centred)]
        dx = _into(torch.randn(8, d, generator=g, dtype=F64) * rho, rho, ball)
        for _ in range(20):
            dx = dx.detach().requires_grad_(True)
            (step,) = torch.autograd.grad(remainder(dx).norm(dim=-1).sum(), dx)
            step = step / step.norm(dim=-1, keepdim=True).clamp(min=1e-300)
            dx = _into(dx.detach() + 0.2 * ball * step, rho, ball)
            points.append(dx)
        r = remainder(torch.cat(points))
        norms = r.norm(dim=-1)
        tol = 1e-12 * (1 + gamma_.abs().max())
        assert bool((norms <= out.own_rows + tol).all()), "‖R_row‖ above its bound"
        assert bool(((r >= out.own_lo - tol) & (r <= out.own_hi + tol)).all())
        s0_sq = float(u0.square().mean())
        if float(ball) < 0.02 * float(u0.norm()) and eps < 1e-3 * s0_sq:
            reached.append(float(norms.max() / out.own_rows))
    assert len(reached) >= CASES // 5, "too few cases checked for tightness"
    assert max(reached) >= 0.95, reached
