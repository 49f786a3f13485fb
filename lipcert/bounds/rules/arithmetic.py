"""Elementwise arithmetic (add, sub, mul, div, neg) and reductions (mean, sum).

Notation: per sample, M_a = sup |a_e| over the input set (from the intervals).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.errors import UnsupportedOpError
from lipcert.bounds.registry import rule
from lipcert.bounds.rules.shape import broadcast
from lipcert.bounds.state import (
    F64,
    Bound,
    Const,
    Ctx,
    gamma,
    max_abs,
    reduce_sid,
    row_sid,
    sample_max,
    sample_sum,
    unify_sid,
)

aten = torch.ops.aten


def _shape_of(x: Any) -> torch.Size:
    if isinstance(x, Bound | Const):
        return x.shape
    return torch.Size([])


def _const64(x: Any) -> Tensor:
    t = x.t if isinstance(x, Const) else torch.as_tensor(x)
    return t.detach().to(F64)


def safe_mul(a: Tensor, b: Tensor) -> Tensor:
    """a·b with 0·∞ = 0 (a bound times an exactly-zero factor)."""
    return torch.where((a == 0) | (b == 0), torch.zeros((), dtype=F64), a * b)


def linear_comb(ctx: Ctx, terms: list[tuple[float, Any]]) -> Bound:
    """Bounds of Σ c_i·x_i (x_i Bounds, constants or numbers; broadcasting).

    Derivation: Δ(Σ c_i x_i) = Σ c_i Δx_i, so lip ≤ Σ|c_i| lip_i (also per row, and for the
    norms); a constant term shifts the intervals and adds its own norm.
    """
    shape = torch.broadcast_shapes(*(_shape_of(x) for _, x in terms))
    bounds = [
        (c, broadcast(ctx, x, shape, f"t{i}"))
        for i, (c, x) in enumerate(terms)
        if isinstance(x, Bound) and c != 0
    ]
    const = torch.zeros((), dtype=F64)
    for c, x in terms:
        if not isinstance(x, Bound) and c != 0:
            const = const + c * _const64(x)
    const = const.expand(shape)
    sid = unify_sid(shape, *(b.sid for _, b in bounds))
    lo = const.clone()
    hi = const.clone()
    lip = ctx.full(0.0)
    lip_tok = ctx.full(0.0)
    norm = ctx.full(0.0)
    tok = ctx.full(0.0)
    for c, b in bounds:
        lo = lo + (c * b.lo if c > 0 else c * b.hi)
        hi = hi + (c * b.hi if c > 0 else c * b.lo)
        lip = lip + abs(c) * b.lip
        lip_tok = lip_tok + abs(c) * b.lip_tok
        norm = norm + abs(c) * b.norm
        tok = tok + abs(c) * b.tok_norm
    if bool((const != 0).any()):
        norm = norm + sample_sum(const.square(), sid, ctx.n).sqrt() * (1 + gamma(const.numel()))
        rows = const.reshape(1, 1) if const.dim() == 0 else const
        row_sq = rows.square().sum(-1) * (1 + gamma(rows.shape[-1]))
        tok = tok + row_sq.max().sqrt() if row_sq.numel() else tok
    return Bound(lo, hi, lip, lip_tok, norm, tok, sid=sid)


@rule(aten.add)
def add(ctx: Ctx, a: Any, b: Any, alpha: float = 1) -> Bound:
    """a + α·b: see :func:`linear_comb`."""
    return linear_comb(ctx, [(1.0, a), (float(alpha), b)])


@rule(aten.sub)
def sub(ctx: Ctx, a: Any, b: Any, alpha: float = 1) -> Bound:
    """a − α·b: see :func:`linear_comb`."""
    return linear_comb(ctx, [(1.0, a), (-float(alpha), b)])


@rule(aten.rsub)
def rsub(ctx: Ctx, a: Any, b: Any, alpha: float = 1) -> Bound:
    """b − α·a: see :func:`linear_comb`."""
    return linear_comb(ctx, [(1.0, b), (-float(alpha), a)])


@rule(aten.neg)
def neg(ctx: Ctx, a: Bound) -> Bound:
    """−a: an isometry."""
    return linear_comb(ctx, [(-1.0, a)])


def scale(ctx: Ctx, a: Bound, c: Tensor) -> Bound:
    """a ⊙ c for a constant c (broadcast): |Δ(a_e c_e)| ≤ max|c|·|Δa_e|, so lip, lip_tok and
    the norms scale by the largest |c| over each sample's elements."""
    shape = torch.broadcast_shapes(a.shape, c.shape)
    a = broadcast(ctx, a, shape, "scaled")
    ce = c.expand(shape)
    p1, p2 = safe_mul(a.lo, ce), safe_mul(a.hi, ce)
    m = sample_max(ce.abs(), a.sid, ctx.n)
    return Bound(
        torch.minimum(p1, p2),
        torch.maximum(p1, p2),
        m * a.lip,
        m * a.lip_tok,
        m * a.norm,
        m * a.tok_norm,
        sid=a.sid,
        tok_l1=None if a.tok_l1 is None else m * a.tok_l1,
    )


