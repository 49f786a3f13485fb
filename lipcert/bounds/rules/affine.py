"""Affine combinations of bounds, shared by the arithmetic, linear and norm rules.

Kept apart from ``arithmetic.py`` (which registers the rules) so that the rule modules that
build on these helpers do not import each other in a cycle.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.rules.shape import broadcast
from lipcert.bounds.state import (
    F64,
    Bound,
    Const,
    Ctx,
    gamma,
    sample_max,
    sample_sum,
    unify_sid,
)


def shape_of(x: Any) -> torch.Size:
    if isinstance(x, Bound | Const):
        return x.shape
    return torch.Size([])


def const64(x: Any) -> Tensor:
    """A constant operand in float64 (a Python number directly: through float32, the default
    dtype, √(2/π) would lose 8 digits)."""
    t = x.t if isinstance(x, Const) else torch.as_tensor(x, dtype=F64)
    return t.detach().to(F64)


def safe_mul(a: Tensor, b: Tensor) -> Tensor:
    """a·b with 0·∞ = 0 (a bound times an exactly-zero factor)."""
    return torch.where((a == 0) | (b == 0), torch.zeros((), dtype=F64), a * b)


def linear_comb(ctx: Ctx, terms: list[tuple[float, Any]]) -> Bound:
    """Bounds of Σ c_i·x_i (x_i Bounds, constants or numbers; broadcasting).

    Derivation: Δ(Σ c_i x_i) = Σ c_i Δx_i, so lip ≤ Σ|c_i| lip_i (also per row, and for the
    norms); a constant term shifts the intervals and adds its own norm.
    """
    shape = torch.broadcast_shapes(*(shape_of(x) for _, x in terms))
    bounds = [
        (c, broadcast(ctx, x, shape, f"t{i}"))
        for i, (c, x) in enumerate(terms)
        if isinstance(x, Bound) and c != 0
    ]
    const = torch.zeros((), dtype=F64)
    for c, x in terms:
        if not isinstance(x, Bound) and c != 0:
            const = const + c * const64(x)
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
