"""Row norms of attention's own remainder (``Box.own_rows``; derivations in
docs/local-margin.md, "Symbolic remainders": row norms of the own terms).

Y = softmax(c·QKᵀ + mask)V has, as a function of (Q, K, V) at the centre, the own remainder
R = J_{Y←S}·own_S + R_soft·V₀ + ΔP·ΔV (own_S = c·ΔQΔKᵀ, R_soft the softmax's own term),
and :func:`own_rows` bounds ‖R_i‖₂ per query row. Cauchy–Schwarz over the keys with the
deviations' Frobenius norms keeps the keys from all deviating at their worst at once; where
the input pass knows the first-order parts of Q, K and V row by row (:class:`Reads`: the
input units each row's Jacobian reads and the query and key rows' Gram matrices), the
products also share one budget: the query's and the keys' deviations cannot each take the
whole radius at once when they read different parts of the input (:func:`budget_split`;
before the first token mixing each row reads its own patch or token).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lipcert.bounds.backward.interval import Box, row_norm
from lipcert.bounds.state import F64, gamma

U = 2.0**-53


class KeyOverlap(NamedTuple):
    """How the input units U_i read by query row i meet the units V_j read by key (or
    value) row j: ``near`` (…, L, S), U_i ∩ V_j ≠ ∅; ``outside`` (…, L, S), V_j ⊄ U_i;
    ``most`` (…, L), the most keys that read one unit outside U_i (0 where U_i holds every
    unit)."""

    near: Tensor
    outside: Tensor
    most: Tensor


def key_overlap(units_q: Tensor, units_k: Tensor) -> KeyOverlap:
    """:class:`KeyOverlap` of query and key rows whose centre Jacobians read the input units
    ``units_q`` (units, …, L) and ``units_k`` (units, …, S) (bool)."""
    uq, uk = units_q.to(F64), units_k.to(F64)
    near = torch.einsum("u...l,u...s->...ls", uq, uk) > 0
    outside = torch.einsum("u...l,u...s->...ls", 1 - uq, uk) > 0
    count = uk.sum(-1, keepdim=True)  # (units, …, 1)
    most = torch.where(units_q, 0.0, count).amax(0)
    return KeyOverlap(near, outside, most)


class Reads(NamedTuple):
    """The first-order parts of one attention call's Q, K and V rows, as the input pass
    recorded them (x_row − x₀_row = A_row·δ + e_row, A_row reading only some input units):
    the overlaps of the queries' units with the keys' and with the values'
    (:class:`KeyOverlap`), the keys' and values' units (units, …, S), and the Gram
    matrices A_rowA_rowᵀ of the query and key rows (n, …, L or S, E, E)."""

    keys: KeyOverlap
    values: KeyOverlap
    units_k: Tensor
    units_v: Tensor
    gram_q: Tensor
    gram_k: Tensor


def reads(units_q: Tensor, units_k: Tensor, units_v: Tensor, gram_q: Tensor,
          gram_k: Tensor) -> Reads:
    """:class:`Reads` from the units of the query, key and value rows and the query and
    key rows' Gram matrices."""
    return Reads(key_overlap(units_q, units_k), key_overlap(units_q, units_v), units_k,
                 units_v, gram_q, gram_k)


def budget_split(first: Tensor, w: Tensor, overlap: KeyOverlap) -> Tensor:
    """max over ‖δ‖ ≤ r of (first/r)·s·Σ_j (w_j/r)·t_j per query row (…, L), where
    s = ‖δ_{U_i}‖ and t_j = ‖δ_{V_j}‖ (``first`` (…, L) and ``w`` (…, L, S) ≥ 0, each
    carrying one factor r). A key whose units meet U_i has t_j ≤ s + ‖δ_{V_j∖U_i}‖, any
    other t_j = ‖δ_{V_j∖U_i}‖, and Σ_j ‖δ_{V_j∖U_i}‖² ≤ m_i(r² − s²) (``overlap.most``),
    so by Cauchy–Schwarz over the keys with V_j ⊄ U_i, Σ_j w_j t_j ≤ αs + β√(r² − s²)
    (α = Σ_{near} w_j, β = √(m_i Σ_{outside} w_j²)), and with s = r·cos θ the maximum of
    s(αs + β√(r² − s²)) is r²(α + √(α² + β²))/2: here first·(α + √(α² + β²))/2."""
    alpha = (w * overlap.near).sum(-1)
    beta = (overlap.most * (w.square() * overlap.outside).sum(-1)).sqrt()
    return first * (alpha + (alpha.square() + beta.square()).sqrt()) / 2 * (
        1 + gamma(w.shape[-1] + 8))