def product(ctx: Ctx, a: Bound, b: Bound) -> Bound:
    """a ⊙ b of two activations: Δ(ab) = Δa ⊙ b' + a ⊙ Δb, so
    lip ≤ M_b·lip_a + M_a·lip_b (and per row); ‖ab‖ ≤ min(M_b‖a‖, M_a‖b‖); the intervals are
    the interval product."""
    shape = torch.broadcast_shapes(a.shape, b.shape)
    a = broadcast(ctx, a, shape, "pa")
    b = broadcast(ctx, b, shape, "pb")
    sid = unify_sid(shape, a.sid, b.sid)
    ma, mb = max_abs(a), max_abs(b)
    cands = torch.stack(
        [safe_mul(a.lo, b.lo), safe_mul(a.lo, b.hi), safe_mul(a.hi, b.lo), safe_mul(a.hi, b.hi)]
    )
    return Bound(
        cands.amin(0),
        cands.amax(0),
        mb * a.lip + ma * b.lip,
        mb * a.lip_tok + ma * b.lip_tok,
        torch.minimum(mb * a.norm, ma * b.norm),
        torch.minimum(mb * a.tok_norm, ma * b.tok_norm),
        sid=sid,
    )


@rule(aten.mul)
def mul(ctx: Ctx, a: Any, b: Any) -> Bound:
    """a ⊙ b: by a constant (:func:`scale`) or of two activations (:func:`product`)."""
    if not isinstance(a, Bound):
        a, b = b, a
    if isinstance(b, Bound):
        return product(ctx, a, b)
    return scale(ctx, a, _const64(b))


@rule(aten.div)
def div(ctx: Ctx, a: Any, b: Any, rounding_mode: str | None = None) -> Bound:
    """a / b: a constant b is a scaling by 1/b (intervals divided directly); an activation b
    goes through the reciprocal rule, then the product rule."""
    if rounding_mode is not None:
        raise UnsupportedOpError(f"division with rounding_mode={rounding_mode!r} is not Lipschitz")
    if isinstance(b, Bound):
        from lipcert.bounds.rules.activation import reciprocal

        rb = reciprocal(ctx, b)
        if isinstance(a, Bound):
            return product(ctx, a, rb)
        return scale(ctx, rb, _const64(a))
    c = _const64(b)
    out = scale(ctx, a, 1.0 / c)
    q1, q2 = a.lo / c, a.hi / c
    lo, hi = torch.minimum(q1, q2), torch.maximum(q1, q2)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    return out.replace(lo=torch.where(finite, lo, out.lo), hi=torch.where(finite, hi, out.hi))


# --------------------------------------------------------------------------- reductions


def _dims(x: Bound, dim: Any) -> tuple[int, ...]:
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        return tuple(range(x.dim()))
    if isinstance(dim, int):
        dim = [dim]
    return tuple(sorted({d % max(x.dim(), 1) for d in dim}))


def reduce_mean_sum(
    ctx: Ctx, x: Bound, dims: tuple[int, ...], keepdim: bool, mean: bool
) -> Bound:
    """Mean (or sum) over ``dims`` of N elements per group.

    Per group, |Δ mean| ≤ ‖Δ group‖/√N (Cauchy–Schwarz); summing over groups, lip ≤ lip_x/√N
    (sum: ×N, i.e. lip_x·√N). If the last dimension is kept, each output row is the mean of N
    input rows, so ‖Δ row‖ ≤ max ‖Δ input row‖: lip_tok ≤ lip_tok_x (sum: N·lip_tok_x).
    Intervals: mean (sum) of the endpoints, widened by γ_N.
    """
    n_red = math.prod(x.shape[d] for d in dims) if dims else 1
    sid = reduce_sid(x.sid, dims, f"{ctx.node.target if ctx.node else 'reduction'}")
    if keepdim and sid is not None:
        sid = sid.reshape([1 if d in dims else s for d, s in enumerate(x.shape)])
    red = (lambda t: t.mean(dim=dims, keepdim=keepdim)) if mean else (
        lambda t: t.sum(dim=dims, keepdim=keepdim)
    )
    if dims:
        slack = gamma(n_red) * red(torch.maximum(x.lo.abs(), x.hi.abs()))
        lo, hi = red(x.lo) - slack, red(x.hi) + slack
    else:
        lo, hi = x.lo, x.hi
    f = 1.0 / math.sqrt(n_red) if mean else math.sqrt(n_red)
    last_kept = x.dim() > 0 and (x.dim() - 1) not in dims
    row_f = 1.0 if mean else float(n_red)
    inf = ctx.full(math.inf)
    return Bound(
        lo,
        hi,
        f * x.lip,
        row_f * x.lip_tok if last_kept else inf,
        f * x.norm,
        row_f * x.tok_norm if last_kept else inf,
        sid=sid,
    )


@rule(aten.mean)
def mean(ctx: Ctx, x: Bound, dim: Any = None, keepdim: bool = False, **kwargs: Any) -> Bound:
    """Mean over dims: see :func:`reduce_mean_sum`."""
    if isinstance(dim, torch.dtype):  # mean.default(x, dtype)
        dim = None
    return reduce_mean_sum(ctx, x, _dims(x, dim), bool(keepdim), mean=True)


@rule(aten.sum)
def sum_(ctx: Ctx, x: Bound, dim: Any = None, keepdim: bool = False, **kwargs: Any) -> Bound:
    """Sum over dims: see :func:`reduce_mean_sum`."""
    if isinstance(dim, torch.dtype):
        dim = None
    return reduce_mean_sum(ctx, x, _dims(x, dim), bool(keepdim), mean=False)


__all__ = ["add", "linear_comb", "mean", "mul", "product", "row_sid", "scale", "sum_"]
