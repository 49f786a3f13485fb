"""Attention's remainders (``rules/attention.py``), checked directly. The scores' own
second-order term c·ΔQΔKᵀ (``_score_remainder``): at points of random input sets (boxes with
per-row ℓ2 deviation bounds), and at the points that align ΔQ_i with ΔK_j at full
deviation, where the bound c·‖Δq_i‖·‖Δk_j‖ is attained; and a scores' remainder carried to
the output through the exact Jacobian (``_through_softmax``). Both at points where the
bounds are reached, so a bound too small by any factor fails here, which the end-to-end
rule tests cannot promise. And softmax's own second-order remainder
(``softmax_second_order``) at random and gradient-searched points of random score boxes,
and its product with the values as a quadratic form of the input deviation
(``softmax_own_quadratic``) at random and searched points of random balls."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lipcert.bounds.backward import Box
from lipcert.bounds.backward.registry import FwdCtx
from lipcert.bounds.backward.rules.attention import (
    AttentionParts,
    _score_remainder,
    _soft_times,
    _through_softmax,
    attention_parts,
    score_forms,
    softmax_box,
    softmax_own,
    softmax_own_quadratic,
    softmax_own_times,
    softmax_remainder,
    softmax_second_order,
)

F64 = torch.float64


def _box(value: Tensor, half: Tensor, rows: Tensor) -> Box:
    zero = torch.zeros_like(value)
    return Box(value, value - half, value + half, None, rows, zero, zero)


def _inside(dev: Tensor, half: Tensor, rows: Tensor) -> Tensor:
    """``dev`` clipped to the box and scaled into the row balls."""
    dev = torch.maximum(torch.minimum(dev, half), -half)
    norm = dev.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    return dev * torch.clamp(rows.unsqueeze(-1) / norm, max=1.0)


def _score_rows(g: torch.Generator, case: int, rows: int, spread: float | tuple[float, float],
                sizes: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
    """Centre scores (1, rows, S) scaled by ``spread`` (or a scale drawn from that range),
    half-widths h of a score box (up to 10^sizes[0] to 10^sizes[1]) and the kept entries
    (every third case causally masked, each row keeping one at least)."""
    S = int(torch.randint(2, 10, (), generator=g))
    s0 = torch.randn(1, rows, S, generator=g, dtype=F64)
    s0 = s0 * (float(torch.empty(()).uniform_(*spread, generator=g))
               if isinstance(spread, tuple) else spread)
    h = torch.rand(1, rows, S, generator=g, dtype=F64) * float(
        10 ** torch.empty(()).uniform_(*sizes, generator=g))
    keep = torch.ones(rows, S, dtype=torch.bool)
    if case % 3 == 0:
        keep = keep.tril(diagonal=max(S - rows, 0))
    return s0, h, keep


def _softmax_own(s0: Tensor, p0: Tensor, keep: Tensor, ds: Tensor) -> Tensor:
    """softmax's own remainder p(s₀ + Δ) − p⁰ − J₀Δ over the kept entries."""
    ds = torch.where(keep, ds, 0.0)
    p = torch.softmax((s0 + ds).masked_fill(~keep, -math.inf), -1)
    return p - p0 - p0 * (ds - (p0 * ds).sum(-1, keepdim=True))


def _pushed(g: torch.Generator, h: Tensor, value: Callable[[Tensor], Tensor]) -> Tensor:
    """A point of the box [−h, h] from 30 signed gradient steps that push ``value`` up."""
    ds = (torch.rand(h.shape, generator=g, dtype=F64) * 2 - 1) * h
    for _ in range(30):
        ds.requires_grad_(True)
        (step,) = torch.autograd.grad(value(ds), ds)
        ds = torch.clamp(ds.detach() + 0.5 * h * torch.sign(step), -h, h)
    return ds