def heaviest_unit(units: Tensor, w: Tensor) -> Tensor:
    """max_u Σ_{j: row j reads unit u} w_j per query row (…, L) (``units`` (units, …, S),
    ``w`` (n, …, L, S) ≥ 0): Σ_j w_j‖δ_{V_j}‖² = Σ_u ‖δ_u‖²·Σ_{j ∋ u} w_j is at most r²
    times it."""
    per = torch.einsum("u...s,n...ls->un...l", units.to(F64), w)
    return per.amax(0) * (1 + gamma(w.shape[-1] + 2))


def _largest_count(units: Tensor) -> Tensor:
    """The most rows that read one input unit (…): Σ_j ‖δ_{V_j}‖² ≤ that·‖δ‖²."""
    return units.to(F64).sum(-1).amax(0)


def _query_sensitivity(gram_q: Tensor, u: Tensor) -> Tensor:
    """g_ij ≥ ‖A_iᵀu_ij‖ = √(u_ijᵀG_iu_ij) (…, L, S) for the query rows' Gram matrices G_i
    (n, …, L, E, E) and directions u (n, …, L, S, E), rounded up: G carries a relative
    error below 1e-9 (``jacobian.py``) and |G_ab| ≤ max_a G_aa, so
    10⁻⁸·max_a G_aa·(Σ|u|)² covers it and the float sum."""
    form = torch.einsum("...lse,...lef,...lsf->...ls", u, gram_q, u)
    top = torch.diagonal(gram_q, dim1=-2, dim2=-1).amax(-1, keepdim=True)  # (…, L, 1)
    return _rounded_root(form, top * u.abs().sum(-1).square())


def _key_sensitivity(gram_k: Tensor, q0: Tensor) -> Tensor:
    """γ_ij ≥ ‖B_jᵀQ₀_i‖ = √(Q₀_iᵀH_jQ₀_i) (…, L, S) for the key rows' Gram matrices H_j
    (n, …, S, E, E) and the centre queries Q₀ (n, …, L, E), rounded up as in
    :func:`_query_sensitivity`."""
    form = torch.einsum("...le,...sef,...lf->...ls", q0, gram_k, q0)
    top = torch.diagonal(gram_k, dim1=-2, dim2=-1).amax(-1).unsqueeze(-2)  # (…, 1, S)
    return _rounded_root(form, top * q0.abs().sum(-1, keepdim=True).square())


def _rounded_root(form: Tensor, scale: Tensor) -> Tensor:
    """√form rounded up, form a computed quadratic form uᵀGu whose error (G's and the sum's)
    is below 10⁻⁸·``scale`` (scale = max_a G_aa·(Σ|u|)²)."""
    return (form.clamp(min=0) * (1 + 4 * U) + 1e-8 * scale).sqrt() * (1 + 4 * U)


def _no_nan(bound: Tensor) -> Tensor:
    """A bound with NaN (from ∞·0 where a radius or deviation is unbounded) made ∞."""
    return torch.where(torch.isnan(bound), torch.inf, bound)


def _e_abs(x: Box) -> Tensor:
    """|e| ≤ this elementwise for the Taylor remainder e of a Box."""
    assert x.e_lo is not None and x.e_hi is not None
    return torch.maximum(x.e_lo.abs(), x.e_hi.abs())


