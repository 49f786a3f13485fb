"""scaled_dot_product_attention, bounded per (head, token) vector in the max-token norm.

One attention matrix (one batch entry and head): queries q_i, keys k_j, values v_j, scores
s_ij = c·q_i·k_j (c the scale, default 1/√E), p_i = softmax_j(s_ij) over the allowed j
(causal or boolean masks only remove j; additive masks are constants), y_i = Σ_j p_ij v_j.
Perturbing the inputs (docs/attention.md, "What the certificate engine computes"):

    dy_i = Σ_j p_ij dv_j + Σ_j p_ij (v_j − v̄_i)(ds_ij − a_i)

for any a_i (Σ_j p_ij (v_j − v̄_i) = 0), with ds_ij = c(dq_i·k_j + q_i·dk_j). Choosing
a_i = c·dq_i·m_k for a fixed centre m_k gives |ds_ij − a_i| ≤ c(‖dq_i‖·ρ_k + R_q·‖dk_j‖) with
ρ_k = max_j ‖k_j − m_k‖ and R_q = max ‖q_i‖. By Cauchy–Schwarz with weights p_ij and
Σ_j p_ij ‖v_j − v̄_i‖² ≤ Σ_j p_ij ‖v_j − m_v‖² ≤ ρ_v² (the weighted variance is smallest
about the mean):

    ‖dy_i‖ ≤ max_j ‖dv_j‖ + ρ_v·c·(‖dq_i‖·ρ_k + R_q·max_j ‖dk_j‖)

so lip_tok ≤ lip_tok(v) + ρ_v·c·(lip_tok(q)·ρ_k + R_q·lip_tok(k)), with R from ``tok_norm``
and ρ ≤ R (centre 0), or the half-diagonal of the rows' bounding box about its centre, or
(local mode) max_j ‖v_j⁰ − mean_j v_j⁰‖ + lip_tok·r. Whole tensor (L queries per matrix):
‖P dV‖_F ≤ ‖P‖₂‖dV‖_F ≤ √(max column sum)·‖dV‖_F (Schur: ‖P‖₂² ≤ ‖P‖₁‖P‖_∞ and rows
sum to 1), and the key term Σ_i Σ_j p_ij ‖dk_j‖² ≤ (max column sum)·‖dK‖_F², so
lip ≤ κ·lip(v) + ρ_v·c·(ρ_k·lip(q) + κ·R_q·lip(k)) with κ² a bound of the column sums.
Columns sum to at most L. The shifted scores t_ij = c·q_i·(k_j − m_k) give the same
softmax and |t_ij| ≤ B = c·R_q·ρ_k. With the additive mask a_ij (0 or −inf for boolean and
causal masks, 0 without a mask), p_ij = e^{t_ij + a_ij} / Σ_l e^{t_il + a_il} ≤ e^{2B}·A_ij
for A = softmax_j(a_ij), so every column sums to at most e^{2B}·max_j Σ_i A_ij:
κ = min(√L, e^B·√(max_j Σ_i A_ij)). Without a mask A_ij = 1/S and this is e^B·√(L/S); for a
causal mask (A_ij = 1/(i+1), j ≤ i) it is e^B·√(1 + 1/2 + … + 1/L). For bounded scores
(small B) this is about 1 instead of √L: attention is then close to an average, which is
non-expansive. Each output row is a convex combination of value rows: its interval is the
hull of theirs (causal: of j ≤ i) and its norm is ≤ R_v; a row whose keys are all masked
is 0 (as torch computes it), so its interval also holds 0. With unit weights and R = √d
this is the paper's one-head bound ‖W_V‖(1 + 2R²‖A‖); several heads are merged later by
the reshape rule (× √H per token).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.errors import UnsupportedOpError
from lipcert.bounds.registry import rule
from lipcert.bounds.rules.shape import broadcast, gather_core
from lipcert.bounds.state import (
    F64,
    Bound,
    Ctx,
    U,
    gamma,
    reduce_sid,
    sample_max,
    unify_sid,
)

aten = torch.ops.aten


def centred_radius(ctx: Ctx, x: Bound, msid: Tensor | None) -> Tensor:
    """Per sample, ρ = max_j ‖x_j − m‖ over the rows j of each matrix (last two dims) for a
    fixed centre m per matrix: the bounding-box centre, and in local mode also the mean of
    the centre values; at most ``tok_norm`` (m = 0)."""
    lo, hi = x.lo, x.hi
    rho = x.tok_norm
    if bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        m = (lo.amin(-2, keepdim=True) + hi.amax(-2, keepdim=True)) / 2
        dev = torch.maximum((lo - m).abs(), (hi - m).abs())
        row = (dev.square().sum(-1) * (1 + gamma(x.shape[-1]))).sqrt().amax(-1)
        rho = torch.minimum(rho, sample_max(row * (1 + 1e-15), msid, ctx.n))
    if ctx.local and x.value is not None:
        assert ctx.radius is not None
        v = x.value
        dv = v - v.mean(-2, keepdim=True)
        row = torch.linalg.vector_norm(dv, dim=-1).amax(-1) * (1 + gamma(x.shape[-1] + 2))
        move = x.lip_tok * ctx.radius
        rho = torch.minimum(rho, sample_max(row, msid, ctx.n) + move)
    return rho


def mask_mass(attn_mask: Any, is_causal: bool, n_q: int, n_k: int
              ) -> tuple[float, Tensor | None]:
    """(κ₀², dead rows) of a mask: κ₀² = max_j Σ_i A_ij for A = softmax over the keys of
    the additive mask (0 / −inf for a boolean or causal mask; A_ij = 1/S without one) of
    n_q queries and n_k keys, an
    upper bound of every column sum of the attention matrix divided by e^{2B} (module
    docstring), rounded up; dead: the rows (…, L) whose keys are all masked (``None`` if
    there are none), where the output is 0."""
    if attn_mask is None and not is_causal:
        return n_q / n_k, None
    if is_causal:
        add = torch.zeros(n_q, n_k, dtype=F64).masked_fill(
            ~torch.ones(n_q, n_k, dtype=torch.bool).tril(), -math.inf)
    else:
        m = attn_mask.t
        if m.dtype == torch.bool:
            add = torch.zeros(m.shape, dtype=F64).masked_fill(~m, -math.inf)
        else:
            add = m.detach().to(F64)
            if bool((torch.isnan(add) | (add == math.inf)).any()):
                raise UnsupportedOpError("an attention mask with NaN or +inf entries")
        add = add.expand(torch.broadcast_shapes(add.shape, (n_q, n_k)))
    dead = torch.isneginf(add).all(-1)
    A = torch.nan_to_num(torch.softmax(add, dim=-1), nan=0.0)
    mass = float(A.sum(-2).amax()) * (1 + gamma(n_q + n_k + 8))
    return mass, dead if bool(dead.any()) else None


@rule(aten.scaled_dot_product_attention)
def sdpa(
    ctx: Ctx,
    q: Any,
    k: Any,
    v: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Bound:
    """Attention, see the module docstring for the derivation."""
    if isinstance(attn_mask, Bound):
        raise UnsupportedOpError("an attention mask that depends on the model input")
    if dropout_p:
        raise UnsupportedOpError("attention dropout in training mode: use model.eval()")
    q, k, v = ctx.to_bound(q), ctx.to_bound(k), ctx.to_bound(v)
    if enable_gqa and k.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]

        def rep_fn(ts: list[Tensor]) -> Tensor:
            return ts[0].repeat_interleave(rep, dim=-3)

        k = gather_core(ctx, rep_fn, [k], ctx.key("gqa_k"))
        v = gather_core(ctx, rep_fn, [v], ctx.key("gqa_v"))
    L, E = q.shape[-2], q.shape[-1]
    S = k.shape[-2]
    c = float(scale) if scale is not None else 1.0 / math.sqrt(E)
    c = abs(c) * (1 + 1e-15)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    # operands shared by several matrices (broadcast) count once per use
    q = broadcast(ctx, q, torch.Size((*lead, *q.shape[-2:])), "q")
    k = broadcast(ctx, k, torch.Size((*lead, *k.shape[-2:])), "k")
    v = broadcast(ctx, v, torch.Size((*lead, *v.shape[-2:])), "v")
    out_shape = torch.Size((*lead, L, v.shape[-1]))
    sq = reduce_sid(q.sid, (q.dim() - 2, q.dim() - 1), "attention")
    sk = reduce_sid(k.sid, (k.dim() - 2, k.dim() - 1), "attention")
    sv = reduce_sid(v.sid, (v.dim() - 2, v.dim() - 1), "attention")
    msid = unify_sid(lead, sq, sk, sv)
    sid = None if msid is None else msid.reshape(*lead, 1, 1).expand(out_shape)
    rq = q.tok_norm
    rho_k = centred_radius(ctx, k, sk)
    rho_v = centred_radius(ctx, v, sv)
    lip_tok = v.lip_tok + rho_v * c * (q.lip_tok * rho_k + rq * k.lip_tok)
    mass, dead = ctx.cached(
        ctx.shape_cache,
        ctx.key("sdpa_mask", None if attn_mask is None else tuple(attn_mask.shape), L, S),
        lambda: mask_mass(attn_mask, is_causal, L, S),
    )
    kappa = torch.full_like(rq, math.sqrt(L))
    spread = torch.exp(c * rq * rho_k * (1 + 1e-15)) * (math.sqrt(mass) * (1 + 8 * U))
    kappa = torch.minimum(kappa, spread)
    lip = kappa * v.lip + rho_v * c * (rho_k * q.lip + kappa * rq * k.lip)
    # intervals: convex hull of the value rows (j ≤ i when causal)
    if is_causal:
        idx = torch.arange(L).clamp(max=S - 1)
        vlo = v.lo.cummin(-2).values.index_select(-2, idx)
        vhi = v.hi.cummax(-2).values.index_select(-2, idx)
    else:
        vlo = v.lo.amin(-2, keepdim=True)
        vhi = v.hi.amax(-2, keepdim=True)
    lo = vlo.expand(out_shape).clone()
    hi = vhi.expand(out_shape).clone()
    lo = lo - gamma(S) * lo.abs()
    hi = hi + gamma(S) * hi.abs()
    if dead is not None:  # rows with every key masked: torch returns zeros
        dead = dead.unsqueeze(-1).expand(out_shape)
        lo = torch.where(dead, lo.clamp(max=0.0), lo)
        hi = torch.where(dead, hi.clamp(min=0.0), hi)
    return Bound(
        lo.to(F64),
        hi.to(F64),
        lip,
        lip_tok,
        ctx.full(math.inf),
        v.tok_norm,
        sid=sid,
    )
