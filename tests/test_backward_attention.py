"""Attention's remainders (``rules/attention.py``), checked directly. The scores' own
second-order term c·ΔQΔKᵀ (``_score_remainder``): at points of random input sets (boxes with
per-row ℓ2 deviation bounds), and at the points that align ΔQ_i with ΔK_j at full
deviation, where the bound c·‖Δq_i‖·‖Δk_j‖ is attained; and a scores' remainder carried to
the output through the exact Jacobian (``_through_softmax``). Both at points where the
bounds are reached, so a bound too small by any factor fails here, which the end-to-end
rule tests cannot promise. And softmax's own second-order remainder
(``softmax_second_order``) at random and gradient-searched points of random score boxes,
and its product with the values as a quadratic form of the input deviation
(``softmax_own_quadratic``) at random and searched points of random balls, its third
order and row norm likewise. And the bound of the op's own remainder's row norms
(``attention_rows.own_rows``) at random and searched points, and at the points where each
of its parts is attained, with the budget splits between queries, keys and values
(``split_scores``, ``split_probs``) where the rows read known parts of the input."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lipcert.bounds.backward import Box
from lipcert.bounds.backward.registry import FwdCtx
from lipcert.bounds.backward.rules.attention import (
    AttentionParts,
    ScoreForms,
    _expansion_rest,
    _score_remainder,
    _score_row,
    _soft_times,
    _through_softmax,
    attention_parts,
    score_forms,
    sdpa_forward,
    softmax_box,
    softmax_cubic,
    softmax_own,
    softmax_own_norm,
    softmax_own_quadratic,
    softmax_own_times,
    softmax_remainder,
    softmax_second_order,
)
from lipcert.bounds.backward.rules.attention_rows import (
    frobenius,
    key_overlap,
    reads,
    split_probs,
    split_scores,
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


class _ScoreCase(NamedTuple):
    """A random case of :func:`_score_case`."""

    e_lo: Tensor
    e_hi: Tensor
    v0: Tensor
    first: Tensor
    ds: tuple[Tensor, Tensor]
    probs: tuple[Tensor, Tensor, Tensor]
    forms: ScoreForms


def _score_case(g: torch.Generator, s0: Tensor, keep: Tensor, a: Tensor, r: float,
                e_size: float, columns: int) -> _ScoreCase:
    """Score rows s₀ + Aδ + e (‖δ‖ ≤ r, e in a random box of size ``e_size``): the box,
    random values V₀ (1, S, ``columns``), the first-order part r‖a_j‖, the score
    deviations' box, the probabilities' (centre, lo, hi) and ``score_forms``."""
    e_lo = -torch.rand(s0.shape, generator=g, dtype=F64) * e_size
    e_hi = torch.rand(s0.shape, generator=g, dtype=F64) * e_size
    v0 = torch.randn(1, s0.shape[-1], columns, generator=g, dtype=F64)
    first = r * a.norm(dim=-1)
    d_lo, d_hi = e_lo - first, e_hi + first
    probs = softmax_box(s0, s0 + d_lo, s0 + d_hi, keep)
    forms = score_forms(a @ a.transpose(-1, -2), probs[0], v0)
    assert forms is not None
    return _ScoreCase(e_lo, e_hi, v0, first, (d_lo, d_hi), probs, forms)


def _ball_search(g: torch.Generator, value: Callable[[Tensor, Tensor], Tensor], m: int,
                 r: float, e_lo: Tensor, e_hi: Tensor, step: float) -> list[tuple[Tensor, Tensor]]:
    """Points (δ, e) with ‖δ‖ ≤ r (m-dimensional) and e in [e_lo, e_hi]: 10 random ones,
    and for each entry of ``value(δ, e)`` (1, rows, E) and each sign, 40 projected gradient
    steps of length ``step``·r that push that entry (e at the box corner of its gradient)."""
    points = [(_ball_point(g, torch.Size((m,)), r),
               e_lo + torch.rand(e_lo.shape, generator=g, dtype=F64) * (e_hi - e_lo))
              for _ in range(10)]
    rows, cols = value(points[0][0], points[0][1]).shape[-2:]
    for i in range(rows):
        for d in range(cols):
            for sign in (1.0, -1.0):
                delta = _ball_point(g, torch.Size((m,)), r)
                e = (e_lo + e_hi) / 2
                for _ in range(40):
                    delta.requires_grad_(True)
                    e.requires_grad_(True)
                    step_d, step_e = torch.autograd.grad(sign * value(delta, e)[0, i, d],
                                                         [delta, e])
                    delta = delta.detach() + step * r * step_d / step_d.norm().clamp(
                        min=1e-300)
                    delta = delta * torch.clamp(r / delta.norm().clamp(min=1e-300), max=1.0)
                    e = torch.where(step_e > 0, e_hi, e_lo)
                points.append((delta.detach(), e.detach()))
    return points


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
        e_lo, e_hi, v0, first, (d_lo, d_hi), (p0, p_lo, p_hi), forms = _score_case(
            g, s0, keep, a, r, e_size, E)
        lo, hi = softmax_own_quadratic(p0, p_lo, p_hi, d_lo, d_hi, e_lo, e_hi, v0, forms,
                                       torch.tensor(r, dtype=F64))

        def value(delta: Tensor, e: Tensor, s0: Tensor = s0, p0: Tensor = p0,
                  keep: Tensor = keep, a: Tensor = a, v0: Tensor = v0) -> Tensor:
            ds = (a @ delta.reshape(1, 1, -1, 1)).squeeze(-1) + e
            return _softmax_own(s0, p0, keep, ds) @ v0

        points = _ball_search(g, value, m, r, e_lo, e_hi, step=0.5)
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


def _attention_set(g: torch.Generator, value: Tensor, scale: float, l2: bool
                   ) -> tuple[Box, Callable[[Tensor], Tensor]]:
    """A random input set around ``value`` (1, h, t, e): box half-widths up to ``scale``,
    row balls within them and (with ``l2``) a ball of the whole deviation, smaller than the
    rows' √Σ‖Δx_j‖²; returns the Box and the map of a deviation into the set."""
    half = torch.rand(value.shape, generator=g, dtype=F64) * scale
    rows = half.norm(dim=-1) * (0.3 + 0.7 * torch.rand(value.shape[:-1], generator=g,
                                                        dtype=F64))
    ball = rows.square().sum().sqrt() * float(torch.empty(()).uniform_(0.3, 1.0, generator=g))
    zero = torch.zeros_like(value)
    box = Box(value, value - half, value + half, ball.reshape(1) if l2 else None, rows, zero,
              zero)

    def into(dev: Tensor) -> Tensor:
        dev = _inside(dev, half, rows)
        if l2:
            dev = dev * torch.clamp(ball / dev.norm().clamp(min=1e-300), max=1.0)
        return dev

    return box, into