def test_score_own_term_holds_and_is_attained() -> None:
    g = torch.Generator().manual_seed(0)
    reached = []
    for case in range(100):
        h, t, e = 2, 5, int(torch.randint(2, 9, (), generator=g))
        q0, k0 = (torch.randn(1, h, t, e, generator=g, dtype=F64) for _ in range(2))
        scale = float(10 ** torch.empty(()).uniform_(-3, 0, generator=g))
        hq, hk = (torch.rand(1, h, t, e, generator=g, dtype=F64) * scale for _ in range(2))
        rq = hq.norm(dim=-1) * torch.rand(1, h, t, generator=g, dtype=F64)
        rk = hk.norm(dim=-1) * torch.rand(1, h, t, generator=g, dtype=F64)
        if case % 2:  # the row balls inside the boxes: the ℓ2 bound is the binding one
            hq, hk = rq.unsqueeze(-1).expand_as(hq), rk.unsqueeze(-1).expand_as(hk)
        c = 1 / e**0.5
        s0 = c * q0 @ k0.transpose(-1, -2)
        _, (own_lo, own_hi) = _score_remainder(_box(q0, hq, rq), _box(k0, hk, rk), c, s0)
        points = []
        for _ in range(20):
            dq = _inside(torch.randn(q0.shape, generator=g, dtype=F64) * hq, hq, rq)
            dk = _inside(torch.randn(k0.shape, generator=g, dtype=F64) * hk, hk, rk)
            points.append((dq, dk))
        if case % 2:  # aligned rows at full deviation, both signs
            u = torch.randn(e, generator=g, dtype=F64)
            u = u / u.norm()
            for sign in (1.0, -1.0):
                points.append((sign * rq.unsqueeze(-1) * u, rk.unsqueeze(-1) * u))
        for dq, dk in points:
            own = c * dq @ dk.transpose(-1, -2)
            tol = 1e-12 * (1 + s0.abs())
            assert bool(((own >= own_lo - tol) & (own <= own_hi + tol)).all())
        if case % 2:
            best = torch.stack([(c * dq @ dk.transpose(-1, -2)).abs() for dq, dk in points])
            bound = torch.maximum(own_lo.abs(), own_hi.abs())
            reached.append(float((best.amax(0) / bound).median()))
    assert min(reached) >= 0.99, reached


def test_score_remainders_reach_the_output_through_the_exact_jacobian() -> None:
    """``_through_softmax``: with the scores' deviation itself as their remainder
    (ΔS ∈ [−h, h], no first-order part), Y − Y⁰ = (P − P⁰)V₀ lies in the enclosure at
    random points and at the corners ΔS_i = ±h_i ⊙ sign(∂Y_id/∂S_i), and for small h
    those corners reach the enclosure's ends to within 5% (the exact Jacobian
    P⁰_ij(V₀_jd − Y⁰_id) is used, not |J₀| wrapped through |V₀ − w|)."""
    g = torch.Generator().manual_seed(1)
    for case in range(40):
        L, S, E = 4, 6, 3
        s0 = torch.randn(1, L, S, generator=g, dtype=F64) * 2
        v0 = torch.randn(1, S, E, generator=g, dtype=F64)
        h = torch.rand(1, L, S, generator=g, dtype=F64) * (1e-4 if case % 2 else 0.3)
        p0, p_lo, p_hi = softmax_box(s0, s0 - h, s0 + h)
        p_rem = softmax_remainder(p0, p_lo, p_hi, -h, h, -h, h)
        parts = AttentionParts(1.0, p0, p_lo, p_hi, None, soft_own=softmax_own(
            p0, p_lo, p_hi, -h, h))
        y0 = p0 @ v0
        w = v0.mean(-2, keepdim=True)
        c, r = _through_softmax(parts, (-h, h), p_rem, v0, w, y0, _soft_times(parts, v0, w))
        lo, hi = c - r, c + r
        coef = p0.unsqueeze(-1) * (v0.unsqueeze(-3) - y0.unsqueeze(-2))  # (1, L, S, E)
        points = [(torch.rand(h.shape, generator=g, dtype=F64) * 2 - 1) * h
                  for _ in range(20)]
        for d in range(E):
            for sign in (1.0, -1.0):
                points.append(sign * h * torch.sign(coef[..., d]))
        reach_hi = torch.full_like(hi, -math.inf)
        reach_lo = torch.full_like(lo, math.inf)
        for ds in points:
            dy = (torch.softmax(s0 + ds, -1) - p0) @ v0
            tol = 1e-13 * (1 + y0.abs())
            assert bool(((dy >= lo - tol) & (dy <= hi + tol)).all())
            reach_hi, reach_lo = torch.maximum(reach_hi, dy), torch.minimum(reach_lo, dy)
        if case % 2:
            assert bool((reach_hi >= hi - 0.05 * (hi - lo)).all())
            assert bool((reach_lo <= lo + 0.05 * (hi - lo)).all())


