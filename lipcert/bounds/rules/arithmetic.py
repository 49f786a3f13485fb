"""Elementwise arithmetic (add, sub, mul, div, neg) and reductions (mean, sum).

Notation: per sample, M_a = sup |a_e| over the input set (from the intervals).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lipcert.bounds.errors import UnsupportedOpError
from lipcert.bounds.registry import rule
from lipcert.bounds.rules.affine import const64, linear_comb, safe_mul, scale
from lipcert.bounds.rules.shape import broadcast
from lipcert.bounds.state import (
    Bound,
    Ctx,
    gamma,
    max_abs,
    reduce_sid,
    row_sid,
    unify_sid,
)

aten = torch.ops.aten


@rule(aten.add)
def add(ctx: Ctx, a: Any, b: Any, alpha: float = 1) -> Bound:
    """a + α·b: see :func:`linear_comb`."""
    return linear_comb(ctx, [(1.0, a), (float(alpha), b)])


@rule(aten.sub)
def sub(ctx: Ctx, a: Any, b: Any, alpha: float = 1) -> Bound:
    """a − α·b: see :func:`linear_comb`; a centring x − mean(x, dims, keepdim=True) is an
    orthogonal projection (``decomposed.centre``)."""
    from lipcert.bounds.rules.decomposed import centre, centring_pattern

    dims = centring_pattern(ctx.node)
    if dims is not None and isinstance(a, Bound):
        return centre(ctx, a, dims)
    return linear_comb(ctx, [(1.0, a), (-float(alpha), b)])


@rule(aten.rsub)
def rsub(ctx: Ctx, a: Any, b: Any, alpha: float = 1) -> Bound:
    """b − α·a: see :func:`linear_comb`."""
    return linear_comb(ctx, [(1.0, b), (-float(alpha), a)])


@rule(aten.neg)
def neg(ctx: Ctx, a: Bound) -> Bound:
    """−a: an isometry."""
    return linear_comb(ctx, [(-1.0, a)])


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


def _written_out_rms(ctx: Ctx, operands: tuple[Any, ...]) -> Bound | None:
    """The RMSNorm bound if this node is x·rsqrt(mean(x²) + ε) or x / sqrt(mean(x²) + ε)
    (``decomposed.rms_pattern``), else ``None``."""
    from lipcert.bounds.rules.decomposed import rms_over, rms_pattern

    found = rms_pattern(ctx.node)
    if found is None or not isinstance(operands[found[0]], Bound):
        return None
    i, dims, eps = found
    return rms_over(ctx, operands[i], dims, eps)


@rule(aten.mul)
def mul(ctx: Ctx, a: Any, b: Any) -> Bound:
    """a ⊙ b: by a constant (:func:`scale`) or of two activations (:func:`product`); a
    tensor times itself is its square (the pow rule: its interval is [dist(0, I)², M²],
    where the interval product would admit negative values); a written-out RMSNorm is one
    normalisation (:func:`_written_out_rms`)."""
    fused = _written_out_rms(ctx, (a, b))
    if fused is not None:
        return fused
    if a is b and isinstance(a, Bound):
        from lipcert.bounds.rules.activation import pow_

        return pow_(ctx, a, 2)
    if not isinstance(a, Bound):
        a, b = b, a
    if isinstance(b, Bound):
        return product(ctx, a, b)
    return scale(ctx, a, const64(b))


@rule(aten.div)
def div(ctx: Ctx, a: Any, b: Any, rounding_mode: str | None = None) -> Bound:
    """a / b: a constant b is a scaling by 1/b (intervals divided directly); an activation b
    goes through the reciprocal rule, then the product rule; a written-out RMSNorm
    x / sqrt(mean(x²) + ε) is one normalisation (:func:`_written_out_rms`)."""
    if rounding_mode is not None:
        raise UnsupportedOpError(f"division with rounding_mode={rounding_mode!r} is not Lipschitz")
    fused = _written_out_rms(ctx, (a, b))
    if fused is not None:
        return fused
    if isinstance(b, Bound):
        from lipcert.bounds.rules.activation import reciprocal

        rb = reciprocal(ctx, b)
        if isinstance(a, Bound):
            return product(ctx, a, rb)
        return scale(ctx, rb, const64(a))
    c = const64(b)
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