def split_scores(c: float, q: Box, k: Box, a: Tensor, k_frob: Tensor, overlap: KeyOverlap
                 ) -> Tensor:
    """A bound of c·Σ_j a_ij‖ΔQ_i‖·‖ΔK_j‖ per query row (…, L) (``a`` (…, L, S) ≥ 0,
    ``k_frob`` ≥ ‖ΔK‖_F). ΔQ_i = A_iδ + e_i with A_i reading the units U_i, so
    ‖ΔQ_i‖ ≤ q_i·s + ‖e_i‖ (s = ‖δ_{U_i}‖, r·q_i = ``q.lin_rows``), and likewise
    ‖ΔK_j‖ ≤ k_j·t_j + ‖f_j‖: the first-order product is :func:`budget_split` of
    (r·q_i, r·a_ij·k_j), and q_i·r·Σ_j a_ij‖f_j‖ + ‖e_i‖·‖a_i‖·‖ΔK‖_F cover the rest. Where
    each query and key read their own patch (a ViT's first block) the query's and the
    other keys' deviations share one budget: up to half the product c‖ΔQ_i‖·‖a_i‖·‖ΔK‖_F."""
    assert q.lin_rows is not None and k.lin_rows is not None
    e_q, e_k = row_norm(_e_abs(q)), row_norm(_e_abs(k))
    first = budget_split(q.lin_rows, a * k.lin_rows.unsqueeze(-2), overlap)
    rest = q.lin_rows * (a * e_k.unsqueeze(-2)).sum(-1) + e_q * row_norm(a) * k_frob
    return _no_nan(c * (first + rest) * (1 + gamma(a.shape[-1] + 8)))