def test_softmax_second_order_holds_and_is_reached() -> None:
    """R = p(s₀ + Δ) − p⁰ − J₀Δ stays in [lo, hi] at random points of 200 random score
    boxes (some rows masked causally) and at points that push each R_i up or down by
    signed gradient steps; those reach the bounds to 0.2 (upper) and 0.35 (lower) of their
    size in the median case and to 0.6 and 0.75 at best, so halving either bound fails."""
    g = torch.Generator().manual_seed(2)
    up, down = [], []
    for case in range(200):
        s0, h, keep = _score_rows(g, case, 3, (0.1, 3.0), (-4, -0.5))
        p0, p_lo, p_hi = softmax_box(s0, s0 - h, s0 + h, keep)
        lo, hi = softmax_second_order(p0, p_lo, p_hi, -h, h)
        best_hi = torch.full_like(hi, -math.inf)
        best_lo = torch.full_like(lo, math.inf)
        points = [(torch.rand(h.shape, generator=g, dtype=F64) * 2 - 1) * h
                  for _ in range(30)]
        points += [_pushed(g, h, lambda ds, i=i, sign=sign, s0=s0, p0=p0, keep=keep:
                           sign * _softmax_own(s0, p0, keep, ds)[..., i].sum())
                   for i in range(s0.shape[-1]) for sign in (1.0, -1.0)]
        for ds in points:
            r = _softmax_own(s0, p0, keep, ds)
            tol = 1e-15 * (1 + p0)
            assert bool(((r <= hi + tol) & (r >= lo - tol)).all()), f"case {case}"
            best_hi, best_lo = torch.maximum(best_hi, r), torch.minimum(best_lo, r)
        live = p_hi > 0
        up.append(float((best_hi[live] / hi[live]).median()))
        down.append(float((best_lo[live] / lo[live]).median()))
    up_t, down_t = torch.tensor(up), torch.tensor(down)
    assert float(up_t.median()) >= 0.2 and float(up_t.max()) >= 0.6, up
    assert float(down_t.median()) >= 0.35 and float(down_t.max()) >= 0.75, down


def test_softmax_own_times_values_holds_and_is_reached() -> None:
    """``softmax_own_times``: |R·V₀| for softmax's own remainder R stays below the bound at
    random points, sign corners and gradient-searched points of 150 random score boxes
    (some rows masked); the searched points reach 0.6 of it at best, so halving it fails."""
    g = torch.Generator().manual_seed(3)
    reached = []
    for case in range(150):
        s0, h, keep = _score_rows(g, case, 2, 2.0, (-3, 0))
        v0 = torch.randn(1, s0.shape[-1], 3, generator=g, dtype=F64)
        p0, _, p_hi = softmax_box(s0, s0 - h, s0 + h, keep)
        bound = softmax_own_times(p_hi, -h, h, v0)
        points = [(torch.rand(h.shape, generator=g, dtype=F64) * 2 - 1) * h for _ in range(20)]
        points += [torch.where(torch.rand(h.shape, generator=g) < 0.5, -h, h)
                   for _ in range(20)]
        points += [_pushed(g, h, lambda ds, d=d, sign=sign, s0=s0, p0=p0, keep=keep, v0=v0:
                           sign * (_softmax_own(s0, p0, keep, ds) @ v0)[..., d].sum())
                   for d in range(v0.shape[-1]) for sign in (1.0, -1.0)]
        best = torch.zeros_like(bound)
        for ds in points:
            r = (_softmax_own(s0, p0, keep, ds) @ v0).abs()
            assert bool((r <= bound + 1e-15).all()), f"case {case}"
            best = torch.maximum(best, r)
        reached.append(float((best / bound).max()))
    assert max(reached) >= 0.6, max(reached)


def test_softmax_own_terms_hold_over_the_whole_score_box() -> None:
    """The softmax's own terms inside attention (``AttentionParts.soft_own`` and the
    R·V₀ bound) hold for every score deviation in the score box, which holds the segments
    their derivation integrates over, even where P's Taylor model narrows P to a sliver
    (here a first-order part of 1e-12: reached points barely move P, points of the box do)."""
    g = torch.Generator().manual_seed(4)
    for _ in range(40):
        h, t, e = 2, 5, 4
        q0, k0, v0 = (torch.randn(1, h, t, e, generator=g, dtype=F64) for _ in range(3))
        size = float(10 ** torch.empty(()).uniform_(-3, -1, generator=g))
        hq, hk = (torch.rand(1, h, t, e, generator=g, dtype=F64) * size for _ in range(2))
        q, k = _box(q0, hq, hq.norm(dim=-1)), _box(k0, hk, hk.norm(dim=-1))
        ctx = FwdCtx(first_order={"att.scores": None,
                                  "att.probs": torch.full((1, h, t, t), 1e-12, dtype=F64)})
        parts = attention_parts(q, k, None, False, None, ctx, "att")
        assert parts.soft_own is not None and parts.ds is not None
        assert parts.p_seg_hi is not None
        s0 = q0 @ k0.transpose(-1, -2) / math.sqrt(e)
        p0 = torch.softmax(s0, -1)
        joint = softmax_own_times(parts.p_seg_hi, *parts.ds, v0)
        d_lo, d_hi = parts.ds
        for trial in range(30):
            u = torch.rand(d_lo.shape, generator=g, dtype=F64)
            if trial % 2:
                u = (u < 0.5).to(F64)  # corners of the box
            ds = d_lo + u * (d_hi - d_lo)
            r = _softmax_own(s0, p0, torch.ones_like(s0, dtype=torch.bool), ds)
            tol = 1e-14
            assert bool(((r >= parts.soft_own[0] - tol) & (r <= parts.soft_own[1] + tol)).all())
            assert bool(((r @ v0).abs() <= joint + tol).all())


