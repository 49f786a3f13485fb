"""LayerNorm and RMSNorm over the last k dimensions (d elements per group).

LayerNorm: u = P x (P = I − 11ᵀ/d), s = √(‖u‖²/d + ε), ẑ = u/s, y = γ ⊙ ẑ + β. Since
ds = uᵀdu/(d·s), dẑ = (du − ẑ·ẑᵀdu/d)/s, so ∂ẑ/∂x = (I − ẑẑᵀ/d)P/s and, with g = γ ⊙ G_y,

    G_x = Pᵀ(g − ẑ·⟨g, ẑ⟩/d)/s = (g − mean(g) − t·ẑ)/s,   t = ⟨g, ẑ⟩/d,

using mean(ẑ) = 0. RMSNorm is the same without P (ẑ = x/s). The rule encloses s and ẑ over
the input set from the input's forward interval and its centre value x₀ (Δx = x − x₀,
|Δx_i| ≤ ρ_i):

* |Δu_i| ≤ ρ_i(1 − 2/d) + Σρ/d (the exact radius of (PΔx)_i over the box), and
  ‖Δu‖ ≤ ‖Δx‖ ≤ ‖ρ‖ =: D;
* ‖u‖ ∈ [max(‖u₀‖ − D, √Σ dist(0, [u_i])²), min(‖u₀‖ + D, √Σ max(u_lo², u_hi²))], and
  from ‖u‖² = ‖u₀‖² + 2⟨u₀, Δu⟩ + ‖Δu‖² with |⟨u₀, Δu⟩| = |⟨u₀, Δx⟩| ≤ Σ|u₀_i|ρ_i =: d·A
  (Pu₀ = u₀), ‖u‖² ∈ [‖u₀‖² − 2dA, ‖u₀‖² + 2dA + D²]; where the symbolic remainders give
  a signed range of ⟨u₀, Δx⟩ (``Box.dot``: first-order part ⟨Aᵀu₀, δ⟩ plus the weighted own
  remainders, without Σ|u₀_i|ρ_i's worst case of every element at once), a ∈ [a_lo, a_hi]
  is that range ∩ [−A, A] and ‖u‖² ∈ [‖u₀‖² + 2d·a_lo, ‖u₀‖² + 2d·a_hi + D²]; also
  ‖u‖ ≥ ⟨u, u₀⟩/‖u₀‖ = ‖u₀‖ + d·a/‖u₀‖ ≥ ‖u₀‖ + d·a_lo/‖u₀‖ (the projection on the
  centre's direction: positive until d·a_lo = −‖u₀‖², where the bound from ‖u‖² already
  reaches 0 at half of that); hence s ∈ [s_lo, s_hi] with
  s_lo ≥ √ε > 0 always (a careful lower bound: it never uses the centre's variance
  without subtracting the largest possible change);
* ẑ − ẑ₀ = Δu/s + ẑ₀(s₀ − s)/s and |s − s₀| ≤ ‖Δu‖/√d (s is (1/√d)-Lipschitz in u), so
  |ẑ_i − ẑ₀_i| ≤ (|Δu_i| + |ẑ₀_i|·D/√d)/s_lo; also ẑ − ẑ₀ = Δu/s + u₀(g − g₀) with g = 1/s,
  so |ẑ_i − ẑ₀_i| ≤ |Δu_i|/s_lo + |u₀_i|·G (G from :func:`inverse_std_change`, the
  smaller of the two is used); intersected with [u_i]/[s], with |ẑ_i| ≤ √d and with
  (y − β)/γ from the output's forward interval.

Remainder: s² = s₀² + 2a + b exactly, with a = ⟨u₀, Δu⟩/d ∈ [a_lo, a_hi] and
b = ‖Δu‖²/d ∈ [0, D²/d], so g = 1/s is a function of t = 2a + b alone: g − g₀ is
decreasing in t, and g − g₀ − ∇g₀·Δu = g − g₀ + a/s₀³ = K(t) − b/(2s₀³), K convex with
K(0) = K′(0) = 0 (:func:`inverse_std_change`). Exact ranges over the ranges of t and b,
where the cruder bounds ‖∇g‖ ≤ 1/(√d·s²) and |ΔuᵀΔ²gΔu| ≤ 4‖Δu‖²/(d·s³) use the worst
direction of Δu; |a| ≤ A is usually far below ‖u₀‖·D/d.

Remainder per row, in ℓ2 (:func:`_norm_remainder`): ẑ = √d·φ(u) with φ(u) = u/ψ(u),
ψ = √(‖u‖² + dε) = √d·s. For a unit h, with v = u/ψ (‖v‖ ≤ 1) and α = ⟨v, h⟩,

    D²φ(u)[h, h] = (−2αh + (3α² − 1)v)/ψ²,
    ‖−2αh + (3α² − 1)v‖² = 8α² − 12α⁴ + ‖v‖²(3α² − 1)² ≤ 1 + 2α² − 3α⁴ ≤ 4/3

(α² ≤ ‖v‖² ≤ 1; the maximum is at α² = 1/3). Taylor's theorem with the integral remainder
along the segment from u₀ to u (inside the input set's box, and with ⟨u₀, Δu⟩ between 0
and its value, so s ≥ s_lo on it) gives ‖R_ẑ‖ ≤ √d·½·(2/√3)·‖Δu‖²/ψ_min², i.e.

    ‖γ ⊙ R‖ ≤ max|γ|·D²/(√(3d)·s_lo²),

with D ≥ ‖Δu‖. The elementwise bounds above let every element of a row reach its worst
case at once; this one keeps the row's geometry, and the symbolic remainders use it
(``Box.own_rows``; ``symbolic.py``). It is attained to first order: α² = 1/3, ‖v‖ → 1
(ε → 0) and D ≪ ‖u₀‖.

Centre values carry float64 rounding slack γ_{d+4} relative to the magnitudes involved.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.backward.interval import (
    TINY,
    Box,
    Grad,
    GroupDot,
    dot_last,
    mid_rad,
    mul,
    row_norm,
    widen,
)
from lipcert.bounds.backward.registry import BackCtx, FwdCtx, backward_rule, forward_rule
from lipcert.bounds.state import F64, gamma
from lipcert.errors import LipcertError

aten = torch.ops.aten


def constant(x: Any, what: str) -> Tensor | None:
    """A constant argument as a float64 tensor (None stays None); ``what`` names it in the
    error for one that depends on the model input."""
    if x is None:
        return None
    if isinstance(x, Box):
        raise LipcertError(f"{what} that depends on the model input has no backward rule")
    return torch.as_tensor(x, dtype=F64)


def _dist0(lo: Tensor, hi: Tensor) -> Tensor:
    return torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo)))


def centre_radius_p(r: Tensor, d: int) -> Tensor:
    """Radius of (P·v)_i for v ∈ c ± r over the last dimension (P = I − 11ᵀ/d)."""
    return r * (1 - 2 / d) + r.sum(-1, keepdim=True) / d if d > 1 else torch.zeros_like(r)


def centre_dot(u0: Tensor, slack: Tensor, rho: Tensor, n0_hi: Tensor, big_d: Tensor,
               dot: GroupDot | None = None) -> tuple[Tensor, Tensor]:
    """[a_lo, a_hi] ∋ a per group, a = ⟨u₀, Δu⟩/d: ⟨u₀, PΔx⟩ = ⟨Pu₀, Δx⟩ = ⟨u₀, Δx⟩, so
    |a| ≤ Σ_i |u₀_i|·ρ_i/d and |a| ≤ ‖u₀‖·D/d (``slack``: the rounding of the float u₀).
    ``dot``: the range of ⟨w, Δx⟩ for a fixed w ≈ u₀ from the symbolic remainders
    (``symbolic.py``); ⟨u₀, Δx⟩ = ⟨w, Δx⟩ + ⟨u₀ − w, Δx⟩ with
    |⟨u₀ − w, Δx⟩| ≤ (‖u₀ − w‖ + ‖slack‖)·D. a = 0 at the centre, so a_lo ≤ 0 ≤ a_hi."""
    d = u0.shape[-1]
    by_box = ((u0.abs() + slack) * rho).sum(-1, keepdim=True) * (1 + gamma(d + 4))
    a_max = torch.minimum(by_box, n0_hi * big_d * (1 + gamma(4))) / d
    a_lo, a_hi = -a_max, a_max
    if dot is not None and dot.w.shape == u0.shape:
        miss = (torch.linalg.vector_norm(u0 - dot.w, dim=-1, keepdim=True)
                + torch.linalg.vector_norm(slack, dim=-1, keepdim=True)) * big_d
        miss = miss * (1 + gamma(d + 8))
        pad = gamma(4) * (dot.lo.abs() + dot.hi.abs() + miss)
        a_lo = torch.maximum(a_lo, (dot.lo - miss - pad) / d)
        a_hi = torch.minimum(a_hi, (dot.hi + miss + pad) / d)
    return a_lo.clamp(max=0.0), a_hi.clamp(min=0.0)


def inverse_std_change(s0: Tensor, s_lo: Tensor, s_hi: Tensor, a_lo: Tensor, a_hi: Tensor,
                       b_max: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds (G, H) of |g − g₀| and |g − g₀ − ∇g₀·Δu| for g = 1/s over the set, from
    s² = s₀² + 2a + b with a = ⟨u₀, Δu⟩/d ∈ [a_lo, a_hi], b = ‖Δu‖²/d ∈ [0, b_max]
    and s ∈ [s_lo, s_hi] (module docstring). With t = 2a + b = x·s₀² and
    q = √(1 + x): g − g₀ = −x/(q(1 + q)s₀), decreasing in t; ∇g₀·Δu = −a/s₀³, so
    g − g₀ − ∇g₀·Δu = K(t) − b/(2s₀³) with K(t) = g − g₀ + t/(2s₀³) = x²(q + 2)/(2q(1 + q)²s₀),
    convex with K(0) = K′(0) = 0. Both are written without cancellation."""
    x_lo = torch.maximum(2 * a_lo, s_lo.square() - s0.square()) / s0.square()
    x_hi = torch.minimum(2 * a_hi + b_max, s_hi.square() - s0.square()) / s0.square()
    x_lo = x_lo.clamp(min=-1.0)  # s ≥ 0 (rounding only); at −1 the bounds are +inf
    x_hi = torch.maximum(x_hi, x_lo)

    def change(x: Tensor) -> Tensor:
        q = torch.sqrt(1 + x)
        return x.abs() / (q * (1 + q) * s0)

    def curve(x: Tensor) -> Tensor:
        q = torch.sqrt(1 + x)
        return x.square() * (q + 2) / (2 * q * (1 + q).square() * s0)

    pad = 1 + 1e-12
    g_dev = torch.maximum(change(x_lo), change(x_hi)) * pad + 1e-15 / s0
    k_lo, k_hi = curve(x_lo), curve(x_hi)
    k_min = torch.where((x_lo <= 0) & (x_hi >= 0), torch.zeros_like(k_lo),
                        torch.minimum(k_lo, k_hi))
    h_dev = torch.maximum(torch.maximum(k_lo, k_hi), b_max / (2 * s0**3) - k_min) * pad
    return g_dev, h_dev + 1e-15 / s0


