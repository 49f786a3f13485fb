"""lipcert's own operators (``lipcert.models.ops``): token_ball and group_sort2.

token_ball y = x·min(1, ρ/‖x‖) per row (last dimension). Inside the ball (‖x‖ < ρ) the
Jacobian is I; outside it is (ρ/‖x‖)(I − x̂x̂ᵀ), x̂ = x/‖x‖ (symmetric), so
G_x = (ρ/‖x‖)(G − x̂⟨x̂, G⟩); a row whose norm interval [n_lo, n_hi] meets ρ gets the hull
of both (Clarke). In the outer branch ‖x‖ ≥ n* = max(n_lo, ρ), so ρ/‖x‖ ∈ [ρ/n_hi, ρ/n*],
and x̂ − x̂₀ = Δx/‖x‖ + x̂₀(‖x₀‖ − ‖x‖)/‖x‖ gives |x̂_i − x̂₀_i| ≤ (ρ_i + |x̂₀_i|·D)/n*
(|Δx_i| ≤ ρ_i, D = ‖ρ‖ ≥ ‖Δx‖ ≥ |‖x‖ − ‖x₀‖|), intersected with [−1, 1]. Row norms:
[‖x₀‖ − D, ‖x₀‖ + D] ∩ the box's [√Σ dist(0, [x_i])², √Σ max(lo_i², hi_i²)].

group_sort2 maps each pair (a, b) to (min, max): with t = 1[a < b],
G_a = G_max + t·(G_min − G_max) and G_b = G_min − t·(G_min − G_max); t ∈ [0, 1] (Clarke)
when the interval of a − b (the box's, intersected with a₀ − b₀ ± (ρ_a + ρ_b)) contains 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

import lipcert.models.ops  # noqa: F401  (registers the torch.ops.lipcert operators)
from lipcert.bounds.backward.interval import TINY, Box, Grad, dot_last, mid_rad, mul, row_norm
from lipcert.bounds.backward.registry import BackCtx, FwdCtx, backward_rule, forward_rule
from lipcert.bounds.state import F64, gamma

U = 2.0**-53


def hull(a: Grad, b: Grad) -> Grad:
    """The smallest centre–radius enclosure containing both."""
    lo = torch.minimum(a.c - a.r, b.c - b.r)
    hi = torch.maximum(a.c + a.r, b.c + b.r)
    c, r = mid_rad(lo, hi)
    return Grad(c, r + TINY)


def row_norm_range(x: Box) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(‖x₀‖, D, n_lo, n_hi) per row (shapes (..., 1)): the centre row norm, the bound D of
    ‖Δx‖ and the row-norm interval over the input set (module docstring)."""
    k = x.shape[-1]
    dev = x.deviation()
    n0 = torch.linalg.vector_norm(x.value, dim=-1, keepdim=True)
    big_d = torch.minimum(torch.linalg.vector_norm(dev, dim=-1, keepdim=True)
                          * (1 + gamma(k + 2)), x.row_dev().unsqueeze(-1))
    dist = torch.where(x.lo > 0, x.lo, torch.where(x.hi < 0, -x.hi, torch.zeros_like(x.lo)))
    box_lo = (dist.square().sum(-1, keepdim=True) * (1 - gamma(k + 2))).sqrt()
    box_hi = (torch.maximum(x.lo.square(), x.hi.square()).sum(-1, keepdim=True)
              * (1 + gamma(k + 2))).sqrt()
    n_lo = torch.maximum((n0 * (1 - gamma(k + 2)) - big_d).clamp(min=0), box_lo)
    n_hi = torch.minimum(n0 * (1 + gamma(k + 2)) + big_d, box_hi)
    return n0, big_d, n_lo, n_hi