def _ball_point(g: torch.Generator, shape: torch.Size, r: float) -> Tensor:
    """A random point of the ball of radius r (random direction, radius up to r)."""
    d = torch.randn(shape, generator=g, dtype=F64)
    return d / d.norm() * r * float(torch.rand((), generator=g, dtype=F64) ** 0.2)


def test_softmax_own_quadratic_holds_and_is_reached() -> None:
    """``softmax_own_quadratic``: for score rows Δ = Aδ + e (random Jacobians A of a
    40-dimensional input, ‖δ‖ ≤ r, e in a random box), R·V₀ (R softmax's own remainder)
    stays in [lo, hi] at random points and at points that push each entry up or down by
    projected gradient steps, over 200 random cases (some rows masked causally). Where e is
    0 and r small, the form's eigenvalues decide the bound: the searched points reach 0.7 of
    it in the median case and 0.9 at best, so a bound too small by 0.9 fails."""
    g = torch.Generator().manual_seed(5)
    reached = []
    for case in range(200):
        s0, _, keep = _score_rows(g, case, 3, (0.1, 3.0), (0, 0))
        rows, S, m, E = s0.shape[1], s0.shape[-1], 40, 3
        a = torch.randn(1, rows, S, m, generator=g, dtype=F64) * float(
            10 ** torch.empty(()).uniform_(-1, 1, generator=g))
        r = float(10 ** torch.empty(()).uniform_(-4, -0.5, generator=g))
        exact = case % 2 == 0  # no remainder: the quadratic form alone
        e_size = 0.0 if exact else float(10 ** torch.empty(()).uniform_(-6, -1, generator=g))
        e_lo = -torch.rand(s0.shape, generator=g, dtype=F64) * e_size
        e_hi = torch.rand(s0.shape, generator=g, dtype=F64) * e_size
        v0 = torch.randn(1, S, E, generator=g, dtype=F64)
        first = r * a.norm(dim=-1)
        d_lo, d_hi = e_lo - first, e_hi + first
        p0, p_lo, p_hi = softmax_box(s0, s0 + d_lo, s0 + d_hi, keep)
        forms = score_forms(a @ a.transpose(-1, -2), p0, v0)
        assert forms is not None
        lo, hi = softmax_own_quadratic(p0, p_lo, p_hi, d_lo, d_hi, e_lo, e_hi, v0, forms,
                                       torch.tensor(r, dtype=F64))

        def value(delta: Tensor, e: Tensor, s0: Tensor = s0, p0: Tensor = p0,
                  keep: Tensor = keep, a: Tensor = a, v0: Tensor = v0) -> Tensor:
            ds = (a @ delta.reshape(1, 1, -1, 1)).squeeze(-1) + e
            return _softmax_own(s0, p0, keep, ds) @ v0

        points = [(_ball_point(g, torch.Size((m,)), r),
                   e_lo + torch.rand(s0.shape, generator=g, dtype=F64) * (e_hi - e_lo))
                  for _ in range(10)]
        for i in range(rows):
            for d in range(E):
                for sign in (1.0, -1.0):
                    delta = _ball_point(g, torch.Size((m,)), r)
                    e = (e_lo + e_hi) / 2
                    for _ in range(40):
                        delta.requires_grad_(True)
                        e.requires_grad_(True)
                        step_d, step_e = torch.autograd.grad(
                            sign * value(delta, e)[0, i, d], [delta, e])
                        delta = delta.detach() + 0.5 * r * step_d / step_d.norm().clamp(
                            min=1e-300)
                        delta = delta * torch.clamp(r / delta.norm().clamp(min=1e-300),
                                                    max=1.0)
                        e = torch.where(step_e > 0, e_hi, e_lo)
                    points.append((delta.detach(), e.detach()))
        best = torch.full_like(hi, -math.inf)
        for delta, e in points:
            y = value(delta, e)
            tol = 1e-15 * (1 + v0.abs().amax())
            assert bool(((y <= hi + tol) & (y >= lo - tol)).all()), f"case {case}"
            best = torch.maximum(best, y)
        if exact and float(first.max()) < 1e-2:
            reached.append(float((best / hi)[hi > 1e-30].median()))
    share = torch.tensor(reached)
    assert len(reached) >= 30 and float(share.median()) >= 0.7 and float(share.max()) >= 0.9, \
        reached