def normalised(x: Box, k: int, eps: float, centred: bool, out: Box | None,
               scale: Tensor | None, shift: Tensor | None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Enclosures over the input set of s (``s_lo``, ``s_hi``, shape (..., 1)) and of ẑ
    (centre, radius, shape (..., d)) for x grouped as (..., d), d the size of its last k
    dimensions (module docstring). D is also capped by the row's (k = 1) or the sample's
    deviation bound.
    ``out``: the output's forward interval (same grouping), ``scale``/``shift``: γ and β
    flattened to (d,) or None."""
    d = math.prod(x.shape[x.dim() - k:])
    v = x.value.reshape(-1, d)
    lo, hi = x.lo.reshape(-1, d), x.hi.reshape(-1, d)
    rho = torch.maximum(hi - v, v - lo).clamp(min=0)
    mc, mr = mid_rad(lo, hi)
    slack = gamma(d + 4) * (v.abs() + v.abs().mean(-1, keepdim=True))
    if centred:
        u0 = v - v.mean(-1, keepdim=True)
        du = centre_radius_p(rho, d)
        ub_c, ub_r = mc - mc.mean(-1, keepdim=True), centre_radius_p(mr, d)
        u_lo = torch.maximum(u0 - du, ub_c - ub_r) - slack
        u_hi = torch.minimum(u0 + du, ub_c + ub_r) + slack
    else:
        u0, du = v, rho
        u_lo, u_hi = torch.maximum(lo, v - rho), torch.minimum(hi, v + rho)
    big_d = torch.linalg.vector_norm(rho, dim=-1, keepdim=True) * (1 + gamma(d + 2))
    lead = x.dim() - k
    if k == 1 and lead >= 1:
        big_d = torch.minimum(big_d, x.row_dev().reshape(-1, 1))
    elif x.l2 is not None and lead >= 1:
        per_row = x.l2.reshape(-1, *([1] * (lead - 1))).expand(x.shape[:lead]).reshape(-1, 1)
        big_d = torch.minimum(big_d, per_row)
    n0 = torch.linalg.vector_norm(u0, dim=-1, keepdim=True)
    n0_lo = n0 * (1 - gamma(d + 4)) - slack.amax(-1, keepdim=True) * math.sqrt(d)
    n0_hi = n0 * (1 + gamma(d + 4)) + slack.amax(-1, keepdim=True) * math.sqrt(d)
    box_lo = (_dist0(u_lo, u_hi).square().sum(-1, keepdim=True) * (1 - gamma(d + 2))).sqrt()
    box_hi = (torch.maximum(u_lo.square(), u_hi.square()).sum(-1, keepdim=True)
              * (1 + gamma(d + 2))).sqrt()
    a_lo, a_hi = centre_dot(u0, slack, rho, n0_hi, big_d, x.dot)
    n0_sq = n0_lo.clamp(min=0).square()
    sq_lo = (n0_sq + 2 * d * a_lo - gamma(4) * (n0_sq + 2 * d * a_lo.abs())).clamp(min=0)
    n1_sq = n0_hi.square() + big_d.square()
    sq_hi = n1_sq + 2 * d * a_hi + gamma(4) * (n1_sq + 2 * d * a_hi.abs())
    toward = d * a_lo / n0_lo.clamp(min=TINY)
    along = (n0_lo + toward - gamma(4) * (n0_lo + toward.abs())).clamp(min=0)
    n_lo = torch.maximum(torch.maximum((n0_lo - big_d).clamp(min=0), box_lo), sq_lo.sqrt())
    n_lo = torch.maximum(n_lo, along)
    n_hi = torch.minimum(torch.minimum(n0_hi + big_d, box_hi), sq_hi.sqrt())
    s_lo = torch.sqrt(n_lo.square() / d + eps) * (1 - 1e-15)
    s_hi = torch.sqrt(n_hi.square() / d + eps) * (1 + 1e-15)
    s0 = torch.sqrt(n0.square() / d + eps)
    z0 = u0 / s0
    g_dev, _ = inverse_std_change(s0, s_lo, s_hi, a_lo, a_hi, big_d.square() / d)
    z_rad = (du + slack) / s_lo + torch.minimum(z0.abs() * big_d / math.sqrt(d) / s_lo,
                                                torch.nan_to_num((u0.abs() + slack) * g_dev,
                                                                 nan=math.inf))
    z_rad = z_rad + 1e-15 * (z0.abs() + z_rad) + TINY
    z_lo, z_hi = z0 - z_rad, z0 + z_rad
    q = torch.stack([u_lo / s_lo, u_lo / s_hi, u_hi / s_lo, u_hi / s_hi])
    z_lo = torch.maximum(z_lo, q.amin(0) * (1 + 1e-15) - TINY)
    z_hi = torch.minimum(z_hi, q.amax(0) * (1 + 1e-15) + TINY)
    cap = math.sqrt(d) * (1 + 1e-15)
    z_lo, z_hi = z_lo.clamp(min=-cap), z_hi.clamp(max=cap)
    if out is not None:
        y_lo, y_hi = out.lo.reshape(-1, d), out.hi.reshape(-1, d)
        g = torch.ones(d, dtype=F64) if scale is None else scale.expand(d)
        b = torch.zeros(d, dtype=F64) if shift is None else shift.expand(d)
        ok = g != 0
        safe = torch.where(ok, g, torch.ones_like(g))
        a1, a2 = (y_lo - b) / safe, (y_hi - b) / safe
        pad = 1e-15 * (a1.abs() + a2.abs()) + TINY
        z_lo = torch.where(ok, torch.maximum(z_lo, torch.minimum(a1, a2) - pad), z_lo)
        z_hi = torch.where(ok, torch.minimum(z_hi, torch.maximum(a1, a2) + pad), z_hi)
    zc, zr = mid_rad(z_lo, torch.maximum(z_hi, z_lo))
    return s_lo, s_hi, zc, zr


def norm_backward(g: Grad, x: Box, k: int, weight: Any, bias: Any, eps: float,
                  centred: bool, out: Box | None) -> Grad:
    """G_x = (g − [mean(g)] − t·ẑ)/s with g = γ ⊙ G_y, t = ⟨g, ẑ⟩/d (module docstring)."""
    norm_shape = x.shape[x.dim() - k:]
    d = math.prod(norm_shape)
    scale = constant(weight, "a normalisation weight")
    shift = constant(bias, "a normalisation bias")
    scale = None if scale is None else scale.reshape(-1)
    shift = None if shift is None else shift.reshape(-1)
    s_lo, s_hi, zc, zr = normalised(x, k, eps, centred, out, scale, shift)
    m = g.c.shape[0]
    gc, gr = g.c.reshape(m, -1, d), g.r.reshape(m, -1, d)
    if scale is not None:
        gc, gr = gc * scale, widen(gc * scale, gr * scale.abs(), 2)
    if centred:
        mean_c = gc.mean(-1, keepdim=True)
        hc = gc - mean_c
        hr = centre_radius_p(gr, d) + gamma(d + 2) * (gc.abs() + gc.abs().mean(-1, keepdim=True))
    else:
        hc, hr = gc, gr
    t = dot_last(Grad(gc, gr), zc, zr).scaled(1.0 / d)
    tz = mul(t, zc, zr)
    diff_c = hc - tz.c
    diff = Grad(diff_c, widen(diff_c, hr + tz.r, 2))
    ic, ir = mid_rad(1.0 / s_hi * (1 - 1e-15), 1.0 / s_lo * (1 + 1e-15))
    res = mul(diff, ic, ir)
    return Grad(res.c.reshape(g.c.shape), res.r.reshape(g.c.shape))


@backward_rule(aten.layer_norm)
def layer_norm(ctx: BackCtx, g: Grad, x: Box, normalized_shape: list[int], weight: Any = None,
               bias: Any = None, eps: float = 1e-5, *args: Any) -> tuple[Any, ...]:
    """LayerNorm: see the module docstring."""
    out = ctx.out if isinstance(ctx.out, Box) else None
    return (norm_backward(g, x, len(normalized_shape), weight, bias, float(eps), True, out),)


@backward_rule(aten.rms_norm)
def rms_norm(ctx: BackCtx, g: Grad, x: Box, normalized_shape: list[int], weight: Any = None,
             eps: Any = None) -> tuple[Any, ...]:
    """RMSNorm y = γ ⊙ x/√(‖x‖²/d + ε): see the module docstring (ε defaults to the float32
    machine epsilon, as in the forward rule)."""
    if eps is None:
        val = ctx.node.meta.get("val") if ctx.node is not None else None
        dtype = val.dtype if isinstance(val, Tensor) else torch.float32
        eps = torch.finfo(dtype).eps
    out = ctx.out if isinstance(ctx.out, Box) else None
    return (norm_backward(g, x, len(normalized_shape), weight, None, float(eps), False, out),)


# --------------------------------------------------------------------------- forward


def norm_forward(x: Box, k: int, weight: Any, bias: Any, eps: float, centred: bool) -> Box:
    """y = γ ⊙ ẑ + β with ẑ's enclosure from :func:`normalised` (module docstring). The
    Jacobian (I − ẑẑᵀ/d)P/s has norm ≤ 1/s, so a row moves by at most
    max|γ|·‖Δx_row‖/s_lo, and a sample by at most max|γ|·‖Δx‖/min s_lo over its groups
    (each group's change is within max|γ|/s_lo of its input's). Remainder (k = 1):
    e_y = γ ⊙ (J₀e_x + R) with J₀ the Jacobian at the centre,
    J₀v = (v − [mean v] − ẑ₀⟨ẑ₀, v⟩/d)/s₀ (|J₀| bounded by the triangle inequality), and R
    the Taylor remainder of ẑ(u) = u·g(u), g = 1/s, in u = Px:
    R = Δu·(g − g₀) + u₀·(g − g₀ − ∇g₀·Δu). Here ∇g = −u/(d·s³), ‖∇g‖ ≤ 1/(√d·s²), and
    ∇²g = −I/(d·s³) + 3uuᵀ/(d²·s⁵), so |ΔuᵀΔ²gΔu| ≤ 4‖Δu‖²/(d·s³) (‖u‖² ≤ d·s²). With
    D ≥ ‖Δu‖ and s ≥ s_lo on the set:
    |R_i| ≤ |Δu_i|·D/(√d·s_lo²) + |ẑ₀_i|·(s₀/s_lo)·2D²/(d·s_lo²) (second order), and
    |R_i| ≤ |Δu_i|·G + |u₀_i|·H with G, H the exact ranges of the module docstring
    ("Remainder"); the smaller is used."""
    scale = constant(weight, "a normalisation weight")
    shift = constant(bias, "a normalisation bias")
    norm_shape = x.shape[x.dim() - k:]
    d = math.prod(norm_shape)
    s_lo, s_hi, zc, zr = normalised(x, k, eps, centred, None, None, None)
    g = torch.ones(d, dtype=F64) if scale is None else scale.reshape(-1)
    b = torch.zeros(d, dtype=F64) if shift is None else shift.reshape(-1)
    ends = torch.stack([(zc - zr) * g, (zc + zr) * g])
    pad = 4 * 2.0**-53 * (ends.abs().amax(0) + b.abs()) + TINY
    lo = (ends.amin(0) + b - pad).reshape(x.shape)
    hi = (ends.amax(0) + b + pad).reshape(x.shape)
    v = x.value.reshape(-1, d)
    if centred:
        v = v - v.mean(-1, keepdim=True)
    s0 = torch.sqrt(v.square().mean(-1, keepdim=True) + eps)
    z0 = v / s0
    value = (z0 * g + b).reshape(x.shape)
    rdev = e_lo = e_hi = own_lo = own_hi = own_rows = l2 = None
    gmax = float(g.abs().max()) * (1 + 1e-15)
    if k == 1 and x.dim() >= 1:
        rdev = x.row_dev() * gmax / s_lo.reshape(x.shape[:-1])
    if x.l2 is not None and x.dim() > k:
        l2 = x.l2 * gmax / s_lo.reshape(x.shape[0], -1).amin(1) * (1 + 1e-15)
    if x.has_e:
        (e_lo, e_hi), own, groups = _norm_remainder(x, d, centred, s_lo, s_hi, s0, z0, zc,
                                                    zr, g)
        slack = gamma(d + 8) * (value.abs() + 1).reshape(-1, d) * (1 + g.abs())
        e_lo = (e_lo - slack).reshape(x.shape)
        e_hi = (e_hi + slack).reshape(x.shape)
        if k == 1 and x.dim() >= 1:  # a group is a row
            own = torch.minimum(own, groups)
            own_rows = (groups.squeeze(-1) + row_norm(slack)).reshape(x.shape[:-1])
        own_lo, own_hi = (-own - slack).reshape(x.shape), (own + slack).reshape(x.shape)
    return Box(value, lo, hi, l2, rdev, e_lo, e_hi, None, own_lo, own_hi, own_rows=own_rows)


def _norm_remainder(x: Box, d: int, centred: bool, s_lo: Tensor, s_hi: Tensor, s0: Tensor,
                    z0: Tensor, zc: Tensor, zr: Tensor, g: Tensor
                    ) -> tuple[tuple[Tensor, Tensor], Tensor, Tensor]:
    """γ ⊙ (J₀e_x + R) as an interval (see :func:`norm_forward`), shape (groups, d), the
    bound of the op's own remainder |γ ⊙ R|, and (groups, 1) the bound of ‖γ ⊙ R‖₂ per
    group, max|γ|·D²/(√(3d)·s_lo²) (module docstring, "Remainder per row")."""
    ec, er = x.e_mid_rad()
    ec, er = ec.reshape(-1, d), er.reshape(-1, d)
    inv0 = 1.0 / s0
    if centred:
        pc = ec - ec.mean(-1, keepdim=True)
        pr = centre_radius_p(er, d)
    else:
        pc, pr = ec, er
    j_c = inv0 * (pc - z0 * (z0 * ec).sum(-1, keepdim=True) / d)
    j_r = inv0 * (pr + z0.abs() * (z0.abs() * er).sum(-1, keepdim=True) / d)
    rho = x.deviation().reshape(-1, d)
    p_rho = centre_radius_p(rho, d) if centred else rho
    big_d = torch.linalg.vector_norm(rho, dim=-1, keepdim=True)
    if x.rdev is not None and x.dim() >= 2 and x.shape[-1] == d:
        big_d = torch.minimum(big_d, x.rdev.reshape(-1, 1))
    big_d = big_d * (1 + gamma(d + 2))
    p_rho = torch.minimum(p_rho, big_d)
    s_min2 = s_lo.square()
    r = (p_rho * big_d / (math.sqrt(d) * s_min2)
         + z0.abs() * (s0 / s_lo) * 2 * big_d.square() / (d * s_min2))
    u0 = z0 * s0
    slack = gamma(d + 4) * u0.abs()
    n0_hi = torch.linalg.vector_norm(u0, dim=-1, keepdim=True) * (1 + gamma(d + 4))
    a_lo, a_hi = centre_dot(u0, slack, rho, n0_hi, big_d, x.dot)
    g_dev, h_dev = inverse_std_change(s0, s_lo, s_hi, a_lo, a_hi, big_d.square() / d)
    sharp = p_rho * g_dev + (u0.abs() + slack) * h_dev
    r = torch.minimum(r, torch.nan_to_num(sharp, nan=math.inf))  # 0·inf where s_lo = 0
    r = r * (1 + gamma(d + 8))
    c = j_c * g
    rad = (j_r + r) * g.abs()
    rad = rad + gamma(d + 8) * (c.abs() + rad)
    own = r * g.abs() * (1 + gamma(2))
    groups = float(g.abs().max()) * big_d.square() / (math.sqrt(3 * d) * s_min2)
    return (c - rad, c + rad), own, groups * (1 + gamma(8)) + TINY


@forward_rule(aten.layer_norm)
def layer_norm_forward(ctx: FwdCtx, x: Box, normalized_shape: list[int], weight: Any = None,
                       bias: Any = None, eps: float = 1e-5, *args: Any) -> Box:
    """LayerNorm: see :func:`norm_forward`."""
    return norm_forward(x, len(normalized_shape), weight, bias, float(eps), True)


@forward_rule(aten.rms_norm)
def rms_norm_forward(ctx: FwdCtx, x: Box, normalized_shape: list[int], weight: Any = None,
                     eps: Any = None) -> Box:
    """RMSNorm: see :func:`norm_forward` (ε as in the backward rule)."""
    if eps is None:
        val = ctx.node.meta.get("val") if ctx.node is not None else None
        dtype = val.dtype if isinstance(val, Tensor) else torch.float32
        eps = torch.finfo(dtype).eps
    return norm_forward(x, len(normalized_shape), weight, None, float(eps), False)
