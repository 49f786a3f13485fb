"""softmax and scaled_dot_product_attention.

softmax along a dimension: ∂m/∂x = p ⊙ (G − ⟨p, G⟩) (J = diag(p) − ppᵀ). Because Σ_j p_j = 1
for every point of the input set, G may be shifted per row by any constant κ first:
G − ⟨p, G⟩ = H − ⟨p, H⟩ with H = G − κ. The rule takes κ = ⟨p₀, G_c⟩ (centre values), so
the interval products see |G − κ| instead of |G| (a much smaller enclosure when G has a
large common offset).

The enclosure of p: log p_i = x_i − lse(x), and lse(x + Δ) − lse(x) ∈ [min_j Δ_j, max_j Δ_j]
(lse is increasing and lse(x + t·1) = lse(x) + t), so with Δ_i ∈ [a_i, b_i] around the
centre, p_i ∈ p⁰_i·[e^{a_i − max b}, e^{b_i − min a}]; intersected with the interval formula
p_i ∈ [e^{lo_i}/(e^{lo_i} + Σ_{j≠i} e^{hi_j}), e^{hi_i}/(e^{hi_i} + Σ_{j≠i} e^{lo_j})] and
with [0, 1]; masked entries are exactly 0.

Attention Y = softmax(c·Q Kᵀ + mask) V is taken apart inside the rule: the score interval
from the forward intervals of Q and K (around the centre, c(|ΔQ||K₀|ᵀ + |Q₀||ΔK|ᵀ + |ΔQ||ΔK|ᵀ),
intersected with the midpoint–radius product), P's interval as above, then

    G_V = Pᵀ G_Y,  G_P = G_Y (V − w)ᵀ,  G_S = P ⊙ (H − ⟨P, H⟩),  H = G_P − κ,
    G_Q = c·G_S (K − w_k),  G_K = c·G_Sᵀ Q,

where w and w_k are the mean centre value and key of each matrix: shifting V by a constant
row changes G_P by a constant per row, which the softmax rule removes, and the rows of G_S sum
to 0, so shifting K leaves G_Q unchanged; both shifts only shrink the enclosures.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lipcert.bounds.backward.interval import (
    TINY,
    Box,
    Grad,
    dot_last,
    iv_matmul,
    matmul,
    mid_rad,
    mul,
    row_norm,
    sum_to,
)
from lipcert.bounds.backward.registry import BackCtx, FwdCtx, backward_rule, forward_rule
from lipcert.bounds.backward.rules import attention_rows
from lipcert.bounds.backward.rules.attention_rows import Reads
from lipcert.bounds.state import F64, gamma
from lipcert.errors import LipcertError

aten = torch.ops.aten
REL = 1e-14  # relative slack of exp and of the divisions in the softmax intervals
U = 2.0**-53
Pair = tuple[Tensor, Tensor]


def softmax_box(value: Tensor, lo: Tensor, hi: Tensor, keep: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """(p⁰, p_lo, p_hi): softmax over the last dimension at the centre and its enclosure over
    scores in [lo, hi] (module docstring); ``keep`` (bool, broadcastable): entries not kept
    are masked out (p = 0)."""
    ninf = torch.tensor(-math.inf, dtype=F64)
    if keep is not None:
        value, lo, hi = (torch.where(keep, t, ninf) for t in (value, lo, hi))
    live = torch.isfinite(value)
    p0 = torch.softmax(value, dim=-1)
    # centre form
    a = torch.where(live, lo - value, torch.zeros((), dtype=F64))
    b = torch.where(live, hi - value, torch.zeros((), dtype=F64))
    big_a = a.amin(-1, keepdim=True)
    big_b = b.amax(-1, keepdim=True)
    c_lo = p0 * torch.exp(a - big_b) * (1 - REL)
    c_hi = p0 * torch.exp(b - big_a) * (1 + REL)
    # interval form
    shift = torch.where(live, hi, ninf).amax(-1, keepdim=True)
    e_hi = torch.exp(hi - shift)
    e_lo = torch.exp(lo - shift)
    k = value.shape[-1]
    s_hi, s_lo = e_hi.sum(-1, keepdim=True), e_lo.sum(-1, keepdim=True)
    others_hi = (s_hi - e_hi) + gamma(k + 2) * s_hi
    others_lo = ((s_lo - e_lo) - gamma(k + 2) * s_lo).clamp(min=0)
    i_lo = e_lo / (e_lo + others_hi) * (1 - REL)
    i_hi = (e_hi / (e_hi + others_lo) * (1 + REL))
    p_lo = torch.maximum(torch.nan_to_num(c_lo, nan=0.0), torch.nan_to_num(i_lo, nan=0.0))
    p_hi = torch.minimum(torch.nan_to_num(c_hi, nan=1.0), torch.nan_to_num(i_hi, nan=1.0))
    p_lo, p_hi = p_lo.clamp(0.0, 1.0), p_hi.clamp(0.0, 1.0)
    zero = torch.zeros((), dtype=F64)
    return (torch.where(live, p0, zero), torch.where(live, p_lo, zero),
            torch.where(live, p_hi, zero))


def softmax_grad(g: Grad, p0: Tensor, p_lo: Tensor, p_hi: Tensor) -> Grad:
    """p ⊙ (H − ⟨p, H⟩), H = G − ⟨p⁰, G_c⟩, over the last dimension (module docstring)."""
    kappa = (g.c * p0).sum(-1, keepdim=True)
    h = Grad(g.c - kappa, g.r + gamma(p0.shape[-1] + 2) * (
        (g.c * p0).abs().sum(-1, keepdim=True) + g.c.abs()) + TINY)
    pc, pr = mid_rad(p_lo, p_hi)
    t = dot_last(h, pc, pr)
    diff_c = h.c - t.c
    diff = Grad(diff_c, h.r + t.r + gamma(2) * (diff_c.abs() + h.r + t.r))
    return mul(diff, pc, pr)


@backward_rule(aten._softmax, aten.softmax)
def softmax(ctx: BackCtx, g: Grad, x: Box, dim: int, *args: Any) -> tuple[Any, ...]:
    """softmax along ``dim``: see the module docstring."""
    d = dim % x.dim()
    last = x.dim() - 1
    p0, p_lo, p_hi = softmax_box(*(t.transpose(d, last) for t in (x.value, x.lo, x.hi)))
    if isinstance(ctx.out, Box):
        p_lo = torch.maximum(p_lo, ctx.out.lo.transpose(d, last))
        p_hi = torch.minimum(p_hi, ctx.out.hi.transpose(d, last))
    gt = g.map(lambda t: t.transpose(d + 1, last + 1))
    res = softmax_grad(gt, p0, p_lo, p_hi)
    return (res.map(lambda t: t.transpose(d + 1, last + 1)),)


def _bt(t: Tensor) -> Tensor:
    return t.transpose(-1, -2)


def _around_centre(x: Any) -> tuple[Tensor, Tensor]:
    """(centre value x₀, ρ) with |x − x₀| ≤ ρ over the input set (ρ = 0 for a constant)."""
    if isinstance(x, Box):
        return x.value, torch.maximum(x.hi - x.value, x.value - x.lo).clamp(min=0)
    t = torch.as_tensor(x, dtype=F64)
    return t, torch.zeros_like(t)


def score_box(q: Any, k: Any, c: float) -> tuple[Tensor, Tensor, Tensor]:
    """Centre value and enclosure of c·Q Kᵀ (module docstring); the deviation is also at most
    c(‖Δq_i‖·‖k_j‖ + ‖q⁰_i‖·‖Δk_j‖) from the rows' ℓ2 deviations."""
    q0, dq = _around_centre(q)
    k0, dk = _around_centre(k)
    e = q0.shape[-1]
    s0 = c * (q0 @ _bt(k0))
    dev = c * (dq @ _bt(k0.abs()) + q0.abs() @ _bt(dk) + dq @ _bt(dk))
    rq = q.row_dev() if isinstance(q, Box) else torch.zeros(q0.shape[:-1], dtype=F64)
    rk = k.row_dev() if isinstance(k, Box) else torch.zeros(k0.shape[:-1], dtype=F64)
    nq, nk = row_norm(q0), row_norm(k0)
    dev = torch.minimum(dev, c * (rq.unsqueeze(-1) * (nk + rk).unsqueeze(-2)
                                  + nq.unsqueeze(-1) * rk.unsqueeze(-2)) * (1 + 1e-15))
    err = c * 2 * gamma(e + 4) * (q0.abs() @ _bt(k0.abs()) + dev / c)
    lo, hi = s0 - dev - err, s0 + dev + err
    if isinstance(q, Box) and isinstance(k, Box):
        qc, qr = mid_rad(q.lo, q.hi)
        kc, kr = mid_rad(k.lo, k.hi)
        mc = c * (qc @ _bt(kc))
        mr = c * (qc.abs() @ _bt(kr) + qr @ _bt(kc.abs() + kr))
        merr = c * 2 * gamma(e + 4) * (qc.abs() @ _bt(kc.abs()) + mr / c)
        lo = torch.maximum(lo, mc - mr - merr)
        hi = torch.minimum(hi, mc + mr + merr)
    return s0, lo, hi