def split_probs(c: float, p0: Tensor, soft_rows: Tensor, q: Box, k: Box, v: Box,
                v_frob: Tensor, radius: Tensor, seen: Reads) -> Tensor:
    """A bound of ‖(ΔP·ΔV)_i‖ per query row (…, L) that follows the first-order parts of
    ΔP into Q and K. With ΔS = c(ΔQK₀ᵀ + Q₀ΔKᵀ + ΔQΔKᵀ) and ΔP_i = J₀ΔS_i + R_i (J₀ the
    softmax's Jacobian at the centre, R_i its own term over the score box, ‖R_i‖ at most
    ``soft_rows``),
    (J₀ΔS_i)_j = p⁰_j(ΔS_ij − Σ_l p⁰_lΔS_il), so with K̄ = Σ_l p⁰_lK₀_l and u_j = K₀_j − K̄

        (ΔP·ΔV)_i = c·Σ_j p⁰_j[ΔQ_i·u_j + Q₀_i·ΔK_j + ΔQ_i·(ΔK_j − ΔK̄)]ΔV_j
                    − c·(Q₀_i·ΔK̄)·Σ_j p⁰_jΔV_j + Σ_j R_ijΔV_j   (ΔK̄ = Σ_l p⁰_lΔK_l),

    and since Σ_j p⁰_j(Q₀_i·ΔK_j − Q₀_i·ΔK̄)ΔV_j = Σ_j p⁰_j(Q₀_i·ΔK_j)(ΔV_j − ΔV̄)
    (ΔV̄ = Σ_l p⁰_lΔV_l; a row whose attention sits on one key moves little), with
    ‖ΔV_j − ΔV̄‖ ≤ (1 − p⁰_j)‖ΔV_j‖ + Σ_{l≠j} p⁰_l‖ΔV_l‖, each term is bounded with the
    rows' first-order parts x_row − x₀_row = A_row·δ + e_row:

    * |ΔQ_i·u_j| ≤ g_ij·s + Σ_d |u_jd|·|e_id| (g_ij = ‖A_iᵀu_j‖ from the Gram matrix) and
      ‖ΔV_j‖ ≤ v_j·t′_j + ‖e′_j‖: :func:`budget_split` of (r, r·p⁰_j g_ij v_j) over the
      queries' and values' units, plus r·Σ_j p⁰_j g_ij‖e′_j‖ and the e part times ‖ΔV_j‖;
    * |Q₀_i·ΔK_j| ≤ γ_ij·t_j + Σ_d |Q₀_id|·|f_jd| (γ_ij = ‖B_jᵀQ₀_i‖): with
      t_j t′_j ≤ (t_j² + t′_j²)/2 and Σ_j w_j t_j² ≤ r²·max_u Σ_{j ∋ u} w_j
      (:func:`heaviest_unit`), Σ_j p⁰_j(1 − p⁰_j)γ_ij v_j t_j t′_j ≤ r²/2·(that over the
      keys' units + that over the values'); the keys' and other values' cross term
      Σ_{j≠l} M_jl t_j t′_l (M_jl = p⁰_jγ_ij·p⁰_l v_l) ≤ ‖M‖_F·‖t‖·‖t′‖ with
      ‖t‖ ≤ √m_K·r, ‖t′‖ ≤ √m_V·r (m: the most rows reading one unit), and where each key
      reads the units of its value (t = t′), ≤ λ_max((M + Mᵀ)/2)⁺·m·r² (eigvalsh's error
      is far below the 10⁻¹⁰‖M‖_F added); plus the remainders' parts;
    * the third-order term by the rows' deviations,
      c‖ΔQ_i‖·Σ_j p⁰_j(‖ΔK_j‖ + Σ_l p⁰_l‖ΔK_l‖)‖ΔV_j‖, and ‖Σ_j R_ijΔV_j‖ ≤ ‖R_i‖·‖ΔV‖_F.

    K̄ and u are computed in float: |u − u_exact| ≤ 4(S + 2)U·max_l‖K₀_l‖ meets ΔQ_i.
    ``radius`` broadcasts against (…, L)."""
    assert v.lin_rows is not None
    r = radius
    q0, k0 = q.value, k.value
    k_bar = p0 @ k0  # (…, L, E)
    u = k0.unsqueeze(-3) - k_bar.unsqueeze(-2)  # (…, L, S, E)
    S = k0.shape[-2]
    slip = 4 * (S + 2) * U * row_norm(k0).amax(-1, keepdim=True)  # (…, 1)
    g = _query_sensitivity(seen.gram_q, u)
    v_dev, v_rem = v.row_dev(), row_norm(_e_abs(v))
    pv_dev = p0 * v_dev.unsqueeze(-2)  # (…, L, S)
    h = torch.einsum("...lsd,...ld->...ls", u.abs(), _e_abs(q))
    by_query = (budget_split(r.expand(p0.shape[:-1]), p0 * g * v.lin_rows.unsqueeze(-2),
                             seen.values)
                + r * (p0 * g * v_rem.unsqueeze(-2)).sum(-1) + (h * pv_dev).sum(-1)
                + slip * q.row_dev() * pv_dev.sum(-1))
    gam = _key_sensitivity(seen.gram_k, q0)
    theta = torch.einsum("...ld,...sd->...ls", q0.abs(), _e_abs(k))
    rest = (1 - p0).clamp(min=0) + 8 * U  # ≥ 1 − p⁰_j = Σ_{l≠j} p⁰_l
    w = p0 * rest * gam * v.lin_rows.unsqueeze(-2)
    by_key = (r / 2 * (heaviest_unit(seen.units_k, w) + heaviest_unit(seen.units_v, w))
              + r * (p0 * rest * gam * v_rem.unsqueeze(-2)).sum(-1)
              + (theta * rest * pv_dev).sum(-1))
    pg = p0 * gam
    pair = pg.unsqueeze(-1) * (p0 * v.lin_rows.unsqueeze(-2)).unsqueeze(-2)  # (…, L, S, S)
    pair = pair * ~torch.eye(p0.shape[-1], dtype=torch.bool)
    frob = pair.square().sum((-2, -1)).sqrt() * (1 + gamma(2 * p0.shape[-1] + 4))
    if torch.equal(seen.units_k, seen.units_v):
        finite = torch.isfinite(frob).unsqueeze(-1).unsqueeze(-1)
        sym = torch.where(finite, (pair + pair.transpose(-1, -2)) / 2, 0.0)
        top = torch.linalg.eigvalsh(sym)[..., -1]
        cross = _largest_count(seen.units_k).unsqueeze(-1) * (
            top.clamp(min=0) * (1 + 4 * U) + 1e-10 * frob)
    else:
        cross = (_largest_count(seen.units_k) * _largest_count(seen.units_v)).sqrt(
        ).unsqueeze(-1) * frob
    by_others = (r * cross
                 + r * pg.sum(-1) * (p0 * v_rem.unsqueeze(-2)).sum(-1)
                 + (p0 * theta).sum(-1) * pv_dev.sum(-1))
    q_dev, k_dev = q.row_dev(), k.row_dev()
    pk_dev = p0 * k_dev.unsqueeze(-2)
    third = q_dev * ((pk_dev * v_dev.unsqueeze(-2)).sum(-1) + pk_dev.sum(-1) * pv_dev.sum(-1))
    own = soft_rows * v_frob
    total = c * (by_query + by_key + by_others + third) + own
    return _no_nan(total * (1 + gamma(p0.shape[-1] + k0.shape[-1] + 16)))