@backward_rule(torch.ops.lipcert.token_ball)
def token_ball(ctx: BackCtx, g: Grad, x: Box, radius: float) -> tuple[Grad | None, None]:
    """Projection of every row onto the ball of radius ρ: see the module docstring."""
    rho = float(radius)
    n0, big_d, n_lo, n_hi = row_norm_range(x)
    inside = n_hi < rho
    if bool(inside.all()):
        return (g, None)
    n_star = torch.clamp(n_lo, min=rho)
    z0 = x.value / n0.clamp(min=1e-300)
    k = x.shape[-1]
    z_rad = ((x.deviation() + z0.abs() * big_d) / n_star * (1 + 4 * U)
             + gamma(k + 4) * z0.abs() + TINY)
    z_lo = torch.maximum(z0 - z_rad, torch.full((), -1.0, dtype=F64))
    z_hi = torch.minimum(z0 + z_rad, torch.full((), 1.0, dtype=F64))
    zc, zr = mid_rad(z_lo, z_hi)
    fc, fr = mid_rad(rho / n_hi * (1 - 2 * U), rho / n_star * (1 + 2 * U))
    t = dot_last(g, zc, zr)
    tz = mul(t, zc, zr)
    diff_c = g.c - tz.c
    diff = Grad(diff_c, g.r + tz.r + gamma(2) * (diff_c.abs() + g.r + tz.r))
    proj = mul(diff, fc, fr)
    outside = n_lo > rho
    both = hull(g, proj)
    c = torch.where(inside, g.c, torch.where(outside, proj.c, both.c))
    r = torch.where(inside, g.r, torch.where(outside, proj.r, both.r))
    return (Grad(c, r), None)


@backward_rule(torch.ops.lipcert.group_sort2)
def group_sort2(ctx: BackCtx, g: Grad, x: Box) -> tuple[Grad]:
    """Sorting each adjacent pair: see the module docstring."""
    lo, hi = x.lo.unflatten(-1, (-1, 2)), x.hi.unflatten(-1, (-1, 2))
    v, dev = x.value.unflatten(-1, (-1, 2)), x.deviation().unflatten(-1, (-1, 2))
    d0 = v[..., 0] - v[..., 1]
    spread = (dev[..., 0] + dev[..., 1]) * (1 + 4 * U) + 4 * U * d0.abs()
    d_lo = torch.maximum(lo[..., 0] - hi[..., 1], d0 - spread)
    d_hi = torch.minimum(hi[..., 0] - lo[..., 1], d0 + spread)
    t_lo = (d_hi < 0).to(F64)
    t_hi = 1.0 - (d_lo > 0).to(F64)
    tc, tr = mid_rad(t_lo, t_hi)
    gc, gr = g.c.unflatten(-1, (-1, 2)), g.r.unflatten(-1, (-1, 2))
    g_min, g_max = Grad(gc[..., 0], gr[..., 0]), Grad(gc[..., 1], gr[..., 1])
    dc = g_min.c - g_max.c
    delta = Grad(dc, g_min.r + g_max.r + gamma(2) * dc.abs())
    move = mul(delta, tc, tr)
    ga_c, gb_c = g_max.c + move.c, g_min.c - move.c
    ga_r = g_max.r + move.r + gamma(2) * (ga_c.abs() + g_max.r + move.r)
    gb_r = g_min.r + move.r + gamma(2) * (gb_c.abs() + g_min.r + move.r)
    c = torch.stack([ga_c, gb_c], dim=-1).flatten(-2)
    r = torch.stack([ga_r, gb_r], dim=-1).flatten(-2)
    return (Grad(c, r),)


# --------------------------------------------------------------------------- forward