def _mid(x: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(x, Box):
        return mid_rad(x.lo, x.hi)
    return torch.as_tensor(x, dtype=F64), None


@backward_rule(aten.scaled_dot_product_attention)
def sdpa(ctx: BackCtx, g: Grad, q: Any, k: Any, v: Any, attn_mask: Any = None,
         dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
         enable_gqa: bool = False) -> tuple[Any, ...]:
    """Attention taken apart into scores, softmax and weighting (module docstring)."""
    if dropout_p:
        raise LipcertError("attention dropout in training mode: use model.eval()")
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        raise LipcertError("grouped-query attention has no rule yet")
    parts = attention_parts(q, k, attn_mask, is_causal, scale)
    c, p0, p_lo, p_hi = parts.c, parts.p0, parts.p_lo, parts.p_hi
    aux = ctx.out.aux if isinstance(ctx.out, Box) else None
    if aux is not None:
        p_lo = torch.maximum(p_lo, aux["p_lo"])
        p_hi = torch.minimum(p_hi, aux["p_hi"])
    pc, pr = mid_rad(p_lo, p_hi)
    gv = sum_to(matmul(g.t(), pc, pr).t(), v.shape) if isinstance(v, Box) else None
    gp = matmul(g, *_shifted(v, transpose=True))
    gs = softmax_grad(gp, p0, p_lo, p_hi)
    gq = sum_to(matmul(gs, *_shifted(k)).scaled(c), q.shape) if isinstance(q, Box) else None
    gk = None
    if isinstance(k, Box):
        qc, qr = _mid(q)
        gk = sum_to(matmul(gs.t(), qc, qr).scaled(c), k.shape)
    return (gq, gk, gv)


def _shifted(x: Any, transpose: bool = False) -> tuple[Tensor, Tensor]:
    """An operand's rows minus the mean of its centre rows (per matrix), as midpoint and
    radius (with the rounding of the subtraction); transposed if asked."""
    xc, xr = _mid(x)
    w = xc.mean(-2, keepdim=True)
    slack = 2 * gamma(2) * (xc.abs() + w.abs())
    c, r = xc - w, slack if xr is None else xr + slack
    return (_bt(c), _bt(r)) if transpose else (c, r)


# --------------------------------------------------------------------------- forward


def _lagrange_terms(p_hi: Tensor, d_lo: Tensor, d_hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For rows Δ ∈ [d_lo, d_hi] over the live entries (p_hi > 0; the others are 0): ω, the
    deviations about the row's middle κ; ``reach`` ≥ |Δ_i − μ| for any mean μ of the row's
    values; ``var`` (…, 1) ≥ the variance of Δ under any p ≤ p_hi (Σ_j p_hi_j·ω_j², and
    Popoviciu's (max − min)²/4)."""
    live = p_hi > 0
    zero = torch.zeros((), dtype=F64)
    d_lo = torch.where(live, d_lo, zero)
    d_hi = torch.where(live, d_hi, zero)
    top = torch.where(live, d_hi, -math.inf).amax(-1, keepdim=True).clamp(min=0)
    bottom = torch.where(live, d_lo, math.inf).amin(-1, keepdim=True).clamp(max=0)
    kappa = (top + bottom) / 2
    omega = torch.where(live, torch.maximum(d_hi - kappa, kappa - d_lo), zero)
    reach = torch.where(live, torch.maximum(d_hi - bottom, top - d_lo), zero)
    var = torch.minimum((p_hi * omega.square()).sum(-1, keepdim=True),
                        (top - bottom).square() / 4)
    return omega, reach, var


def softmax_own_times(p_hi: Tensor, d_lo: Tensor, d_hi: Tensor, v0: Tensor) -> Tensor:
    """A bound of |(R·V₀)_id| = |Σ_j R_ij V₀_jd| for softmax's own remainder R (p ∈ [0, p_hi] on
    every segment from s₀ to a reached s₀ + Δ, Δ ∈ [d_lo, d_hi]). For a fixed column
    c = V₀_{:,d}, φ(t) = Σ_j c_j p_j(s₀ + tΔ) has R·c = φ(1) − φ(0) − φ′(0) = ½φ″(τ), and
    (:func:`softmax_second_order`) φ″ = Σ_j c_j p_j[(Δ_j − μ)² − V] = E_p[(c − c̄)(Δ − μ)²]
    with c̄ = E_p[c], p = p(ξ) at one point ξ of the segment. So
    |R·c| ≤ ½·max_j|c_j − c̄|·V ≤ ½(max c − min c)·V, the extremes of c over the row's live
    entries: one variance for the whole sum, where the elementwise R·|c| pays each entry's
    worst case."""
    live = (p_hi > 0).unsqueeze(-1)  # (…, L, S, 1)
    col = v0.unsqueeze(-3)  # (…, 1, S, E)
    c_max = torch.where(live, col, -math.inf).amax(-2)  # (…, L, E)
    c_min = torch.where(live, col, math.inf).amin(-2)
    var = _lagrange_terms(p_hi, d_lo, d_hi)[2]
    bound = 0.5 * (c_max - c_min).clamp(min=0) * var
    return bound * (1 + gamma(p_hi.shape[-1] + 8)) + TINY


class ScoreForms(NamedTuple):
    """Centre quantities of :func:`softmax_own_quadratic` (:func:`score_forms`), each an
    upper bound: λ⁺, λ⁻ (…, L, E) of λ_max(BᵀW^±B) per query row and value column;
    ‖b_j‖ (…, L, S) per key; ‖B‖₂ and ‖√p⁰ ⊙ B‖₂ (…, L, 1) per row; ‖BᵀW‖ (…, L, E) per
    row and column."""

    lam_pos: Tensor
    lam_neg: Tensor
    b_norm: Tensor
    b_top: Tensor
    pb_top: Tensor
    bw_norm: Tensor


def score_forms(gram: Tensor, p0: Tensor, v0: Tensor, budget: int = 2**24
                ) -> ScoreForms | None:
    """Centre quantities of :func:`softmax_own_quadratic` for one attention call, from the
    Gram matrices G = AAᵀ of its score rows' Jacobians A = ∂s_i/∂x (…, L, S, S), the
    centre probabilities p⁰ (…, L, S) and values V₀ (…, S, E): with C = I − 1p⁰ᵀ, the
    centred rows B = CA have Gram K = CGCᵀ, and for each column c = V₀_{:,d} the weights
    W_j = p⁰_j(c_j − c̄), c̄ = ⟨p⁰, c⟩, split as W = W⁺ − W⁻. Returns (:class:`ScoreForms`)
    λ⁺, λ⁻: upper bounds of λ_max(BᵀW^±B) = λ_max(√W^± K √W^±) (an S × S eigenproblem per
    row and column); ‖b_j‖ = √K_jj; ‖B‖₂ = √λ_max(K) and ‖√p⁰ ⊙ B‖₂ = √λ_max(√p⁰K√p⁰)
    (one eigenproblem each per row); and ‖BᵀW‖ = √(WᵀKW) per column; each rounded up: G
    carries a relative error below 1e-9 (``jacobian.py``), so every entry of K is within
    4·10⁻⁹·max_j G_jj of the exact one, which moves an eigenvalue of √W K √W by at most
    that times Σ_j W_j (1 for W = p⁰) and one of K by at most that times S (Weyl), and WᵀKW
    by at most that times (Σ_j |W_j|)²; eigvalsh's own error is far below; all are covered
    by 10⁻⁸·max_j G_jj times the same factor. None
    where one column's matrices would exceed 4·``budget`` elements."""
    S, E = v0.shape[-2], v0.shape[-1]
    lead = torch.broadcast_shapes(gram.shape[:-2], p0.shape[:-1])
    if math.prod(lead) * S * S > 4 * budget:
        return None
    gp = (gram @ p0.unsqueeze(-1)).squeeze(-1)  # (…, L, S)
    pgp = (p0 * gp).sum(-1, keepdim=True)
    k = gram - gp.unsqueeze(-1) - gp.unsqueeze(-2) + pgp.unsqueeze(-1)
    g_max = torch.diagonal(gram, dim1=-2, dim2=-1).amax(-1, keepdim=True)  # (…, L, 1)
    b_norm = (torch.diagonal(k, dim1=-2, dim2=-1).clamp(min=0) + 4e-9 * g_max).sqrt()
    b_norm = b_norm * (1 + 4 * U)
    b_top = torch.linalg.eigvalsh(k)[..., -1:].clamp(min=0) * (1 + 4 * U) + 1e-8 * g_max * S
    b_top = b_top.sqrt() * (1 + 4 * U)
    root_p = p0.sqrt()
    pb_top = torch.linalg.eigvalsh(root_p.unsqueeze(-1) * k * root_p.unsqueeze(-2))[..., -1:]
    pb_top = (pb_top.clamp(min=0) * (1 + 4 * U) + 1e-8 * g_max).sqrt() * (1 + 4 * U)
    c_bar = p0 @ v0  # (…, L, E)
    weights = p0.unsqueeze(-1) * (v0.unsqueeze(-3) - c_bar.unsqueeze(-2))  # (…, L, S, E)
    form = torch.einsum("...se,...st,...te->...e", weights, k, weights).clamp(min=0)
    bw_norm = (form * (1 + gamma(2 * S + 4)) + 1e-8 * g_max * weights.abs().sum(-2).square()
               ).sqrt() * (1 + 4 * U)
    chunk = max(1, budget // max(1, math.prod(lead) * S * S))
    out = []
    for sign in (1.0, -1.0):
        w = (sign * weights).clamp(min=0)
        lam = []
        for d0 in range(0, E, chunk):
            root = w[..., d0:d0 + chunk].movedim(-1, -2).sqrt()  # (…, L, e, S)
            m = root.unsqueeze(-1) * k.unsqueeze(-3) * root.unsqueeze(-2)
            lam.append(torch.linalg.eigvalsh(m)[..., -1].clamp(min=0))
        pad = 1e-8 * g_max * w.sum(-2)
        out.append(torch.cat(lam, -1) * (1 + 4 * U) + pad + TINY)
    return ScoreForms(out[0], out[1], b_norm, b_top, pb_top, bw_norm)


class _ScoreRow(NamedTuple):
    """What :func:`softmax_own_quadratic` knows of a score row's deviation Δ = Aδ + e at a
    reached point (‖δ‖ ≤ r) and of p on the segment to it, over the live keys (p_hi > 0;
    the others are 0), with C = I − 1p⁰ᵀ, μ₀ = ⟨p⁰, Δ⟩, B = CA and, at a point of the
    segment, μ = ⟨p, Δ⟩ and V = Σ_j p_j(Δ_j − μ)²: ``dp`` ≥ |p_j − p⁰_j|; ω and ρ of
    :func:`_lagrange_terms`; ε_j ≥ |e_j − ⟨p⁰, e⟩|; ``n`` = N ≥ ‖CΔ‖ = ‖Δ − μ₀1‖,
    N = r‖B‖₂ + ‖ε‖; ``shift`` = σ ≥ |μ₀ − μ| = |Σ_j (p_j − p⁰_j)(Δ_j − κ)| (any κ), at
    most Σ_j Δp_j·ω_j and ‖Δp‖·N (κ = μ₀), plus the rounding of Σ_j p⁰_j = 1; ``var`` ≥ V:
    the bound of :func:`_lagrange_terms`, and V ≤ Σ_j p_j(Δ_j − μ₀)² ≤ max_j p_j·N² (the
    mean minimises the spread)."""

    live: Tensor
    dp: Tensor
    omega: Tensor
    reach: Tensor
    var: Tensor
    eps: Tensor
    n: Tensor
    shift: Tensor


def _score_row(p0: Tensor, p_lo: Tensor, p_hi: Tensor, d_lo: Tensor, d_hi: Tensor,
               e_lo: Tensor, e_hi: Tensor, forms: ScoreForms, r: Tensor) -> _ScoreRow:
    """:class:`_ScoreRow` for score deviations in [d_lo, d_hi] with remainder in
    [e_lo, e_hi] and p ∈ [p_lo, p_hi] on the segments."""
    live = p_hi > 0
    zero = torch.zeros((), dtype=F64)
    S = p0.shape[-1]
    omega, reach, var = _lagrange_terms(p_hi, d_lo, d_hi)
    dp = torch.where(live, torch.maximum(p_hi - p0, p0 - p_lo).clamp(min=0), zero)
    e_lo = torch.where(live, e_lo, zero)
    e_hi = torch.where(live, e_hi, zero)
    mean_lo = (p0 * e_lo).sum(-1, keepdim=True)
    mean_hi = (p0 * e_hi).sum(-1, keepdim=True)
    eps = torch.where(live, torch.maximum((e_hi - mean_lo).abs(), (e_lo - mean_hi).abs()),
                      zero)
    n = (r * forms.b_top + row_norm(eps).unsqueeze(-1)) * (1 + gamma(S + 16))
    top = torch.maximum(d_hi.abs(), d_lo.abs()).amax(-1, keepdim=True)
    shift = torch.minimum((dp * omega).sum(-1, keepdim=True), row_norm(dp).unsqueeze(-1) * n)
    shift = shift + gamma(S + 4) * top
    var = torch.minimum(var, p_hi.amax(-1, keepdim=True) * n * n * (1 + gamma(4)))
    return _ScoreRow(live, dp, omega, reach, var, eps, n, shift)


def _by_key(weights: Tensor, per_key: Tensor) -> Tensor:
    """Σ_j weights_j·per_key_j over the keys: (…, L, S, E) × (…, L, S) → (…, L, E)."""
    return torch.einsum("...se,...s->...e", weights, per_key)


def _quadratic_part(row: _ScoreRow, weight: Tensor, forms: ScoreForms, r: Tensor) -> Pair:
    """Bounds of T₁ = Σ_j W_j(Δ_j − μ₀)² = (CΔ)ᵀdiag(W)(CΔ) per value column (W = p⁰ ⊙ w,
    (…, L, S, E)). With CΔ = Bδ + Ce: δᵀBᵀWBδ ∈ r²[−λ⁻, λ⁺],
    |2(Bδ)ᵀW(Ce)| ≤ 2r Σ_j |W_j|·‖b_j‖·ε_j and (Ce)ᵀW(Ce) ∈ [−Σ W⁻ε², Σ W⁺ε²]; T₁ also
    lies within ±Σ_j W^±_j ρ_j² (|Δ_j − μ₀| ≤ ρ_j) and ±max_j W^±_j·N²."""
    w_pos, w_neg = weight.clamp(min=0), (-weight).clamp(min=0)
    n2, eps, reach2 = row.n * row.n, row.eps, row.reach.square()
    cross = 2 * r * _by_key(weight.abs(), forms.b_norm * eps)
    hi = torch.minimum(r * r * forms.lam_pos + cross + _by_key(w_pos, eps.square()),
                       torch.minimum(_by_key(w_pos, reach2), w_pos.amax(-2) * n2))
    lo = torch.maximum(-r * r * forms.lam_neg - cross - _by_key(w_neg, eps.square()),
                       -torch.minimum(_by_key(w_neg, reach2), w_neg.amax(-2) * n2))
    return lo, hi


def _expansion_rest(row: _ScoreRow, w: Tensor, weight: Tensor, c_bar: Tensor,
                    forms: ScoreForms, r: Tensor) -> Tensor:
    """A bound of |φ″ − T₁| at a point of the segment (c = V₀_{:,d}, w = c − c̄,
    W = p⁰ ⊙ w, c̄_p = ⟨p, c⟩ there), from the exact expansion

        φ″ − T₁ = 2(μ₀ − μ)·Σ_j W_j(Δ_j − μ₀) + (μ₀ − μ)²·Σ_j W_j
                  + Σ_j (p_j − p⁰_j)w_j(Δ_j − μ)² − (c̄_p − c̄)·V

    (Σ_j W_j = 0 up to the rounding of p⁰), each term bounded key by key and through N,
    which keeps the keys from all deviating at their worst at once:
    |Σ_j W_j(Δ_j − μ₀)| ≤ min(Σ_j |W_j|ρ_j, r‖BᵀW‖ + Σ_j |W_j|ε_j);
    |Σ_j (p_j − p⁰_j)w_j(Δ_j − μ)²| ≤ min(Σ_j Δp_j|w_j|ρ_j², max_j Δp_j|w_j|·(N + √n·σ)²)
    (n live keys; ‖Δ − μ1‖ ≤ ‖CΔ‖ + √n·|μ₀ − μ|); |c̄_p − c̄| ≤ Σ_j Δp_j|w_j|."""
    S = w.shape[-2]
    shift = row.shift
    linear = torch.minimum(_by_key(weight.abs(), row.reach),
                           r * forms.bw_norm + _by_key(weight.abs(), row.eps))
    w_sum = weight.sum(-2).abs() + gamma(S + 4) * weight.abs().sum(-2)
    spread = row.n + row.live.sum(-1, keepdim=True).sqrt() * shift
    moved = row.dp.unsqueeze(-1) * w.abs()
    return (shift * (2 * linear + shift * w_sum)
            + torch.minimum(_by_key(moved, row.reach.square()),
                            moved.amax(-2) * spread.square())
            + (_by_key(w.abs(), row.dp) + gamma(S + 4) * c_bar.abs()) * row.var)


class _Segment(NamedTuple):
    """What holds of a score row all along the segment (each (…, L, 1); derivations in
    :func:`softmax_cubic`): ``reach`` = max_j ρ_j; ``rho`` = ρ̂ ≥ |Δ_j − μ| for every key;
    ``grow`` with p_j ≤ grow·p⁰_j; ``var`` ≥ V = Σ_j p_j(Δ_j − μ)²."""

    reach: Tensor
    rho: Tensor
    grow: Tensor
    var: Tensor


def _segment(row: _ScoreRow, p0: Tensor, forms: ScoreForms, r: Tensor) -> _Segment:
    """:class:`_Segment` of a score row."""
    pad = gamma(p0.shape[-1] + 16)
    reach = row.reach.amax(-1, keepdim=True)
    rho = torch.minimum(reach, (r * forms.b_norm + row.eps).amax(-1, keepdim=True) + row.shift)
    ratio = torch.where(p0 > 0, row.dp / p0, torch.where(row.dp > 0, math.inf, 0.0))
    grow = 1 + ratio.amax(-1, keepdim=True) * (1 + pad)
    first = (r * forms.pb_top + row_norm(p0.sqrt() * row.eps).unsqueeze(-1)).square()
    moved = row.dp.amax(-1, keepdim=True) * row.n.square()
    var = torch.minimum(row.var, torch.minimum(grow * first, first + moved)) * (1 + pad)
    return _Segment(reach, rho, grow, var)


def softmax_cubic(row: _ScoreRow, p0: Tensor, w: Tensor, c_bar: Tensor, forms: ScoreForms,
                  r: Tensor) -> Tensor:
    """A bound of |R·c − ½φ″(0)| per value column (w = c − c̄, (…, L, S, E); c̄ = ⟨p⁰, c⟩,
    (…, L, E)), the third order of Taylor's theorem for φ(t) = ⟨p(s₀ + tΔ), c⟩:
    R·c = φ(1) − φ(0) − φ′(0) = ½φ″(0) + ∫₀¹ ½(1 − t)²φ‴(t)dt and φ″(0) = T₁. Along the
    segment p is an exponential family in t, d/dt E_p[f] = Cov_p(f, Δ), so φ′ = Cov(c, Δ),
    φ″ = E[c̃x²] and φ‴ = E[c̃x³] − 3·Cov(c, Δ)·V (c̃ = c − c̄_p, x = Δ − μ). With
    |c̃_j| ≤ ℓ, the range of c over the live keys, |x_j| ≤ ρ̂ and |Cov(c, Δ)| ≤ √(Var c·V):
    |φ‴| ≤ ℓ·ρ̂·V + 3√(Var c)·V^{3/2}, and |R·c − ½T₁| is at most a sixth of that. Here
    ρ̂ = min(max_j ρ_j, max_j (r‖b_j‖ + ε_j) + σ) (|Δ_j − μ| ≤ |(CΔ)_j| + |μ₀ − μ|);
    with g = max_j Δp_j/p⁰_j (p_j ≤ (1 + g)p⁰_j), V ≤ Σ_j p_j(Δ_j − μ₀)² is at most
    (1 + g)·Σ_j p⁰_j(CΔ)_j² and Σ_j p⁰_j(CΔ)_j² + max_j Δp_j·N², where
    √(Σ_j p⁰_j(CΔ)_j²) ≤ r‖√p⁰ ⊙ B‖₂ + ‖√p⁰ ⊙ ε‖ (V's first order is the centre's
    variance of the first-order score change, not the score box's); and
    Var c ≤ Σ_j p_j w_j² ≤ min((1 + g)·Σ_j p⁰_j w_j², ℓ²/4). T₁ here takes the computed p⁰
    (and c̄, μ₀ from it) for the exact softmax(s₀); the difference, a few roundings of each
    p⁰_j, is below 4γ·(ℓ + |c̄|)·max_j ρ_j² added."""
    pad = gamma(p0.shape[-1] + 16)
    seg = _segment(row, p0, forms, r)
    live_v = row.live.unsqueeze(-1)
    ell = (torch.where(live_v, w, -math.inf).amax(-2)
           - torch.where(live_v, w, math.inf).amin(-2)).clamp(min=0)
    var_c = torch.minimum(seg.grow * _by_key(w.square(), p0), ell.square() / 4) * (1 + pad)
    rounding = 4 * pad * (ell + c_bar.abs()) * seg.reach.square()
    cubic = (ell * seg.rho + 3 * (var_c * seg.var).sqrt()) * seg.var / 6 + rounding
    return cubic * (1 + pad)


def softmax_own_quadratic(p0: Tensor, p_lo: Tensor, p_hi: Tensor, d_lo: Tensor,
                          d_hi: Tensor, e_lo: Tensor, e_hi: Tensor, v0: Tensor,
                          forms: ScoreForms, radius: Tensor) -> Pair:
    """Bounds [lo, hi] of (R·V₀)_id, R softmax's own remainder at a reached point whose
    scores deviate by Δ = Aδ + e (A = ∂s_i/∂x at the centre, ‖δ‖ ≤ r, e ∈ [e_lo, e_hi]
    the scores' remainder, Δ ∈ [d_lo, d_hi]) with p ∈ [p_lo, p_hi] on the segment from s₀
    to s₀ + Δ; ``forms``: :func:`score_forms`; ``radius`` broadcasts against (…, L, 1).

    With c = V₀_{:,d}, R·c = ½φ″(τ) and φ″ = Σ_j p_j(c_j − c̄_p)(Δ_j − μ)² (p, μ = ⟨p, Δ⟩
    and c̄_p = ⟨p, c⟩ at a point of the segment; :func:`softmax_own_times`). Around the
    centre's p⁰, with w = c − c̄, c̄ = ⟨p⁰, c⟩, W = p⁰ ⊙ w and μ₀ = ⟨p⁰, Δ⟩, the second
    order is T₁ = Σ_j W_j(Δ_j − μ₀)² = φ″(0), a quadratic form in δ
    (:func:`_quadratic_part`), and R·c lies within ½(T₁ ± the rest), the rest bounded
    both by the exact expansion of φ″ − T₁ (:func:`_expansion_rest`) and by twice the
    third-order Taylor term (:func:`softmax_cubic`). Where Δ is mostly first order this
    bound is the quadratic form's eigenvalues, not every entry's worst case at once; in
    the first block of the demo's ViTs it is 6–25× below :func:`softmax_own_times`."""
    row = _score_row(p0, p_lo, p_hi, d_lo, d_hi, e_lo, e_hi, forms, radius)
    return _own_times_values(row, p0, v0, forms, radius)


def _own_times_values(row: _ScoreRow, p0: Tensor, v0: Tensor, forms: ScoreForms, r: Tensor
                      ) -> Pair:
    """:func:`softmax_own_quadratic` for a score row already summarised (:class:`_ScoreRow`)."""
    c_bar = p0 @ v0  # (…, L, E)
    w = v0.unsqueeze(-3) - c_bar.unsqueeze(-2)  # (…, L, S, E)
    weight = p0.unsqueeze(-1) * w
    t1_lo, t1_hi = _quadratic_part(row, weight, forms, r)
    rest = torch.minimum(_expansion_rest(row, w, weight, c_bar, forms, r),
                         2 * softmax_cubic(row, p0, w, c_bar, forms, r))
    pad = gamma(p0.shape[-1] + 16)
    lo = 0.5 * (t1_lo - rest) * (1 + pad) - pad * t1_hi.abs() - TINY
    hi = 0.5 * (t1_hi + rest) * (1 + pad) + pad * t1_lo.abs() + TINY
    return lo, hi


def softmax_own_norm(row: _ScoreRow, p0: Tensor, forms: ScoreForms, r: Tensor) -> Tensor:
    """A bound of ‖R_i‖₂ per query row (…, L, 1) for softmax's own remainder R of a score
    row (:class:`_ScoreRow`, ``forms`` and r as for :func:`softmax_cubic`). Along the
    segment, d/dt p_j = p_j x_j and d²p_j/dt² = p_j(x_j² − V) (x_j = Δ_j − μ; exponential
    family), so R = ∫₀¹ (1 − t)·p″(t)dt and ‖R‖ ≤ ½·sup_t ‖p ⊙ (x² − V)‖, where
    ‖p ⊙ x²‖ ≤ √(max_j p_j x_j²·Σ_j p_j x_j²) ≤ V and ‖p ⊙ V‖ = V‖p‖, and also
    ‖p ⊙ (x² − V)‖² ≤ max_j p_j·E[(x² − V)²] ≤ max_j p_j·ρ̂²V. With V and ρ̂ on the segment
    (:class:`_Segment`: V has the Gram matrices' first order) and p ≤ p⁰ + Δp there,
    ‖R_i‖ ≤ ½·min(V(1 + ‖p‖), √(max_j p_j)·ρ̂·√V): one bound for the row, where the
    elementwise enclosure lets every key take its worst case at once."""
    seg = _segment(row, p0, forms, r)
    p_top = torch.where(row.live, p0 + row.dp, 0.0) * (1 + 4 * U)
    by_var = seg.var * (1 + row_norm(p_top).unsqueeze(-1).clamp(max=1))
    by_reach = (p_top.amax(-1, keepdim=True) * seg.var).sqrt() * seg.rho
    return 0.5 * torch.minimum(by_var, by_reach) * (1 + gamma(p0.shape[-1] + 16)) + TINY


def softmax_second_order(p0: Tensor, p_lo: Tensor, p_hi: Tensor, d_lo: Tensor, d_hi: Tensor
                         ) -> tuple[Tensor, Tensor]:
    """Bounds [lo, hi] of softmax's own remainder R = p(s₀ + Δ) − p⁰ − J₀Δ over the last
    dimension, for Δ ∈ [d_lo, d_hi] and p ∈ [p_lo, p_hi] on the whole segment from s₀ to
    s₀ + Δ (masked entries, where p = 0, are ignored). Two bounds, intersected:

    * R = (J(ξ) − J₀)(Δ − κ) for any constant κ (both annihilate 1), and
      (J − J₀)w = (p − p⁰) ⊙ w − (p − p⁰)⟨p, w⟩ − p⁰⟨p − p⁰, w⟩, so with |w_j| ≤ ω_j,
      |R_i| ≤ Δp_i·ω_i + Δp_i·⟨p_hi, ω⟩ + p⁰_i·⟨Δp, ω⟩;
    * Taylor's theorem with the Lagrange remainder for t ↦ p_i(s₀ + tΔ), with
      ∂²p_i/∂s_j∂s_k = p_i(δ_ik − p_k)(δ_ij − p_j) − p_i·p_j(δ_jk − p_k):
      R_i = ½ΔᵀH_i(ξ)Δ = ½p_i(ξ)·[(Δ_i − μ)² − V], μ = Σ_j p_j(ξ)Δ_j, V = Σ_j p_j(ξ)(Δ_j − μ)²,
      so R_i ≤ ½p_hi_i·max (Δ_i − μ)² with μ ∈ [min_j d_lo_j, max_j d_hi_j], and
      R_i ≥ −½p_hi_i·V with V ≤ Σ_j p_hi_j·ω_j² and V ≤ (max_j d_hi_j − min_j d_lo_j)²/4
      (Popoviciu)."""
    live = p_hi > 0
    zero = torch.zeros((), dtype=F64)
    omega, reach, var = _lagrange_terms(p_hi, d_lo, d_hi)
    dp = torch.maximum(p_hi - p0, p0 - p_lo).clamp(min=0)
    k = p0.shape[-1]
    pad = 1 + gamma(k + 6)
    mv = (dp * omega + dp * (p_hi * omega).sum(-1, keepdim=True)
          + p0 * (dp * omega).sum(-1, keepdim=True)) * pad
    hi = torch.minimum(mv, 0.5 * p_hi * reach.square() * pad)
    lo = torch.maximum(-mv, -0.5 * p_hi * var * pad)
    return torch.where(live, lo, zero), torch.where(live, hi, zero)


def softmax_remainder(p0: Tensor, p_lo: Tensor, p_hi: Tensor, d_lo: Tensor, d_hi: Tensor,
                      e_lo: Tensor, e_hi: Tensor) -> tuple[Tensor, Tensor]:
    """The Taylor remainder of p = softmax(s) over the last dimension: e_p = J₀e_s + R with
    J₀v = p⁰ ⊙ (v − ⟨p⁰, v⟩) (|J₀|v ≤ p⁰ ⊙ (v + ⟨p⁰, v⟩) for v ≥ 0) and R the own remainder
    (:func:`softmax_second_order`; [p_lo, p_hi] must hold on every segment from the centre's
    scores to a reached one, as the enclosure over the score box does). ``d_lo``, ``d_hi``:
    the enclosure of Δs."""
    live = p_hi > 0
    zero = torch.zeros((), dtype=F64)
    r_lo, r_hi = softmax_second_order(p0, p_lo, p_hi, d_lo, d_hi)
    k = p0.shape[-1]
    ec, er = mid_rad(torch.where(live, e_lo, zero), torch.where(live, e_hi, zero))
    jc = p0 * (ec - (p0 * ec).sum(-1, keepdim=True))
    jr = p0 * (er + (p0 * er).sum(-1, keepdim=True))
    rad = jr + gamma(k + 4) * (jc.abs() + jr + (p0 * ec.abs()).sum(-1, keepdim=True))
    lo = jc - rad + r_lo - gamma(2) * r_lo.abs()
    hi = jc + rad + r_hi + gamma(2) * r_hi.abs()
    return torch.where(live, lo, zero), torch.where(live, hi, zero)


def softmax_own(p0: Tensor, p_lo: Tensor, p_hi: Tensor, d_lo: Tensor, d_hi: Tensor
                ) -> tuple[Tensor, Tensor]:
    """The op's own remainder of softmax, R = p − p⁰ − J₀Δs: :func:`softmax_remainder`
    with e_s = 0."""
    zero = torch.zeros_like(p0)
    return softmax_remainder(p0, p_lo, p_hi, d_lo, d_hi, zero, zero)


def _first_order(ctx: FwdCtx, name: str) -> Tensor | None:
    return ctx.first_order.get(name) if ctx.first_order is not None else None


def _tighten(value: Tensor, lo: Tensor, hi: Tensor, lin: Tensor | None, e_lo: Tensor,
             e_hi: Tensor) -> tuple[Tensor, Tensor]:
    """[lo, hi] ∩ (value ± lin + [e_lo, e_hi]) (lin: the first-order part r·‖A_row‖)."""
    if lin is None:
        return lo, hi
    return torch.maximum(lo, value - lin + e_lo), torch.minimum(hi, value + lin + e_hi)


@forward_rule(aten._softmax, aten.softmax)
def softmax_forward(ctx: FwdCtx, x: Box, dim: int, *args: Any) -> Box:
    """softmax's enclosure and Taylor remainder (module docstring, :func:`softmax_remainder`)."""
    d = dim % x.dim()
    last = x.dim() - 1

    def mv(t: Tensor) -> Tensor:
        return t.transpose(d, last)

    p0, p_lo, p_hi = softmax_box(mv(x.value), mv(x.lo), mv(x.hi))
    e_lo = e_hi = own_lo = own_hi = None
    if x.has_e:
        d_lo, d_hi = mv(x.lo - x.value), mv(x.hi - x.value)
        e_lo, e_hi = softmax_remainder(p0, p_lo, p_hi, d_lo, d_hi, mv(x.e_lo), mv(x.e_hi))
        e_lo, e_hi = mv(e_lo), mv(e_hi)
        own_lo, own_hi = (mv(t) for t in softmax_own(p0, p_lo, p_hi, d_lo, d_hi))
    return Box(mv(p0), mv(p_lo), mv(p_hi), None, None, e_lo, e_hi, None, own_lo, own_hi)


class AttentionParts(NamedTuple):
    """An attention call's scale c, probabilities at the centre and their enclosure, the
    kept entries (None: all), and with Taylor remainders: P's remainder e_P and own term
    own_P, the scores' remainder e_S and own term own_S, and the softmax's own term R_soft
    (P − P⁰ − J₀ΔS over the score enclosure), each as (lo, hi)."""

    c: float
    p0: Tensor
    p_lo: Tensor
    p_hi: Tensor
    keep: Tensor | None
    e_p: Pair | None = None
    own_p: Pair | None = None
    e_s: Pair | None = None
    own_s: Pair | None = None
    soft_own: Pair | None = None
    p_seg_hi: Tensor | None = None  # p's upper end over the score box (holds on segments)
    ds: Pair | None = None  # the scores' deviation S − S⁰
    p_seg_lo: Tensor | None = None  # p's lower end over the score box


def attention_parts(q: Any, k: Any, attn_mask: Any, is_causal: bool, scale: float | None,
                    ctx: FwdCtx | None = None, name: str | None = None) -> AttentionParts:
    """The :class:`AttentionParts` of an attention call: the score enclosure,
    masked, through :func:`softmax_box`. With a forward context and Taylor remainders of Q
    and K, the scores' remainder e_S = c(e_Q K₀ᵀ + Q₀e_Kᵀ + ΔQΔKᵀ) and the first-order parts
    of the scores and probabilities (``<name>.scores``, ``<name>.probs``) tighten both
    enclosures, e_P is :func:`softmax_remainder` and own_P the same for the scores' own
    term cΔQΔKᵀ alone (P's remainder as a function of Q and K at the centre); both None
    without Taylor remainders. With symbolic remainders (``ctx.tighten``) e_S and e_P are
    first intersected with their own terms ± the gains from the earlier ops' own terms
    (docs/local-margin.md, "Symbolic remainders"). The softmax's own terms use P's
    enclosure over the score box (it holds on the segments their derivation needs); the
    returned p_lo, p_hi are then narrowed by P's Taylor model (they hold at reached points).
    """
    L, E = q.shape[-2], q.shape[-1]
    S = k.shape[-2]
    c = float(scale) if scale is not None else 1.0 / math.sqrt(E)
    s0, s_lo, s_hi = score_box(q, k, c)
    es, es_own = _score_remainder(q, k, c, s0) if ctx is not None else (None, None)
    keep = None
    if attn_mask is not None:
        if isinstance(attn_mask, Box):
            raise LipcertError("an attention mask that depends on the model input")
        if attn_mask.dtype == torch.bool:
            keep = attn_mask
        else:
            add = attn_mask.to(F64)
            slack = gamma(2) * (s0.abs() + add.abs())
            s0, s_lo, s_hi = s0 + add, s_lo + add - slack, s_hi + add + slack
            if es is not None and es_own is not None:
                es = (es[0] - slack, es[1] + slack)
                es_own = (es_own[0] - slack, es_own[1] + slack)
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool).tril()
    e_p = own_p = None
    if es is not None and es_own is not None and ctx is not None and name is not None:
        if ctx.tighten is not None:
            narrowed = ctx.tighten(f"{name}.scores", Box(s0, s_lo, s_hi, None, None, *es,
                                                         None, *es_own))
            es = (narrowed.e_lo, narrowed.e_hi)
        s_lo, s_hi = _tighten(s0, s_lo, s_hi, _first_order(ctx, f"{name}.scores"), *es)
    p0, p_lo, p_hi = softmax_box(s0, s_lo, s_hi, keep)
    if es is not None and es_own is not None and ctx is not None and name is not None:
        e_p = softmax_remainder(p0, p_lo, p_hi, s_lo - s0, s_hi - s0, *es)
        if ctx.tighten is not None:
            own_p = softmax_remainder(p0, p_lo, p_hi, s_lo - s0, s_hi - s0, *es_own)
            narrowed = ctx.tighten(f"{name}.probs", Box(p0, p_lo, p_hi, None, None, *e_p,
                                                        None, *own_p))
            e_p = (narrowed.e_lo, narrowed.e_hi)
        # the softmax's remainders need p at every point of the segment from the centre's
        # scores to a reached one: such points lie in the score box, not necessarily in
        # the image of the input set, so they take the box's probabilities, not the
        # Taylor-narrowed ones below (which hold for the reached points only)
        own_p = softmax_remainder(p0, p_lo, p_hi, s_lo - s0, s_hi - s0, *es_own)
        soft_own = softmax_own(p0, p_lo, p_hi, s_lo - s0, s_hi - s0)
        p_seg_lo, p_seg_hi, ds = p_lo, p_hi, (s_lo - s0, s_hi - s0)
        p_lo, p_hi = _tighten(p0, p_lo, p_hi, _first_order(ctx, f"{name}.probs"), *e_p)
        p_lo, p_hi = p_lo.clamp(min=0), torch.minimum(p_hi, torch.ones((), dtype=F64))
        return AttentionParts(c, p0, p_lo, p_hi, keep, e_p, own_p, es, es_own, soft_own,
                              p_seg_hi, ds, p_seg_lo)
    return AttentionParts(c, p0, p_lo, p_hi, keep)


def _soft_times(parts: AttentionParts, v0: Tensor, w: Tensor, quad: Pair | None = None
                ) -> tuple[Tensor, Tensor]:
    """R_soft·(V₀ − w) (centre and radius) for the softmax's own term R_soft: the interval
    product, intersected with :func:`softmax_own_times` and with ``quad``
    (:func:`softmax_own_quadratic`, if given). R_soft's rows sum to 0, so R_soft·V₀ is the
    same matrix."""
    assert parts.soft_own is not None
    soft_c, soft_r = iv_matmul(mid_rad(*parts.soft_own), (v0 - w, None))
    lo, hi = soft_c - soft_r, soft_c + soft_r
    if parts.p_seg_hi is not None and parts.ds is not None:
        joint = softmax_own_times(parts.p_seg_hi, *parts.ds, v0)
        lo, hi = torch.maximum(lo, -joint), torch.minimum(hi, joint)
    if quad is not None:
        lo, hi = torch.maximum(lo, quad[0]), torch.minimum(hi, quad[1])
    return mid_rad(lo, torch.maximum(lo, hi))


def _through_softmax(parts: AttentionParts, s_rem: Pair, p_rem: Pair, v0: Tensor,
                     w: Tensor, y0: Tensor, soft: tuple[Tensor, Tensor]
                     ) -> tuple[Tensor, Tensor]:
    """A remainder of P carried to Y = P V₀ (centre and radius): p_rem·(V₀ − w), and, since
    p_rem = J₀·s_rem + R_soft comes from a remainder s_rem of the scores, also
    J_{Y←S}·s_rem + R_soft·(V₀ − w) with the exact centre Jacobian
    ∂Y_id/∂S_ij = P⁰_ij(V₀_jd − Y⁰_id): the softmax's Jacobian is not wrapped through
    |J₀| before meeting V₀. The intersection of both; ``soft``: R_soft·(V₀ − w) from
    :func:`_soft_times`."""
    c, r = iv_matmul(mid_rad(*p_rem), (v0 - w, None))
    lo, hi = c - r, c + r
    coef = parts.p0.unsqueeze(-1) * (v0.unsqueeze(-3) - y0.unsqueeze(-2))  # (…, L, S, E)
    coef_r = 4 * U * parts.p0.unsqueeze(-1) * (v0.abs().unsqueeze(-3) + y0.abs().unsqueeze(-2))
    sc, sr = mid_rad(*s_rem)
    ctr = torch.einsum("...ls,...lse->...le", sc, coef)
    rad = torch.einsum("...ls,...lse->...le", sr, coef.abs() + coef_r) + torch.einsum(
        "...ls,...lse->...le", sc.abs(), coef_r)
    rad = rad + 2 * gamma(sc.shape[-1] + 4) * (torch.einsum(
        "...ls,...lse->...le", sc.abs(), coef.abs()) + rad) + TINY
    soft_c, soft_r = soft
    lo = torch.maximum(lo, ctr + soft_c - rad - soft_r)
    hi = torch.minimum(hi, ctr + soft_c + rad + soft_r)
    return mid_rad(lo, torch.maximum(lo, hi))


def _score_remainder(q: Any, k: Any, c: float, s0: Tensor
                     ) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    """e_S = c(e_Q K₀ᵀ + Q₀e_Kᵀ + ΔQΔKᵀ) (a constant operand has no remainder), and the
    scores' own term cΔQΔKᵀ (0 if either operand is constant), each element also within
    c·‖Δq_i‖·‖Δk_j‖ (the rows' ℓ2 deviations, which keep the ball's geometry: on the demo's
    Lipschitz ViT about 12× below the elementwise sum in the first block); (None, None) if
    an operand's remainder is not tracked."""
    if (isinstance(q, Box) and not q.has_e) or (isinstance(k, Box) and not k.has_e):
        return None, None
    q0, k0 = _around_centre(q)[0], _around_centre(k)[0]
    e = q0.shape[-1]
    terms = []
    if isinstance(k, Box):
        terms.append(iv_matmul((q0, None), _bt_pair(k.e_mid_rad())))
    if isinstance(q, Box):
        terms.append(iv_matmul(q.e_mid_rad(), (_bt(k0), None)))
    own_c, own_r = torch.zeros_like(s0), torch.zeros_like(s0)
    if isinstance(q, Box) and isinstance(k, Box):
        own_c, own_r = iv_matmul(mid_rad(*q.delta()), _bt_pair(mid_rad(*k.delta())))
        # |Δq_i·Δk_j| ≤ ‖Δq_i‖·‖Δk_j‖ (Cauchy–Schwarz on the rows' ℓ2 deviations)
        rows = q.row_dev().unsqueeze(-1) * k.row_dev().unsqueeze(-2) * (1 + gamma(4))
        own_c, own_r = mid_rad(torch.maximum(own_c - own_r, -rows),
                               torch.minimum(own_c + own_r, rows))
        terms.append((own_c, own_r))
    slack = 2 * gamma(e + 4) * s0.abs() + TINY
    ctr = c * sum(t[0] for t in terms)
    rad = c * sum(t[1] for t in terms) + slack
    own_c, own_r = c * own_c, c * own_r + slack
    return (ctr - rad, ctr + rad), (own_c - own_r, own_c + own_r)


def _quadratic(ctx: FwdCtx, name: str | None, parts: AttentionParts, v0: Tensor
               ) -> tuple[Pair, Tensor] | None:
    """:func:`softmax_own_quadratic` and :func:`softmax_own_norm` for this call where the
    forward walk has the Gram matrices of its score rows (``ctx.grams``, dim 0 the sample)
    and the radii."""
    gram = ctx.grams.get(f"{name}.scores") if name is not None else None
    if gram is None or ctx.radius is None or parts.e_s is None or parts.ds is None \
            or parts.p_seg_lo is None or parts.p_seg_hi is None \
            or gram.shape != (*parts.p0.shape, parts.p0.shape[-1]):
        return None
    key = f"{name}.score_forms"
    if key not in ctx.memo:
        ctx.memo[key] = score_forms(gram, parts.p0, v0)
    forms = ctx.memo[key]
    if forms is None:
        return None
    radius = ctx.radius.reshape(-1, *([1] * (parts.p0.dim() - 1)))
    row = _score_row(parts.p0, parts.p_seg_lo, parts.p_seg_hi, *parts.ds, *parts.e_s, forms,
                     radius)
    return (_own_times_values(row, parts.p0, v0, forms, radius),
            softmax_own_norm(row, parts.p0, forms, radius).squeeze(-1))


def _bt_pair(p: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return _bt(p[0]), _bt(p[1])


@forward_rule(aten.scaled_dot_product_attention)
def sdpa_forward(ctx: FwdCtx, q: Any, k: Any, v: Any, attn_mask: Any = None,
                 dropout_p: float = 0.0, is_causal: bool = False, *,
                 scale: float | None = None, enable_gqa: bool = False) -> Box:
    """Y = P V: the centre value P⁰V⁰ and, since the rows of P − P⁰ sum to 0,
    |Y − Y⁰| ≤ |P − P⁰|·|V − w| + P⁰·|V − V⁰| (w the mean centre row of V, |V − w| from
    V's interval), intersected with the hull of the (kept) value rows. The same split gives
    ‖ΔY_i‖ ≤ Σ_j |ΔP_ij|·‖v_j − w‖ + Σ_j P⁰_ij·‖Δv_j‖ per row. Remainder:
    e_Y = P⁰e_V + e_P(V₀ − w) + ΔP(ΔV − c), since the rows of e_P and of ΔP sum to 0 (so any
    constant rows w, c may be subtracted). The op's own remainder (Y's remainder as a
    function of Q, K, V at the centre) is the same with e_Q = e_K = e_V = 0:
    own_P(V₀ − w) + ΔP(ΔV − c)."""
    if dropout_p:
        raise LipcertError("attention dropout in training mode: use model.eval()")
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        raise LipcertError("grouped-query attention has no rule yet")
    name = getattr(ctx.node, "name", None)
    parts = attention_parts(q, k, attn_mask, is_causal, scale, ctx, name)
    p0, p_lo, p_hi, keep = parts.p0, parts.p_lo, parts.p_hi, parts.keep
    e_p, own_p = parts.e_p, parts.own_p
    v0, dv = _around_centre(v)
    v_lo, v_hi = (v.lo, v.hi) if isinstance(v, Box) else (v0, v0)
    w = v0.mean(-2, keepdim=True)
    spread = torch.maximum((v_lo - w).abs(), (v_hi - w).abs())
    dp = torch.maximum(p_hi - p0, p0 - p_lo)
    value = p0 @ v0
    dev = dp @ spread + p0 @ dv
    S = v0.shape[-2]
    err = 2 * gamma(S + 4) * (p0 @ v0.abs() + dev) + TINY
    lo, hi = value - dev - err, value + dev + err
    if keep is None:
        lo = torch.maximum(lo, v_lo.amin(-2, keepdim=True))
        hi = torch.minimum(hi, v_hi.amax(-2, keepdim=True))
    else:
        inf = torch.tensor(math.inf, dtype=F64)
        k3 = keep.unsqueeze(-1)
        lo = torch.maximum(lo, torch.where(k3, v_lo.unsqueeze(-3), inf).amin(-2))
        hi = torch.minimum(hi, torch.where(k3, v_hi.unsqueeze(-3), -inf).amax(-2))
    pad = 2 * gamma(S + 4) * torch.maximum(lo.abs(), hi.abs())
    rv = v.row_dev() if isinstance(v, Box) else torch.zeros(v0.shape[:-1], dtype=F64)
    rdev = (dp @ row_norm(spread).unsqueeze(-1) + p0 @ rv.unsqueeze(-1)).squeeze(-1)
    e_lo = e_hi = own_lo = own_hi = own_rows = None
    if e_p is not None and own_p is not None and (not isinstance(v, Box) or v.has_e):
        slack = err + 2 * U * (v0.abs() + w.abs()).amax(-2, keepdim=True)
        quad = _quadratic(ctx, name, parts, v0)
        soft = _soft_times(parts, v0, w, quad[0] if quad is not None else None)
        own = [_through_softmax(parts, parts.own_s, own_p, v0, w, value, soft)]
        terms = [_through_softmax(parts, parts.e_s, e_p, v0, w, value, soft)]
        if isinstance(v, Box):
            terms.append(iv_matmul((p0, None), v.e_mid_rad()))
            dv_c, dv_r = mid_rad(*v.delta())
            shift = dv_c.mean(-2, keepdim=True)
            both = iv_matmul(mid_rad(p_lo - p0, p_hi - p0),
                             (dv_c - shift, dv_r + 2 * U * (dv_c.abs() + shift.abs())))
            terms.append(both)
            own.append(both)
        ctr = sum(t[0] for t in terms)
        rad = sum(t[1] for t in terms) + slack
        e_lo, e_hi = ctr - rad, ctr + rad
        ctr = sum(t[0] for t in own)
        rad = sum(t[1] for t in own) + slack
        own_lo, own_hi = ctr - rad, ctr + rad
        radius = None if ctx.radius is None else ctx.radius.reshape(
            -1, *([1] * (value.dim() - 2)))
        assert parts.soft_own is not None
        soft_rows = row_norm(torch.maximum(parts.soft_own[0].abs(), parts.soft_own[1].abs()))
        if quad is not None:
            soft_rows = torch.minimum(soft_rows, quad[1])
        rows = attention_rows.own_rows(parts.c, p0, dp, soft_rows, q, k, v, v0, value, soft,
                                       radius, _reads(ctx, q, k, v))
        own_rows = torch.minimum(row_norm(torch.maximum(own_lo.abs(), own_hi.abs())),
                                 rows + row_norm(slack))
    aux = {"p0": p0, "p_lo": p_lo, "p_hi": p_hi}
    if e_p is not None:
        aux["pe_lo"], aux["pe_hi"] = e_p
    return Box(value, lo - pad, hi + pad, None, rdev * (1 + 2 * gamma(S + 4)), e_lo, e_hi,
               aux, own_lo, own_hi, own_rows=own_rows)


def _reads(ctx: FwdCtx, q: Any, k: Any, v: Any) -> Reads | None:
    """:class:`~lipcert.bounds.backward.rules.attention_rows.Reads` of this call where Q, K
    and V are Boxes with their rows' first-order parts (``Box.lin_rows``) and Taylor
    remainders, and the walk knows the units their rows read and the query and key rows'
    Gram matrices (``FwdCtx.units``, ``FwdCtx.row_grams``)."""
    node = ctx.node
    boxes = (q, k, v)
    if node is None or not all(isinstance(x, Box) and x.lin_rows is not None and x.has_e
                               for x in boxes):
        return None
    names = [getattr(a, "name", None) for a in node.args[:3]]
    units = [ctx.units.get(n) if n is not None else None for n in names]
    grams = [ctx.row_grams.get(n) if n is not None else None for n in names[:2]]
    for x, u in zip(boxes, units, strict=True):
        if u is None or u.shape[1:] != x.lin_rows.shape[1:]:
            return None
    for x, gram in zip(boxes[:2], grams, strict=True):
        if gram is None or gram.shape != (*x.shape, x.shape[-1]):
            return None
    key = f"{node.name}.reads"
    if key not in ctx.memo:
        ctx.memo[key] = attention_rows.reads(*units, *grams)
    return ctx.memo[key]