def own_rows(c: float, p0: Tensor, dp: Tensor, soft_rows: Tensor | None,
             q: Box | Tensor, k: Box | Tensor, v: Box | Tensor, v0: Tensor, y0: Tensor,
             soft: tuple[Tensor, Tensor], radius: Tensor | None, seen: Reads | None
             ) -> Tensor:
    """A bound of ‖R_i‖₂ per output row for the op's own remainder
    R = J_{Y←S}·own_S + R_soft·V₀ + ΔP·ΔV (module docstring), with own_S = c·ΔQΔKᵀ:

    * ‖(J_{Y←S}·own_S)_i‖ = c‖Σ_j P⁰_ij(V₀_j − Y⁰_i)(ΔQ_i·ΔK_j)‖
      ≤ c‖ΔQ_i‖·Σ_j a_ij‖ΔK_j‖ ≤ c‖ΔQ_i‖·‖a_i‖₂·‖ΔK‖_F, a_ij = P⁰_ij‖V₀_j − Y⁰_i‖;
    * ‖(ΔP·ΔV)_i‖ ≤ Σ_j |ΔP_ij|·‖ΔV_j‖ ≤ ‖ΔP_i‖₂·‖ΔV‖_F (``dp`` ≥ |ΔP|);
    * ‖(R_soft·V₀)_i‖: the norm of its elementwise enclosure ``soft``.

    Cauchy–Schwarz over the keys with ‖ΔK‖_F, ‖ΔV‖_F (per sample and head,
    :func:`frobenius`) keeps the keys from all deviating at their worst at once, which
    the elementwise products allow: before the first token mixing each key depends on its
    own patch or token only, so ‖ΔK‖_F is about the largest ‖ΔK_j‖, not their sum. With
    ``seen`` (:class:`Reads`) the first two parts are also bounded by :func:`split_scores`
    and :func:`split_probs`, the smaller kept."""
    heads = y0.shape[:-2]
    p0 = p0.expand(*heads, *p0.shape[-2:])
    spread = torch.linalg.vector_norm(v0.unsqueeze(-3) - y0.unsqueeze(-2), dim=-1)
    a_keys = p0 * spread * (1 + gamma(v0.shape[-1] + 8))  # a_ij, rounded up
    q_rows = q.row_dev() if isinstance(q, Box) else torch.zeros(heads + y0.shape[-2:-1],
                                                                   dtype=F64)
    k_frob = frobenius(k, heads).unsqueeze(-1)
    v_frob = frobenius(v, heads).unsqueeze(-1)
    scores = c * q_rows * row_norm(a_keys) * k_frob
    probs = row_norm(dp.expand_as(p0)) * v_frob
    if seen is not None and isinstance(q, Box) and isinstance(k, Box):
        scores = torch.minimum(scores, split_scores(c, q, k, a_keys, k_frob, seen.keys))
        if isinstance(v, Box) and soft_rows is not None and radius is not None:
            probs = torch.minimum(probs, split_probs(c, p0, soft_rows, q, k, v, v_frob,
                                                     radius, seen))
    soft_c, soft_r = soft
    return (scores + probs) * (1 + gamma(4)) + row_norm(soft_c.abs() + soft_r)


def frobenius(x: Box | Tensor, heads: torch.Size) -> Tensor:
    """A bound of ‖ΔX‖_F per sample and head (shape ``heads``, the leading dimensions of X
    without its last two): the smallest of the rows' √Σ‖Δx_j‖², the sample's ℓ2 deviation
    (``Box.l2``) and the matrix deviation from the Taylor model (``Box.mdev``,
    ``forward.py``); 0 for a constant."""
    if not isinstance(x, Box):
        return torch.zeros(heads, dtype=F64)
    by_rows = row_norm(x.row_dev())
    if x.l2 is not None:
        by_rows = torch.minimum(by_rows, x.l2.reshape(-1, *([1] * (by_rows.dim() - 1))))
    if x.mdev is not None:
        by_rows = torch.minimum(by_rows, x.mdev)
    return by_rows.expand(heads)