@forward_rule(torch.ops.lipcert.token_ball)
def token_ball_forward(ctx: FwdCtx, x: Box, radius: float) -> Box:
    """Each y_i = t·x_i with t ∈ (0, 1] (so y_i ∈ [min(lo_i, 0), max(hi_i, 0)] ∩ [−ρ, ρ]);
    where the row may leave the ball, y_i = (ρ/‖x‖)·x_i with ρ/‖x‖ ∈ [ρ/n_hi, ρ/n*] gives the
    interval product. Around the centre, the Jacobian (I inside; (ρ/‖x‖)(I − x̂x̂ᵀ), of norm
    ≤ 1, outside) moves y_i by at most ρ_i + |x̂_i|·D (D ≥ ‖Δx‖, |x̂_i| ≤ 1 or its
    enclosure), only ρ_i for rows that stay inside. Non-expansive per row: l2 carries over."""
    rho = float(radius)
    n0, big_d, n_lo, n_hi = row_norm_range(x)
    value = x.value * torch.clamp(rho / n0.clamp(min=1e-30), max=1.0)
    lo = torch.minimum(x.lo, torch.zeros(())).clamp(min=-rho)
    hi = torch.maximum(x.hi, torch.zeros(())).clamp(max=rho)
    inside = n_hi < rho
    n_star = torch.clamp(n_lo, min=rho)
    f_lo, f_hi = rho / n_hi * (1 - 2 * U), rho / n_star * (1 + 2 * U)
    cands = torch.stack([x.lo * f_lo, x.lo * f_hi, x.hi * f_lo, x.hi * f_hi])
    lo = torch.where(n_lo > rho, torch.maximum(lo, cands.amin(0)), lo)
    hi = torch.where(n_lo > rho, torch.minimum(hi, cands.amax(0)), hi)
    z0 = (x.value / n0.clamp(min=1e-300)).abs()
    z0 = z0 * (1 + gamma(x.shape[-1] + 4))
    z_max = torch.clamp(z0 + (x.deviation() + z0 * big_d) / n_star * (1 + 4 * U), max=1.0)
    dev = x.deviation() + torch.where(inside, 0.0, z_max * big_d)
    lo = torch.maximum(lo, value - dev)
    hi = torch.minimum(hi, value + dev)
    pad = 4 * gamma(x.shape[-1] + 2) * (value.abs() + dev) + TINY
    e_lo = e_hi = own_lo = own_hi = own_rows = None
    if x.has_e:
        (e_lo, e_hi), own = _ball_remainder(x, rho, n0, big_d, n_lo, n_hi)
        rows = _ball_remainder_rows(rho, n0, big_d, n_lo, n_hi)
        own = torch.minimum(own, rows)
        e_lo, e_hi = e_lo - pad, e_hi + pad
        own_lo, own_hi = -own - pad, own + pad
        own_rows = rows.squeeze(-1) + row_norm(pad)
    return Box(value, lo - pad, hi + pad, x.l2, x.row_dev(), e_lo, e_hi, None, own_lo, own_hi,
               own_rows=own_rows)


def _ball_remainder_rows(rho: float, n0: Tensor, big_d: Tensor, n_lo: Tensor, n_hi: Tensor
                         ) -> Tensor:
    """(..., 1): a bound of ‖R‖₂ per row for the own remainder of :func:`_ball_remainder`.
    g(x) = x/‖x‖ is LayerNorm's φ without ε (``rules/norm.py``, "Remainder per row"):
    ‖g″[h, h]‖ ≤ (2/√3)‖h‖²/‖x‖², so the smooth part obeys ‖R_smooth‖ ≤ ρ·D²/(√3·n_lo²)
    (norms ≥ n_lo > 0 on every segment of the set). Whole set outside: R = R_smooth. Set
    across the sphere around a centre outside: R = R_smooth − x̂·(ρ − ‖x‖)⁺, so
    ‖R‖ ≤ ρ·D²/(√3·n_lo²) + (ρ − n_lo)⁺; around a centre inside: R = −x̂·(‖x‖ − ρ)⁺, so
    ‖R‖ ≤ (n_hi − ρ)⁺. Inside for sure: R = 0."""
    away = n_lo > 0
    n_safe = torch.where(away, n_lo, torch.ones_like(n_lo))
    smooth = torch.where(away, rho * big_d.square() / (3**0.5 * n_safe.square()), torch.inf)
    dip = (rho - n_lo).clamp(min=0)
    excess = (n_hi - rho).clamp(min=0)
    rows = torch.where(n0 >= rho, smooth + dip, excess)
    return torch.where(n_hi < rho, torch.zeros_like(rows), rows) * (1 + 16 * U)


