"""Order statistics of groups: ``sort`` (values), and the parts max pooling shares
(``pooling.py``). Derivations: docs/local-margin.md, "Pooling, sorting and batch norm".

For a group u ∈ ℝᴷ (a fibre of the sorted dimension, or one pooling window) on a set where
lo ≤ u ≤ hi elementwise, y_i is its i-th smallest element (i = 0, …, K − 1):

* **Intervals.** y_i is nondecreasing in every u_j, so y_i ∈ [sort(lo)_i, sort(hi)_i].
* **Backward (Clarke).** Where the u_j are distinct, ∂y/∂u is the permutation matrix with
  P_ij = 1 iff u_j has rank i. At a point ξ the generalised Jacobian is the convex hull of
  the limits of these, the permutations of ξ's order with its ties broken either way; in each,
  column j has its 1 at a rank in [#{l : ξ_l < ξ_j}, K − 1 − #{l : ξ_l > ξ_j}], which lies in
  [ρ_lo_j, ρ_hi_j] with ρ_lo_j = #{l : hi_l < lo_j} and ρ_hi_j = K − 1 − #{l : lo_l > hi_j}.
  So (Pᵀg)_j is a convex combination of the g_i with i in that range, and
  G_x_j ∈ hull{G_y_i : ρ_lo_j ≤ i ≤ ρ_hi_j}, exact when the range is one rank. With the
  chain rule inclusion ∂(f∘g) ⊆ co(∂f·∂g) and Lebourg's mean value theorem the margin
  certificate stays sound, as for the other piecewise-smooth ops.
* **Own remainder.** Automatic differentiation takes J₀ as the gather at the centre's
  indices: for rank i it selects one element a with u₀_a = y₀_i, so
  R_i = y_i − y₀_i − (u_a − u₀_a) = y_i − u_a, the i-th smallest of the differences
  u_j − u_a. Each lies in [lo_j − hi_a, hi_j − lo_a] (j ≠ a) and is 0 for j = a, so by
  monotonicity R_i ∈ [sort(D_lo^a)_i, sort(D_hi^a)_i]: 0 when a's rank cannot change on the
  set. The Taylor remainder is e_y_i = e_u_a + R_i.
* **Which a.** The evaluator that computes J₀ (float64, with roundings of its own) breaks
  ties its own way. Order statistics are 1-Lipschitz in the ∞-norm, so if its centre values
  differ from the ones here by at most ε, its choice a has |u₀_a − y₀_i| ≤ 2ε. The rule takes
  the hull over every a with |u₀_a − y₀_i| ≤ τ, τ = 10⁻⁹·max_group |u₀| + 10⁻¹²·max |u₀|
  (over the tensor), which covers two float64 evaluations of the same centre under the
  float model of docs/local-margin.md.

Rounding: the differences lo_j − hi_a and hi_j − lo_a are widened by 2u of themselves, the
sums e + R by 2u of their terms; sorting, min and max are exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.backward.interval import TINY, Box, Grad, mid_rad
from lipcert.bounds.backward.registry import BackCtx, FwdCtx, backward_rule, forward_rule
from lipcert.bounds.state import gamma

aten = torch.ops.aten
U = 2.0**-53
TIE_REL = 1e-9  # τ relative to the group's largest |u₀|
TIE_ABS = 1e-12  # τ relative to the tensor's largest |u₀|

Pair = tuple[Tensor, Tensor]


def _statistic(t: Tensor, ranks: Tensor) -> Tensor:
    """The ascending order statistics ``ranks`` along the last dimension (the maximum
    without a sort)."""
    if ranks.numel() == 1 and int(ranks) == t.shape[-1] - 1:
        return t.amax(-1, keepdim=True)
    return t.sort(-1).values[..., ranks]


def order_remainders(v: Tensor, lo: Tensor, hi: Tensor, ranks: Tensor,
                     e: Pair | None) -> tuple[Pair, Pair | None]:
    """Enclosures of the own remainders R_i and of the Taylor remainders e_u_a + R_i of the
    ascending ranks ``ranks`` (R,) of every group along the last dimension (module
    docstring). ``v``, ``lo``, ``hi``: (..., K), with −inf at padding taps (never selected,
    always below); ``e``: the remainder enclosure of u (0 at padding taps). Returns
    ((own_lo, own_hi), (e_lo, e_hi) or None), each (..., R)."""
    k = v.shape[-1]
    valid = v > -torch.inf
    eye = torch.eye(k, dtype=torch.bool)
    d_lo = lo.unsqueeze(-2) - hi.unsqueeze(-1)  # [..., a, j] = lo_j − hi_a
    d_hi = hi.unsqueeze(-2) - lo.unsqueeze(-1)  # [..., a, j] = hi_j − lo_a
    finite = d_lo.isfinite() & d_hi.isfinite()  # not at padding taps
    d_lo = torch.where(eye, 0.0, torch.where(finite, d_lo - 2 * U * d_lo.abs(), d_lo))
    d_hi = torch.where(eye, 0.0, torch.where(finite, d_hi + 2 * U * d_hi.abs(), d_hi))
    low, high = _statistic(d_lo, ranks), _statistic(d_hi, ranks)  # (..., a, R)
    y0 = _statistic(v, ranks)  # (..., R)
    mag = torch.where(valid, v.abs(), 0.0)
    tau = TIE_REL * mag.amax(-1, keepdim=True) + TIE_ABS * mag.max() + 1e-300
    chosen = valid.unsqueeze(-1) & (
        (v.unsqueeze(-1) - y0.unsqueeze(-2)).abs() <= tau.unsqueeze(-1))
    own = (torch.where(chosen, low, torch.inf).amin(-2),
           torch.where(chosen, high, -torch.inf).amax(-2))
    if e is None:
        return own, None
    e_lo, e_hi = e[0].unsqueeze(-1), e[1].unsqueeze(-1)
    tot_lo = e_lo + low - 2 * U * (e_lo.abs() + low.abs())
    tot_hi = e_hi + high + 2 * U * (e_hi.abs() + high.abs())
    return own, (torch.where(chosen, tot_lo, torch.inf).amin(-2) - TINY,
                 torch.where(chosen, tot_hi, -torch.inf).amax(-2) + TINY)


def rank_hull(g: Grad, lo: Tensor, hi: Tensor, rank_at: Tensor) -> Grad:
    """G_u for a sort along the last dimension: element j gets the hull of G_y at every
    output position whose (ascending) rank ``rank_at`` (K,) lies in [ρ_lo_j, ρ_hi_j]
    (module docstring). ``g``: (M, ..., K) by output position; ``lo``, ``hi``: (..., K)."""
    k = lo.shape[-1]
    below = (hi.unsqueeze(-2) < lo.unsqueeze(-1)).sum(-1)  # [..., j] #{l : hi_l < lo_j}
    above = (lo.unsqueeze(-2) > hi.unsqueeze(-1)).sum(-1)  # #{l : lo_l > hi_j}
    allowed = (rank_at >= below.unsqueeze(-1)) & (rank_at <= (k - 1 - above).unsqueeze(-1))
    g_lo = (g.c - g.r).unsqueeze(-2)  # (M, ..., 1, K)
    g_hi = (g.c + g.r).unsqueeze(-2)
    c, r = mid_rad(torch.where(allowed, g_lo, torch.inf).amin(-1),
                   torch.where(allowed, g_hi, -torch.inf).amax(-1))
    return Grad(c, r + TINY)


# --------------------------------------------------------------------------- sort


def _sort_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, bool]:
    """(dim, descending) of ``sort.default(x, dim, descending)`` or ``sort.stable``."""
    dim = kwargs.get("dim", args[0] if args else -1)
    descending = kwargs.get("descending", args[1] if len(args) > 1 else False)
    return int(dim), bool(descending)


def _ranks(k: int, descending: bool) -> Tensor:
    """The ascending rank of every output position."""
    r = torch.arange(k)
    return k - 1 - r if descending else r


@forward_rule(aten.sort)
def sort_forward(ctx: FwdCtx, x: Box, *args: Any, **kwargs: Any) -> tuple[Box, Tensor]:
    """Sorted values (module docstring) and the centre's indices (a constant). Sorting is
    non-expansive in ℓ2, so the sample's deviation carries over, and a row's along the last
    dimension; along another dimension every output row draws from the K input rows of its
    fibre, so its deviation is at most theirs in ℓ2. The own remainder is always reported,
    also without Taylor models: the op has two outputs, and its values carry it."""
    dim, descending = _sort_args(args, kwargs)
    values, indices = ctx.target(x.value, *args, **kwargs)
    d = dim % x.dim()
    lo = torch.sort(x.lo, d, descending).values
    hi = torch.sort(x.hi, d, descending).values
    k = x.shape[d]
    ranks = _ranks(k, descending)

    def last(t: Tensor) -> Tensor:
        return t.movedim(d, -1)

    e_parts = (last(x.e_lo), last(x.e_hi)) if x.has_e else None
    (own_lo, own_hi), e_out = order_remainders(last(x.value), last(x.lo), last(x.hi), ranks,
                                               e_parts)
    rdev = x.row_dev()
    if d != x.dim() - 1:
        rdev = (rdev.square().sum(d, keepdim=True) * (1 + gamma(k + 2))).sqrt().expand(
            rdev.shape)
    e_lo = e_hi = None
    if e_out is not None:
        e_lo, e_hi = e_out[0].movedim(-1, d), e_out[1].movedim(-1, d)
    box = Box(values, lo, hi, x.l2, rdev, e_lo, e_hi, None, own_lo.movedim(-1, d),
              own_hi.movedim(-1, d))
    return box, indices


@backward_rule(aten.sort)
def sort_(ctx: BackCtx, g: Any, x: Box, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """G_x from the gradient of the values (module docstring); the indices have none."""
    gv = g[0] if isinstance(g, list | tuple) else g
    none = (None,) * len(args)
    if gv is None:
        return (None, *none)
    dim, descending = _sort_args(args, kwargs)
    d = dim % x.dim()
    moved = Grad(gv.c.movedim(d + 1, -1), gv.r.movedim(d + 1, -1))
    gx = rank_hull(moved, x.lo.movedim(d, -1), x.hi.movedim(d, -1),
                   _ranks(x.shape[d], descending))
    return (Grad(gx.c.movedim(-1, d + 1), gx.r.movedim(-1, d + 1)), *none)