def _attention_own(q0: Tensor, k0: Tensor, v0: Tensor, dq: Tensor, dk: Tensor, dv: Tensor
                   ) -> Tensor:
    """Attention's own remainder Y(Q, K, V) − Y⁰ − J₀(ΔQ, ΔK, ΔV) (forward-mode AD)."""
    def att(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v

    y0, lin = torch.func.jvp(att, (q0, k0, v0), (dq, dk, dv))
    return att(q0 + dq, k0 + dk, v0 + dv) - y0 - lin


def _tight_sets(kind: str, q0: Tensor, k0: Tensor, v0: Tensor, scale: float
                ) -> tuple[list[Any], list[Callable[[Tensor], Tensor]]]:
    """Input sets at which a part of the attention's row bound is attained (see the test):
    the operands (a Box, or the constant centre) and the maps of deviations into them."""
    h = q0.shape[1]

    def rows_and_ball(x0: Tensor, ball: float | None) -> tuple[Box, Callable]:
        rows = torch.full(x0.shape[:-1], scale, dtype=F64)
        l2 = None if ball is None else torch.full((1,), ball, dtype=F64)

        def into(dev: Tensor) -> Tensor:
            dev = _inside(dev, torch.ones_like(dev), rows)
            if ball is not None:
                dev = dev * torch.clamp(ball / dev.norm().clamp(min=1e-300), max=1.0)
            return dev

        return Box(x0, x0 - 1.0, x0 + 1.0, l2, rows, x0 * 0, x0 * 0), into

    def fixed(dev: Tensor) -> Tensor:
        return dev * 0

    ball = 2**0.5 * scale * h**0.5  # both keys' rows at full deviation in every head
    if kind == "scores":
        q, into_q = rows_and_ball(q0, None)
        k, into_k = rows_and_ball(k0, ball)
        return [q, k, v0], [into_q, into_k, fixed]
    k, into_k = rows_and_ball(k0, None)
    v, into_v = rows_and_ball(v0, ball)
    return [q0, k, v], [fixed, into_k, into_v]


def test_attention_own_row_bound_holds_and_is_reached() -> None:
    """The attention rule's bound of its own remainder's row norms (``Box.own_rows``:
    Cauchy–Schwarz over the keys with ‖ΔK‖_F and ‖ΔV‖_F, ``own_rows``) holds at random
    points of random input sets (boxes, row balls, and in half the cases a ball of the
    whole deviation) and at points pushed by gradient ascent on the row norms. Two kinds
    of sets with two keys and small deviations make one part exact, and the bound is
    reached to within 5% there (so 0.95 of either part fails): the scores' term
    c‖ΔQ_i‖·‖a_i‖₂·‖ΔK‖_F with constant values and Q, K centred at 0 (no first-order
    score change: the softmax's own term is fourth order) at ΔQ_i = ‖ΔQ_i‖u,
    ΔK₁ = −ΔK₂ along u; and ΔP's term ‖ΔP_i‖₂·‖ΔV‖_F with constant queries and V centred
    at 0 at the score box's corner ΔK₁ = −ΔK₂ = ±(box) and ΔV₁ = −ΔV₂."""
    g = torch.Generator().manual_seed(11)
    node = type("Node", (), {"name": "attention", "target": None})()
    reached: dict[str, list[float]] = {"scores": [], "probs": []}
    for case in range(200):
        kind = {0: "scores", 2: "probs"}.get(case % 4)
        h, t = 2, int(torch.randint(2, 6, (), generator=g))
        s = 2 if kind else int(torch.randint(2, 7, (), generator=g))
        e, ev = (int(torch.randint(2, 7, (), generator=g)) for _ in range(2))
        scale = 1e-5 if kind else float(10 ** torch.empty(()).uniform_(-4, -0.5, generator=g))
        q0 = torch.randn(1, h, t, e, generator=g, dtype=F64)
        k0 = torch.randn(1, h, s, e, generator=g, dtype=F64)
        v0 = torch.randn(1, h, s, ev, generator=g, dtype=F64)
        if kind == "scores":
            q0, k0 = q0 * 0, k0 * 0
        if kind == "probs":
            v0 = v0 * 0
        if kind:
            ops, intos = _tight_sets(kind, q0, k0, v0, scale)
        else:
            sets = [_attention_set(g, x, scale, l2) for x, l2 in
                    ((q0, False), (k0, case % 2 == 0), (v0, case % 2 == 1))]
            ops, intos = [b for b, _ in sets], [into for _, into in sets]
        out = sdpa_forward(FwdCtx(node=node), *ops)
        assert out.own_rows is not None
        centres = (q0, k0, v0)
        points = []
        for _ in range(4):
            devs = [into(torch.randn(x.shape, generator=g, dtype=F64) * scale)
                    for x, into in zip(centres, intos, strict=True)]
            for _ in range(15):
                devs = [x.detach().requires_grad_(True) for x in devs]
                rows = _attention_own(*centres, *devs).norm(dim=-1).sum()
                steps = torch.autograd.grad(rows, devs, allow_unused=True)
                devs = [into(x.detach() + (0 if st is None else 0.3 * scale * st
                                           / st.norm().clamp(min=1e-300)))
                        for x, st, into in zip(devs, steps, intos, strict=True)]
            points.append(devs)
        if kind:
            u = torch.randn(e, generator=g, dtype=F64)
            u = u / u.norm()
            if kind == "scores":
                dk = torch.stack([u, -u]).expand(1, h, 2, e) * scale
                points.append([u.expand_as(q0) * scale, dk, v0 * 0])
            else:
                corner = torch.sign(q0[..., :1, :]).expand(1, h, 1, e) * scale / e**0.5
                w = torch.randn(ev, generator=g, dtype=F64)
                dv = torch.stack([w, -w]).expand(1, h, 2, ev)
                for sign in (1.0, -1.0):
                    points.append([q0 * 0, torch.cat([corner, -corner], 2) * sign,
                                   intos[2](dv * scale)])
        best = torch.zeros_like(out.own_rows)
        for devs in points:
            norms = _attention_own(*centres, *(x.detach() for x in devs)).norm(dim=-1)
            assert bool((norms <= out.own_rows * (1 + 1e-9) + 1e-15).all()), "row bound"
            best = torch.maximum(best, norms)
        if kind:
            reached[kind].append(float((best / out.own_rows).max()))
    assert max(reached["scores"]) >= 0.95 and max(reached["probs"]) >= 0.95, reached


RowBound = Callable[..., Tensor]


def _third_order_reach(seed: int, bound_of: RowBound, value_of: RowBound) -> list[float]:
    """For 200 random cases of score rows Δ = Aδ + e (random Jacobians A of a
    40-dimensional input, ‖δ‖ ≤ 1, e in a random box; some rows masked causally) large
    enough for the third order to matter: asserts |value| ≤ bound at random points and at
    points pushed up or down by projected gradient steps, and returns the largest share
    of the bound reached per case. ``bound_of(row, p0, w, forms, radius, c_bar)``;
    ``value_of(s0, p0, keep, ds, v0, w)``, both per query row and value column."""
    g = torch.Generator().manual_seed(seed)
    reached = []
    for case in range(200):
        s0, _, keep = _score_rows(g, case, 2, (0.1, 3.0), (0, 0))
        rows, S, m, E = s0.shape[1], s0.shape[-1], 40, 3
        a = torch.randn(1, rows, S, m, generator=g, dtype=F64)
        a = a / a.norm(dim=-1).amax() * float(10 ** torch.empty(()).uniform_(-1, 0.5,
                                                                           generator=g))
        r = 1.0
        e_size = 0.0 if case % 2 else float(10 ** torch.empty(()).uniform_(-3, -0.5,
                                                                          generator=g))
        e_lo, e_hi, v0, _, (d_lo, d_hi), (p0, p_lo, p_hi), forms = _score_case(
            g, s0, keep, a, r, e_size, E)
        radius = torch.tensor(r, dtype=F64)
        row = _score_row(p0, p_lo, p_hi, d_lo, d_hi, e_lo, e_hi, forms, radius)
        c_bar = p0 @ v0
        w = v0.unsqueeze(-3) - c_bar.unsqueeze(-2)
        bound = bound_of(row, p0, w, forms, radius, c_bar)

        def value(delta: Tensor, e: Tensor, s0: Tensor = s0, p0: Tensor = p0,
                  keep: Tensor = keep, a: Tensor = a, v0: Tensor = v0, w: Tensor = w
                  ) -> Tensor:
            ds = torch.where(keep, (a @ delta.reshape(1, 1, -1, 1)).squeeze(-1) + e, 0.0)
            return value_of(s0, p0, keep, ds, v0, w)

        points = _ball_search(g, value, m, r, e_lo, e_hi, step=0.2)
        best = torch.zeros_like(bound)
        for delta, e in points:
            y = value(delta, e).abs()
            assert bool((y <= bound + 1e-15 * (1 + v0.abs().amax())).all()), f"case {case}"
            best = torch.maximum(best, y)
        reached.append(float((best / bound)[bound > 1e-30].max()))
    return reached


def _second_order_at_centre(p0: Tensor, ds: Tensor, w: Tensor) -> Tensor:
    """T₁ = Σ_j p⁰_j w_j (Δ_j − ⟨p⁰, Δ⟩)² per value column."""
    x = ds - (p0 * ds).sum(-1, keepdim=True)
    return torch.einsum("...s,...se->...e", p0 * x * x, w)


def test_softmax_cubic_term_holds_and_is_reached() -> None:
    """``softmax_cubic``: R·c − ½T₁ (R softmax's own remainder, c a value column, T₁ the
    exact second order at the centre) stays within the bound (``_third_order_reach``).
    The searched points reach 0.06 of it in the median case and 0.74 at best, so a bound
    0.7 of its size fails."""
    def value(s0: Tensor, p0: Tensor, keep: Tensor, ds: Tensor, v0: Tensor, w: Tensor
              ) -> Tensor:
        return _softmax_own(s0, p0, keep, ds) @ v0 - _second_order_at_centre(p0, ds, w) / 2

    reached = torch.tensor(_third_order_reach(
        12, lambda row, p0, w, forms, r, c_bar: softmax_cubic(row, p0, w, c_bar, forms, r),
        value))
    assert float(reached.median()) >= 0.04 and float(reached.max()) >= 0.7, reached


def test_expansion_rest_holds_and_is_reached() -> None:
    """``_expansion_rest``: φ″ − T₁ at the reached point itself (the end of the segment,
    φ″ = Σ_j p_j(c_j − ⟨p, c⟩)(Δ_j − ⟨p, Δ⟩)² with p = softmax(s₀ + Δ)) stays within the
    bound (``_third_order_reach``). The searched points reach 0.07 of it in the median case
    and 0.49 at best, so a bound 0.45 of its size fails."""
    def value(s0: Tensor, p0: Tensor, keep: Tensor, ds: Tensor, v0: Tensor, w: Tensor
              ) -> Tensor:
        p = torch.softmax((s0 + ds).masked_fill(~keep, -math.inf), -1)
        x = ds - (p * ds).sum(-1, keepdim=True)
        c = v0.unsqueeze(-3) - (p @ v0).unsqueeze(-2)
        return (torch.einsum("...s,...se->...e", p * x * x, c)
                - _second_order_at_centre(p0, ds, w))

    reached = torch.tensor(_third_order_reach(
        14, lambda row, p0, w, forms, r, c_bar: _expansion_rest(
            row, w, p0.unsqueeze(-1) * w, c_bar, forms, r), value))
    assert float(reached.median()) >= 0.05 and float(reached.max()) >= 0.45, reached


def test_softmax_own_norm_holds_and_is_reached() -> None:
    """``softmax_own_norm``: the row norm ‖R_i‖₂ of softmax's own remainder for score rows
    Δ = Aδ + e stays below the bound at random and projected gradient points over 200
    random cases where the higher orders matter too (``_third_order_reach``). On two-key
    rows with p⁰ ≈ (0.98, 0.02) at a small radius, ‖R‖ = (√2/2)·p(1 − p)|1 − 2p|·d² against
    the bound ½V(1 + ‖p‖) = ½p(1 − p)(1 + ‖p‖)·d² (d = Δ₁ − Δ₂), 0.69 of it, which δ along
    a₁ − a₂ reaches: it is reached to 0.65 in every such case (so 0.65 of it fails)."""

    def norm(s0: Tensor, p0: Tensor, keep: Tensor, ds: Tensor, v0: Tensor, w: Tensor
             ) -> Tensor:
        return _softmax_own(s0, p0, keep, ds).norm(dim=-1, keepdim=True)

    _third_order_reach(
        23, lambda row, p0, w, forms, r, c_bar: softmax_own_norm(row, p0, forms, r), norm)
    g = torch.Generator().manual_seed(29)
    for _ in range(20):
        gap = float(torch.empty(()).uniform_(3.5, 4.5, generator=g))
        s0 = torch.tensor([[[0.0, -gap]]], dtype=F64)
        keep = torch.ones(1, 2, dtype=torch.bool)
        a = torch.randn(1, 1, 2, 8, generator=g, dtype=F64)
        r = 1e-4
        e_lo, e_hi, _, _, (d_lo, d_hi), (p0, p_lo, p_hi), forms = _score_case(
            g, s0, keep, a, r, 0.0, 2)
        radius = torch.tensor(r, dtype=F64)
        row = _score_row(p0, p_lo, p_hi, d_lo, d_hi, e_lo, e_hi, forms, radius)
        bound = softmax_own_norm(row, p0, forms, radius)
        d = a[0, 0, 0] - a[0, 0, 1]
        delta = r * d / d.norm()
        ds = (a @ delta.reshape(1, 1, -1, 1)).squeeze(-1)
        value = _softmax_own(s0, p0, keep, ds).norm(dim=-1, keepdim=True)
        assert bool((value <= bound).all())
        assert float(value.min() / bound.max()) >= 0.65, float(value.min() / bound.max())


def test_score_forms_match_their_definitions() -> None:
    """``score_forms`` on random score rows (some masked causally): ‖B‖₂ and
    ‖√p⁰ ⊙ B‖₂ (B = CA, C = I − 1p⁰ᵀ), ‖BᵀW_d‖ per value column, ‖b_j‖ per key and λ^±
    (λ_max(BᵀW^±B)) are each at least the exact value (singular values and eigenvalues
    of the explicit matrices) and within 1e-6 of it relative to ‖A‖²; a bound from
    G = AAᵀ in place of K = CGCᵀ fails here."""
    g = torch.Generator().manual_seed(13)
    for case in range(200):
        s0, _, keep = _score_rows(g, case, 3, (0.1, 3.0), (0, 0))
        rows, S, m, E = s0.shape[1], s0.shape[-1], 12, 4
        a = torch.randn(1, rows, S, m, generator=g, dtype=F64) * float(
            10 ** torch.empty(()).uniform_(-2, 2, generator=g))
        p0 = torch.softmax(s0.masked_fill(~keep, -math.inf), -1)
        v0 = torch.randn(1, S, E, generator=g, dtype=F64)
        forms = score_forms(a @ a.transpose(-1, -2), p0, v0)
        assert forms is not None
        centre = torch.eye(S, dtype=F64) - p0.unsqueeze(-1).transpose(-1, -2)  # (1, L, S, S)
        b = centre @ a
        weights = p0.unsqueeze(-1) * (v0.unsqueeze(-3) - (p0 @ v0).unsqueeze(-2))
        scale = float(a.square().sum(-1).amax()) + 1e-300
        exact = {
            "b_top": torch.linalg.matrix_norm(b, ord=2).unsqueeze(-1),
            "pb_top": torch.linalg.matrix_norm(p0.sqrt().unsqueeze(-1) * b, ord=2).unsqueeze(-1),
            "bw_norm": (b.transpose(-1, -2) @ weights).norm(dim=-2),
            "b_norm": b.norm(dim=-1),
        }
        for name, value in exact.items():
            got = getattr(forms, name)
            assert bool((got >= value).all()), (case, name)
            assert bool((got.square() - value.square() <= 1e-6 * scale).all()), (case, name)
        for sign, name in ((1.0, "lam_pos"), (-1.0, "lam_neg")):
            wd = (sign * weights).clamp(min=0).movedim(-1, -3)  # (1, E, L, S)
            form = b.transpose(-1, -2).unsqueeze(1) @ (wd.unsqueeze(-1) * b.unsqueeze(1))
            top = torch.linalg.eigvalsh(form)[..., -1].movedim(1, -1)  # (1, L, E)
            got = getattr(forms, name)
            assert bool((got >= top).all()), (case, name)
            assert bool((got - top <= 1e-6 * scale).all()), (case, name)


def _reads(g: torch.Generator, kind: str, rows: int, units: int) -> Tensor:
    """(units, 1, rows) bool: which input units each row's Jacobian reads. ``patches``:
    row t reads unit t; ``overlapping``: random subsets (at least one unit each);
    ``mixed``: every unit."""
    if kind == "patches":
        return torch.eye(units, rows, dtype=torch.bool).unsqueeze(1)
    if kind == "mixed":
        return torch.ones(units, 1, rows, dtype=torch.bool)
    reads = torch.rand(units, 1, rows, generator=g) < 0.4
    reads[torch.randint(0, units, (rows,), generator=g), 0, torch.arange(rows)] = True
    return reads


def _rows_reading(g: torch.Generator, reads: Tensor, width: int, cols: int) -> Tensor:
    """Random row Jacobians (1, rows, cols, units·width) that are 0 outside the units
    each row reads."""
    units, _, rows = reads.shape
    a = torch.randn(1, rows, cols, units, width, generator=g, dtype=F64)
    a = a * reads[:, 0].T.reshape(1, rows, 1, units, 1)
    return a.reshape(1, rows, cols, units * width)


def _reading_box(a: Tensor, half: Tensor, r: float) -> Box:
    """Rows x₀ + Aδ + e at x₀ = 0 (A: (1, rows, cols, m), ‖δ‖ ≤ r, |e| ≤ ``half``) as a
    Box with the rows' first-order parts r‖A_row‖₂ (``lin_rows``)."""
    value = torch.zeros(half.shape, dtype=F64)
    lin = r * torch.linalg.matrix_norm(a, ord=2).unsqueeze(1) * (1 + 1e-12)
    return Box(value, value - 1, value + 1, None, None, -half, half, lin_rows=lin)


def test_split_scores_bound_holds_and_is_reached() -> None:
    """``split_scores``: Σ_j a_ij‖ΔQ_i‖·‖ΔK_j‖ with ΔQ_i = A_iδ + e_i, ΔK_j = B_jδ + f_j
    (‖δ‖ ≤ r; A_i, B_j reading random sets of input units: one patch per row as in a ViT's
    first block, overlapping subsets, or every unit; e, f in random boxes in half of 200
    cases) stays below the bound at random points and at points of projected gradient
    ascent from several starts. Where each row reads its own patch, B_i is a multiple of
    A_i and e = f = 0, the bound is the exact maximum, and the search reaches 0.9998 of it
    in the median case (so 0.99 of the bound fails, as does the bound with its β over
    every key instead of those reading outside U_i, 0.85). ``key_overlap`` on those units:
    U_i ∩ V_j ≠ ∅, V_j ⊄ U_i and the most keys reading one unit outside U_i, against brute
    force."""
    g = torch.Generator().manual_seed(17)
    reached = []
    for case in range(200):
        kind = ("tight", "patches", "overlapping", "mixed")[case % 4]
        rows = int(torch.randint(2, 6, (), generator=g))
        units = rows if kind in ("tight", "patches") else int(torch.randint(
            2, 6, (), generator=g))
        width, cols, r = 3, int(torch.randint(2, 5, (), generator=g)), 0.5
        reads_q, reads_k = (_reads(g, "patches" if kind == "tight" else kind, rows, units)
                            for _ in range(2))
        aq = _rows_reading(g, reads_q, width, cols)
        ak = _rows_reading(g, reads_k, width, cols)
        if kind == "tight":
            ak = aq * torch.rand(1, rows, 1, 1, generator=g, dtype=F64)
        e_size = 0.0 if case // 4 % 2 else float(torch.rand((), generator=g)) * 0.3
        boxes = [(torch.rand(1, 1, rows, cols, generator=g, dtype=F64) * e_size)
                 for _ in range(2)]
        overlap = key_overlap(reads_q, reads_k)
        for i in range(rows):
            u_i = set(torch.nonzero(reads_q[:, 0, i]).flatten().tolist())
            for j in range(rows):
                v_j = set(torch.nonzero(reads_k[:, 0, j]).flatten().tolist())
                assert bool(overlap.near[0, i, j]) == bool(u_i & v_j)
                assert bool(overlap.outside[0, i, j]) == bool(v_j - u_i)
            counts = [int(reads_k[u, 0].sum()) for u in range(units) if u not in u_i]
            assert float(overlap.most[0, i]) == max(counts, default=0)

        q, k = _reading_box(aq, boxes[0], r), _reading_box(ak, boxes[1], r)
        a = torch.rand(1, 1, rows, rows, generator=g, dtype=F64)
        k_frob = (r * math.sqrt(float(torch.einsum(
            "u...t,...t->u...", reads_k.to(F64),
            torch.linalg.matrix_norm(ak, ord=2).square()).amax()))
            + float(boxes[1].norm())) * torch.ones(1, 1, 1, dtype=F64) * (1 + 1e-12)
        bound = split_scores(1.0, q, k, a, k_frob, overlap)[0, 0]

        def value(delta: Tensor, e: Tensor, f: Tensor, aq: Tensor = aq, ak: Tensor = ak,
                  a: Tensor = a) -> Tensor:
            dq = ((aq @ delta)[0] + e[0, 0]).norm(dim=-1)
            dk = ((ak @ delta)[0] + f[0, 0]).norm(dim=-1)
            return (a[0, 0] * dk).sum(-1) * dq

        best = torch.zeros(rows, dtype=F64)
        for i in range(rows):
            for start in range(4):
                delta = _ball_point(g, torch.Size((units * width,)), r)
                e, f = [(2 * torch.rand(b.shape, generator=g, dtype=F64) - 1) * b
                        for b in boxes]
                for _ in range(60 if start else 0):
                    delta.requires_grad_(True)
                    e.requires_grad_(True)
                    f.requires_grad_(True)
                    steps = torch.autograd.grad(value(delta, e, f)[i], [delta, e, f])
                    delta = delta.detach() + 0.1 * r * steps[0] / steps[0].norm().clamp(
                        min=1e-300)
                    delta = delta * torch.clamp(r / delta.norm(), max=1.0)
                    e, f = [torch.where(st > 0, b, -b) for st, b in zip(steps[1:], boxes,
                                                                         strict=True)]
                y = value(delta.detach(), e.detach(), f.detach())
                assert bool((y <= bound * (1 + 1e-9)).all()), f"case {case}"
                best = torch.maximum(best, y)
        if kind == "tight" and e_size == 0:
            reached.append(float((best / bound).median()))
    assert sorted(reached)[len(reached) // 2] >= 0.99, sorted(reached)


class _Rows(NamedTuple):
    """One operand of an attention case: rows x₀ + A·δ + e (A: (1, 1, T, E, m), reading
    the input units ``units`` (units, 1, T)), |e| ≤ ``half``, as a Box for radius r."""

    x0: Tensor
    a: Tensor
    half: Tensor
    units: Tensor

    def box(self, r: float) -> Box:
        norms = self.a.norm(dim=-1)
        rows = r * torch.linalg.matrix_norm(self.a, ord=2) * (1 + 1e-12)
        e_rows = self.half.norm(dim=-1)
        dev = r * norms + self.half
        return Box(self.x0, self.x0 - dev, self.x0 + dev, None, rows + e_rows, -self.half,
                   self.half, lin_rows=rows)

    def at(self, delta: Tensor, e: Tensor) -> Tensor:
        return self.x0 + (self.a @ delta).squeeze(-1) + e


def _operand(g: torch.Generator, units: Tensor, width: int, cols: int, e_size: float
             ) -> _Rows:
    """Random rows reading ``units`` (units, 1, T) with random remainder bounds."""
    rows = units.shape[-1]
    a = _rows_reading(g, units, width, cols).unsqueeze(1)
    x0 = torch.randn(1, 1, rows, cols, generator=g, dtype=F64)
    half = torch.rand(1, 1, rows, cols, generator=g, dtype=F64) * e_size
    return _Rows(x0, a, half, units)


def _probs_case(g: torch.Generator, kind: str) -> tuple[list[_Rows], float]:
    """Q, K, V rows and a radius for ``test_split_probs_bound_holds_and_is_reached``. In
    ``query`` the keys are fixed, one query reads its own unit, and both values move along
    one direction from their own units, so |ΔQ·u_j| and ‖ΔV_j‖ reach their bounds at once;
    in ``key`` only key 0 and value 0 move, from one unit, and value 0's Jacobian reads
    the direction in which Q₀·ΔK₀ grows; ``cross`` is ``key`` with value 1 moving instead,
    from the unit of key 1; all at a small radius and without remainders."""
    width, e, ev = 3, 3, 2
    if kind in ("query", "key", "cross"):
        keys = 2 if kind == "query" else 3
        units_q = torch.tensor([[[True]], [[False]], [[False]], [[False]]])
        units_k = torch.zeros(4, 1, keys, dtype=torch.bool)
        units_k[torch.arange(1, keys + 1).clamp(max=3), 0, torch.arange(keys)] = True
        q = _operand(g, units_q, width, e, 0.0)
        k = _operand(g, units_k, width, e, 0.0)
        v = _operand(g, units_k, width, ev, 0.0)
        out = torch.randn(ev, generator=g, dtype=F64)
        if kind == "query":
            k = k._replace(a=k.a * 0)
            right = torch.randn(keys, 4 * width, generator=g, dtype=F64) * v.a[0, 0, :, 0].ne(
                0).to(F64)
            v = v._replace(a=(out[:, None] * right[:, None, :]).reshape(v.a.shape))
        else:
            q = q._replace(a=q.a * 0)
            key_dir = torch.einsum("e,sem->sm", q.x0[0, 0, 0], k.a[0, 0])  # B_jᵀQ₀
            v_a = out[None, :, None] * key_dir[:, None, :]
            keep = torch.tensor([1.0] + [0.0] * (keys - 1), dtype=F64)
            k = k._replace(a=k.a * keep.reshape(1, 1, keys, 1, 1))
            if kind == "cross":
                keep = keep.roll(1)
                v_a = v.a[0, 0]
            v = v._replace(a=(v_a * keep.reshape(keys, 1, 1)).reshape(v.a.shape))
        return [q, k, v], 1e-4
    rows = int(torch.randint(2, 5, (), generator=g))
    units = rows if kind == "patches" else int(torch.randint(2, 6, (), generator=g))
    reading = [_reads(g, kind, rows, units) for _ in range(3)]
    if kind == "patches":
        reading = [reading[0]] * 3
    e_size = float(torch.rand((), generator=g)) * 0.05 * float(torch.rand(()) < 0.5)
    ops = [_operand(g, u, width, cols, e_size) for u, cols in zip(reading, (e, e, ev),
                                                                  strict=True)]
    return ops, float(10 ** torch.empty(()).uniform_(-2.5, -0.5, generator=g))


def _probs_times_values(ops: list[_Rows], delta: Tensor, es: list[Tensor]) -> Tensor:
    """‖(ΔP·ΔV)_i‖ per query row at the point δ with remainders ``es``."""
    q, k, v = (op.at(delta, e) for op, e in zip(ops, es, strict=True))
    c = q.shape[-1] ** -0.5
    p = torch.softmax(c * q @ k.transpose(-1, -2), -1)
    p0 = torch.softmax(c * ops[0].x0 @ ops[1].x0.transpose(-1, -2), -1)
    return ((p - p0) @ (v - ops[2].x0)).norm(dim=-1)[0, 0]


def test_split_probs_bound_holds_and_is_reached() -> None:
    """``split_probs``: ‖(ΔP·ΔV)_i‖ for Q, K, V rows that are linear in δ (‖δ‖ ≤ r) plus
    remainders in boxes, reading one patch per row, overlapping subsets or every input
    unit, stays below the bound at random points and at projected gradient ascent points
    (120 random cases); the attention rule's own-row bound with the walk's units and Gram
    matrices (``sdpa_forward``) holds the true own remainder's rows there too. In three
    kinds of cases one part is exact to second order (see ``_probs_case``) and the search
    reaches 0.99 of the bound in the median case (40 each), so 0.99 of it fails."""
    g = torch.Generator().manual_seed(19)
    node_q, node_k, node_v = (type("Node", (), {"name": n})() for n in "qkv")
    node = type("Node", (), {"name": "attention", "target": None,
                             "args": (node_q, node_k, node_v)})()
    reached: dict[str, list[float]] = {"query": [], "key": [], "cross": []}
    for case in range(240):
        kind = ("query", "key", "cross", "patches", "overlapping", "mixed")[case % 6]
        ops, r = _probs_case(g, kind)
        boxes = [op.box(r) for op in ops]
        ctx = FwdCtx(node=node, radius=torch.tensor([r], dtype=F64),
                     units={n: op.units for n, op in zip("qkv", ops, strict=True)},
                     row_grams={n: op.a @ op.a.transpose(-1, -2)
                                for n, op in zip("qkv", ops, strict=True)})
        parts = attention_parts(boxes[0], boxes[1], None, False, None, ctx, "attention")
        assert parts.soft_own is not None
        seen = reads(*(op.units for op in ops), ctx.row_grams["q"], ctx.row_grams["k"])
        v_frob = frobenius(boxes[2], torch.Size((1, 1))).unsqueeze(-1)
        radius = torch.tensor(r, dtype=F64).reshape(1, 1, 1)
        soft_rows = torch.maximum(*(t.abs() for t in parts.soft_own)).norm(dim=-1) * (
            1 + 1e-12)
        bound = split_probs(parts.c, parts.p0, soft_rows, *boxes, v_frob, radius, seen)[0, 0]
        out = sdpa_forward(ctx, *boxes)
        assert out.own_rows is not None
        m = ops[0].a.shape[-1]
        best = torch.zeros_like(bound)
        for i in range(bound.shape[0]):
            for start in range(3):
                delta = _ball_point(g, torch.Size((m, 1)), r)
                es = [(2 * torch.rand(op.half.shape, generator=g, dtype=F64) - 1) * op.half
                      for op in ops]
                for _ in range(50 if start else 0):
                    delta.requires_grad_(True)
                    for e in es:
                        e.requires_grad_(True)
                    steps = torch.autograd.grad(_probs_times_values(ops, delta, es)[i],
                                                [delta, *es])
                    delta = delta.detach() + 0.1 * r * steps[0] / steps[0].norm().clamp(
                        min=1e-300)
                    delta = delta * torch.clamp(r / delta.norm(), max=1.0)
                    es = [torch.where(st > 0, op.half, -op.half)
                          for st, op in zip(steps[1:], ops, strict=True)]
                y = _probs_times_values(ops, delta.detach(), [e.detach() for e in es])
                assert bool((y <= bound * (1 + 1e-9) + 1e-300).all()), f"case {case}"
                best = torch.maximum(best, y)
                rows_at = _attention_own(*(op.x0 for op in ops), *(
                    op.at(delta.detach(), e.detach()) - op.x0 for op, e in zip(
                        ops, es, strict=True))).norm(dim=-1)
                assert bool((rows_at <= out.own_rows * (1 + 1e-9) + 1e-300).all()), \
                    f"case {case}: own rows"
        if kind in reached:
            reached[kind].append(float((best / bound).min()))
    for kind, shares in reached.items():
        assert sorted(shares)[len(shares) // 2] >= 0.99, (kind, sorted(shares))