def _ball_remainder(x: Box, rho: float, n0: Tensor, big_d: Tensor, n_lo: Tensor, n_hi: Tensor
                    ) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Taylor remainder of the projection: e_y = J₀e_x + R, R = (J(ξ) − J₀)Δx
    componentwise, J₀ the Jacobian at the centre (I inside, f₀(I − x̂₀x̂₀ᵀ) with
    f₀ = ρ/‖x₀‖ when ‖x₀‖ ≥ ρ, as automatic differentiation takes it). Outside the ball,
    (J − J₀)Δx = (f − f₀)Δx − (f·x̂⟨x̂, Δx⟩ − f₀·x̂₀⟨x̂₀, Δx⟩), bounded with
    |x̂_ix̂_j − x̂₀_ix̂₀_j| ≤ δ_i|x̂_j| + |x̂₀_i|δ_j (δ the enclosure's distance from x̂₀);
    where the whole set is outside, also by Taylor's theorem for the smooth ρ·x/‖x‖ along
    the segment: g″[h, h] = (‖h‖²/‖x‖²)(−2uĥ − x̂ + 3u²x̂) for g(x) = x/‖x‖, u = ⟨x̂, ĥ⟩,
    so |R_i| ≤ ½ρ·sup|g″_i| ≤ ρ·D·(|Δx_i| + D·|x̂_i|)/n_lo². Against the other branch,
    |I − J_out| ≤ (1 − f)·I + f|x̂||x̂|ᵀ; and since y = ρ·g(x) − x̂·(ρ − ‖x‖)⁺ everywhere,
    a row whose set meets the sphere has R = R_smooth + x̂·(‖x‖ − ρ) on its points inside
    the ball around a centre outside (|x̂_i| bounded over norms ≥ n_lo), and
    R = −x̂·(‖x‖ − ρ)⁺ exactly around a centre inside: both vanish as the set's reach
    across the sphere (ρ − n_lo or n_hi − ρ) does, where the Jacobians' difference is first
    order at once. Rows whose set meets the sphere take the larger of both Jacobian bounds,
    intersected with these; rows inside for sure have R = 0 and e_y = e_x.
    Returns the enclosure of e_y and the bound of the op's own remainder |R|."""
    dx = x.deviation()
    outside0 = n0 >= rho
    f0 = torch.where(outside0, rho / n0.clamp(min=1e-300), torch.ones_like(n0))
    z0 = torch.where(outside0, x.value / n0.clamp(min=1e-300), torch.zeros_like(x.value))
    n_star = torch.clamp(n_lo, min=rho)
    zv = (x.value / n0.clamp(min=1e-300)).abs() * (1 + gamma(x.shape[-1] + 4))
    z_max = torch.clamp(zv + (dx + zv * big_d) / n_star * (1 + 4 * U), max=1.0)
    f_lo, f_hi = rho / n_hi * (1 - 2 * U), rho / n_star * (1 + 2 * U)
    z_dev = torch.minimum(z_max + z0.abs(), (dx + zv * big_d) / n_star * (1 + 4 * U)
                          + (zv - z0.abs()).abs())
    k = x.shape[-1]

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(-1, keepdim=True) * (1 + gamma(k + 2))

    f_dev = torch.maximum(f_hi - f0, f0 - f_lo).clamp(min=0)
    # J_out(ξ) − J₀ with J₀ = f₀(I − x̂₀x̂₀ᵀ) (centre outside) or I (inside)
    out_vs_out = f_dev * dx + f_hi * z_max * dot(z_dev, dx) + f_dev * z0.abs() * dot(z0.abs(), dx) \
        + f_hi * z_dev * dot(z0.abs(), dx)
    # the whole set outside (norms ≥ n_lo > ρ): y = ρ·g(x), g(x) = x/‖x‖, smooth on every
    # segment of the set, so R = ρ·(g(x) − g(x₀) − g′(x₀)Δx) and |R_i| ≤ ½ρ·sup|g″_i[Δx, Δx]|
    smooth = rho * big_d * (dx + big_d * z_max) / n_star.square() * (1 + 8 * U)
    out_vs_in = (1 - f_lo).clamp(min=0) * dx + f_hi * z_max * dot(z_max, dx)
    in_vs_out = (1 - f0) * dx + f0 * z0.abs() * dot(z0.abs(), dx)
    crosses = (n_lo <= rho) & (n_hi >= rho)
    outside = n_lo > rho
    r_out = torch.where(outside0, torch.minimum(out_vs_out, smooth), out_vs_in)
    # a row whose set meets the sphere: y = ρ·g(x) − x̂·(ρ − ‖x‖)⁺, so around a centre
    # outside, R = R_smooth + x̂·(‖x‖ − ρ) where ‖x‖ < ρ (the smooth bound with n_lo and
    # |x̂_i| over norms ≥ n_lo), and around a centre inside, R = −x̂·(‖x‖ − ρ)⁺ exactly
    away = n_lo > 0  # the set stays away from the origin
    n_safe = torch.where(away, n_lo, torch.ones_like(n_lo))
    z_low = torch.clamp(zv + (dx + zv * big_d) / n_safe * (1 + 4 * U), max=1.0)
    dip = (rho - n_lo).clamp(min=0) * (1 + 2 * U)
    around_out = torch.where(away, rho * big_d * (dx + big_d * z_low) / n_safe.square()
                             * (1 + 8 * U) + z_low * dip, torch.inf)
    excess = (n_hi - rho).clamp(min=0) * (1 + 2 * U)
    around_in = torch.minimum(z_max * excess, torch.maximum(x.lo.abs(), x.hi.abs())
                              * (1 - f_lo).clamp(min=0))
    r_cross = torch.where(outside0, torch.minimum(torch.maximum(out_vs_out, in_vs_out),
                                                  around_out),
                          torch.minimum(out_vs_in, around_in))
    r = torch.where(outside, r_out, torch.where(crosses, r_cross, torch.zeros_like(dx)))
    ec, er = x.e_mid_rad()
    jc = torch.where(outside0, f0 * (ec - z0 * dot(z0, ec)), ec)
    jr = torch.where(outside0, f0 * (er + z0.abs() * dot(z0.abs(), er)), er)
    rad = jr + r * (1 + gamma(k + 8)) + gamma(k + 8) * (jc.abs() + jr)
    return (jc - rad, jc + rad), r * (1 + gamma(k + 8))


@forward_rule(torch.ops.lipcert.group_sort2)
def group_sort2_forward(ctx: FwdCtx, x: Box) -> Box:
    """min and max of each pair: [min(lo_a, lo_b), min(hi_a, hi_b)] and
    [max(lo_a, lo_b), max(hi_a, hi_b)]; 1-Lipschitz and norm-preserving, l2 carries over."""
    lo, hi = x.lo.unflatten(-1, (-1, 2)), x.hi.unflatten(-1, (-1, 2))
    v = x.value.unflatten(-1, (-1, 2))
    value = torch.stack([v.amin(-1), v.amax(-1)], dim=-1).flatten(-2)
    new_lo = torch.stack([lo.amin(-1), lo.amax(-1)], dim=-1).flatten(-2)
    new_hi = torch.stack([hi.amin(-1), hi.amax(-1)], dim=-1).flatten(-2)
    e_lo = e_hi = own_lo = own_hi = None
    if x.has_e:
        (e_lo, e_hi), own = _sort_remainder(x)
        own_lo, own_hi = -own, own
    return Box(value, new_lo, new_hi, x.l2, x.row_dev(), e_lo, e_hi, None, own_lo, own_hi)


def _sort_remainder(x: Box) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Taylor remainder of sorting pairs. Automatic differentiation takes min(a, b) with
    weights (c_a, c_b) = (1, 0), (0, 1) or (½, ½) at a tie (and max the other way), so
    e_min = c_a e_a + c_b e_b + R with R = min(a, b) − min(a₀, b₀) − c_aΔa − c_bΔb: 0 when the
    pair's order cannot change, else |R| ≤ 2·max(|Δa|, |Δb|). Returns the enclosure of e and
    the bound of the op's own remainder |R| (per element of the output)."""
    v = x.value.unflatten(-1, (-1, 2))
    a0, b0 = v[..., 0], v[..., 1]
    lo, hi = x.lo.unflatten(-1, (-1, 2)), x.hi.unflatten(-1, (-1, 2))
    dev = x.deviation().unflatten(-1, (-1, 2))
    el, eh = x.e_lo.unflatten(-1, (-1, 2)), x.e_hi.unflatten(-1, (-1, 2))
    ca = torch.where(a0 < b0, 1.0, torch.where(a0 > b0, 0.0, 0.5)).to(F64)
    fixed = (hi[..., 0] < lo[..., 1]) | (lo[..., 0] > hi[..., 1])
    r = torch.where(fixed, 0.0, 2 * torch.maximum(dev[..., 0], dev[..., 1]) * (1 + 4 * U))

    def mix(wa: Tensor) -> tuple[Tensor, Tensor]:
        wb = 1 - wa
        return wa * el[..., 0] + wb * el[..., 1], wa * eh[..., 0] + wb * eh[..., 1]

    (min_lo, min_hi), (max_lo, max_hi) = mix(ca), mix(1 - ca)
    pad = 4 * U * (el.abs().amax(-1) + eh.abs().amax(-1)) + TINY + r
    e_lo = torch.stack([min_lo - pad, max_lo - pad], dim=-1).flatten(-2)
    e_hi = torch.stack([min_hi + pad, max_hi + pad], dim=-1).flatten(-2)
    own = (r + TINY).unsqueeze(-1).expand(*r.shape, 2).flatten(-2)
    return (e_lo, e_hi), own
