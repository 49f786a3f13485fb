"""Linear maps: linear / mm / addmm / bmm / matmul (with a weight or between two
activations) and convolutions.

Weight norms are certified upper bounds from :mod:`lipcert.spectral` (``exact`` or ``gram``
for matrices, ``conv2d`` for convolutions), cached per parameter. Interval bounds use the
midpoint–radius form: for y = W x + b with x ∈ [c − r, c + r], y ∈ W c + b ± |W| r, widened
by γ_{k+1}·(|W|(|c| + r) + |b|) for the float64 rounding of the products (Higham (3.5)).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lipcert import spectral
from lipcert.bounds.errors import BatchMixingError, UnsupportedOpError
from lipcert.bounds.registry import rule
from lipcert.bounds.rules.affine import linear_comb
from lipcert.bounds.rules.shape import broadcast, gather_core
from lipcert.bounds.state import (
    F64,
    Bound,
    Const,
    Ctx,
    gamma,
    per_elem,
    reduce_sid,
    row_sid,
    rows_per_sample,
    sample_max,
    unify_sid,
)
from lipcert.threads import big_work

aten = torch.ops.aten


def mid_rad(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Midpoint c and radius r with [lo, hi] ⊆ [c − r, c + r] despite rounding."""
    c = (lo + hi) / 2
    r = torch.maximum(hi - c, c - lo) * (1 + 2 * 2.0**-53)
    return c, r


_ROW_CHUNK = 2**22  # float64 elements converted at a time for row norms (32 MiB)


def _row_norms(ctx: Ctx, w: Const) -> Tensor:
    """‖W_e‖₂ of every row of a weight matrix, rounded up (cached).

    A contiguous W is converted to float64 in row chunks through one buffer rather than as a
    whole (a GPT-2 unembedding would need 300 MB of fresh memory); each row is reduced by the
    same kernel either way, so the values are the same."""

    def make() -> Tensor:
        t = w.t.detach()
        k = t.shape[-1]
        if not t.is_contiguous():
            return torch.linalg.vector_norm(t.to(F64), dim=-1) * (1 + gamma(k))
        out = torch.empty(t.shape[0], dtype=F64)
        rows = max(1, _ROW_CHUNK // max(k, 1))
        buf = torch.empty(min(rows, t.shape[0]) * k, dtype=F64)
        for r in range(0, t.shape[0], rows):
            src = t[r : r + rows]
            chunk = buf[: src.numel()].view(src.shape).copy_(src)
            torch.linalg.vector_norm(chunk, dim=-1, out=out[r : r + rows])
        return out * (1 + gamma(k))

    return ctx.cached(ctx.norm_cache, (w.name, "rownorms"), make)


def _w64(ctx: Ctx, w: Const) -> Tensor:
    return ctx.cached(ctx.norm_cache, (w.name, "f64"), lambda: w.t.detach().to(F64))


def _wabs(ctx: Ctx, w: Const) -> Tensor:
    return ctx.cached(ctx.norm_cache, (w.name, "abs64"), lambda: _w64(ctx, w).abs())


def _rows_sid(x: Bound, what: str) -> tuple[Tensor, bool] | None:
    """``row_sid`` of the input (None without sample ids); raises if a row mixes samples."""
    if x.sid is None:
        return None
    rows = row_sid(x.sid.expand(x.shape))
    if not rows[1]:
        raise BatchMixingError(f"{what} mixes samples: its input's last dimension is the batch")
    return rows


def _box_helps(x: Bound) -> bool:
    """Whether the midpoint–radius product can beat the row-norm intervals: not when every
    row's box radius exceeds the token-norm bound (after a LayerNorm in global mode, say).
    A cost heuristic only; either way the intervals are sound."""
    half = (x.hi - x.lo) / 2
    rows = half.square().sum(-1).sqrt() if half.dim() else half.abs()
    return bool(rows.numel() == 0 or float(rows.min()) < 1.25 * float(x.tok_norm.max()))


def right_linear(ctx: Ctx, x: Bound, w: Const, bias: Const | None, what: str) -> Bound:
    """y = x Wᵀ + b along the last dimension (W of shape (out, in)).

    Every row is mapped by W, so ‖ΔY‖ ≤ ‖W‖·‖ΔX‖ and ‖ΔY_row‖ ≤ ‖W‖·‖ΔX_row‖: lip and lip_tok
    scale by σ_max(W); ‖Y_row‖ ≤ ‖W‖·‖X_row‖ + ‖b‖. Besides the midpoint–radius intervals,
    |y_e − b_e| ≤ ‖W_e‖·‖x_row‖ (row-norm intervals; local mode: around W x₀ + b with
    ‖Δx_row‖ ≤ lip_tok·r), which keeps the token-norm structure that boxes lose.
    """
    s = ctx.opnorm(w)
    n_out, k = w.t.shape
    b = None if bias is None else bias.t.detach().to(F64)
    out_shape = (*x.shape[:-1], n_out)
    x_rows = _rows_sid(x, what)
    sid = None if x_rows is None else x_rows[0].unsqueeze(-1).expand(out_shape)
    b_norm = 0.0 if b is None else float(torch.linalg.vector_norm(b)) * (1 + gamma(b.numel()))
    rows = rows_per_sample(x.shape, x.sid, ctx.n, with_constant_rows=True, rows=x_rows)
    rn = _row_norms(ctx, w)
    b0 = torch.zeros((), dtype=F64) if b is None else b
    tok_in = per_elem(x.tok_norm, sid, torch.Size(out_shape)) if sid is not None else x.tok_norm[0]
    lo = b0 - rn * tok_in
    hi = b0 + rn * tok_in
    flops = 2.0 * x.lo.numel() * n_out
    if ctx.use_ibp(3 * flops, x.lo, x.hi) and _box_helps(x):
        c, r = mid_rad(x.lo, x.hi)
        W, Wa = _w64(ctx, w), _wabs(ctx, w)
        with big_work(flops):
            yc = c @ W.T + b0
            yr = r @ Wa.T
            err = gamma(k + 1) * ((c.abs() + r) @ Wa.T + b0.abs()) + 1e-300
        lo = torch.maximum(lo, yc - yr - err)
        hi = torch.minimum(hi, yc + yr + err)
    value = None
    if ctx.local and x.value is not None:
        with big_work(flops):
            value = x.value @ _w64(ctx, w).T + b0
            err = gamma(k + 1) * (x.value.abs() @ _wabs(ctx, w).T + b0.abs()) + 1e-300
        assert ctx.radius is not None
        d = per_elem(x.lip_tok * ctx.radius, sid, torch.Size(out_shape)) * rn + err
        lo = torch.maximum(lo, value - d)
        hi = torch.minimum(hi, value + d)
    out = Bound(
        lo.expand(out_shape).clone(),
        hi.expand(out_shape).clone(),
        s * x.lip,
        s * x.lip_tok,
        s * x.norm + b_norm * rows.sqrt(),
        s * x.tok_norm + b_norm,
        sid=sid,
        value=value,
    )
    return out


def left_linear(ctx: Ctx, a: Const, x: Bound) -> Bound:
    """Y = A X for a constant matrix A (n×k) and an activation X (…, k, m): columns of X are
    mapped by A, so lip ≤ ‖A‖·lip_X. Row i of ΔY is Σ_k A_ik ΔX_k, so
    ‖ΔY_i‖ ≤ ‖A_i‖₁·max_k ‖ΔX_k‖ and ≤ ‖A_i‖₂·‖ΔX‖: lip_tok ≤ min(max‖A_i‖₁·lip_tok_X,
    max‖A_i‖₂·lip_X); token norms likewise with max‖A_i‖₁."""
    s = ctx.opnorm(a)
    A = a.t.detach().to(F64)
    out_shape = (*x.shape[:-2], A.shape[0], x.shape[-1])
    col = reduce_sid(x.sid, (x.dim() - 2,), "a matrix product")
    sid = None if col is None else col.unsqueeze(-2).expand(out_shape)
    l1 = float(A.abs().sum(-1).max()) * (1 + gamma(A.shape[1]))
    l2 = float(torch.linalg.vector_norm(A, dim=-1).max()) * (1 + gamma(A.shape[1]))
    if ctx.use_ibp(6.0 * A.shape[0] * x.lo.numel(), x.lo, x.hi):
        c, r = mid_rad(x.lo, x.hi)
        yc, yr = A @ c, A.abs() @ r
        err = gamma(A.shape[1] + 1) * (A.abs() @ (c.abs() + r)) + 1e-300
        lo, hi = yc - yr - err, yc + yr + err
    else:
        lo = torch.full(out_shape, -math.inf, dtype=F64)
        hi = torch.full(out_shape, math.inf, dtype=F64)
    return Bound(
        lo,
        hi,
        s * x.lip,
        torch.minimum(l1 * x.lip_tok, l2 * x.lip),
        s * x.norm,
        l1 * x.tok_norm,
        sid=sid,
    )


def _matrix_frob(b: Bound) -> Tensor:
    """Per sample, the largest Frobenius norm over the set of one matrix (last two dims)."""
    sq = torch.maximum(b.lo.square(), b.hi.square()).sum((-2, -1)) * (
        1 + gamma(b.shape[-1] * b.shape[-2])
    )
    msid = reduce_sid(b.sid, (b.dim() - 2, b.dim() - 1), "a matrix product")
    return torch.minimum(sample_max(sq.sqrt(), msid, b.lip.shape[0]), b.norm)


def product(ctx: Ctx, a: Bound, b: Bound) -> Bound:
    """A·B of two activations (…, n, k) @ (…, k, m).

    Δ(AB) = ΔA·B' + A·ΔB with A, B' in the input set, so with n_A, n_B bounds of the
    matrices' spectral norms (their Frobenius norms over the set):
    lip ≤ n_B·lip_A + n_A·lip_B (Lip(A·B) ≤ ‖A‖·Lip(B) + Lip(A)·‖B‖, summed over the batch of
    matrices by Minkowski). Row i: ‖ΔA_i B'‖ ≤ lip_tok_A·n_B and
    ‖A_i ΔB‖ ≤ min(‖A_i‖₁·lip_tok_B, ‖A_i‖₂·lip_B). Intervals: midpoint–radius product
    (Rump): AB ∈ A_c B_c ± (|A_c| B_r + A_r |B_c| + A_r B_r).
    """
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = broadcast(ctx, a, torch.Size((*lead, *a.shape[-2:])), "mm_a")
    b = broadcast(ctx, b, torch.Size((*lead, *b.shape[-2:])), "mm_b")
    k = a.shape[-1]
    out_shape = torch.Size((*lead, a.shape[-2], b.shape[-1]))
    ra = reduce_sid(a.sid, (a.dim() - 1,), "a matrix product")
    cb = reduce_sid(b.sid, (b.dim() - 2,), "a matrix product")
    ra_e = None if ra is None else ra.unsqueeze(-1)
    cb_e = None if cb is None else cb.unsqueeze(-2)
    sid = unify_sid(out_shape, ra_e, cb_e)
    nA, nB = _matrix_frob(a), _matrix_frob(b)
    l1_rows = torch.maximum(a.lo.abs(), a.hi.abs()).sum(-1) * (1 + gamma(k))
    l1 = torch.minimum(sample_max(l1_rows, ra, ctx.n), math.sqrt(k) * a.tok_norm)
    if a.tok_l1 is not None:
        l1 = torch.minimum(l1, a.tok_l1)
    if ctx.use_ibp(10.0 * math.prod(out_shape) * k, a.lo, a.hi, b.lo, b.hi):
        ac, ar = mid_rad(a.lo, a.hi)
        bc, br = mid_rad(b.lo, b.hi)
        with big_work(2.0 * math.prod(out_shape) * k):
            yc = ac @ bc
            yr = ac.abs() @ br + ar @ bc.abs() + ar @ br
            err = gamma(k + 2) * (ac.abs() @ bc.abs() + yr) * 2 + 1e-300
        lo, hi = yc - yr - err, yc + yr + err
    else:
        lo = torch.full(out_shape, -math.inf, dtype=F64)
        hi = torch.full(out_shape, math.inf, dtype=F64)
    return Bound(
        lo,
        hi,
        nB * a.lip + nA * b.lip,
        nB * a.lip_tok + torch.minimum(l1 * b.lip_tok, a.tok_norm * b.lip),
        torch.minimum(nB * a.norm, nA * b.norm),
        torch.minimum(a.tok_norm * nB, l1 * b.tok_norm),
        sid=sid,
    )


def _unsqueeze(ctx: Ctx, x: Any, dim: int, tag: str) -> Any:
    if isinstance(x, Const):
        return Const(x.t.unsqueeze(dim), None if x.name is None else f"{x.name}.unsq{dim}")
    return gather_core(ctx, lambda ts: ts[0].unsqueeze(dim), [x], ctx.key("unsq", tag))


def _squeeze(ctx: Ctx, x: Bound, dim: int, tag: str) -> Bound:
    return gather_core(ctx, lambda ts: ts[0].squeeze(dim), [x], ctx.key("sq", tag))


def matmul_bounds(ctx: Ctx, a: Any, b: Any) -> Bound:
    """``torch.matmul`` semantics (1-D operands promoted, leading dims broadcast)."""
    squeeze = []
    if a.dim() == 1:
        a = _unsqueeze(ctx, a, 0, "a")
        squeeze.append(-2)
    if b.dim() == 1:
        b = _unsqueeze(ctx, b, -1, "b")
        squeeze.append(-1)
    if isinstance(b, Const) and b.dim() == 2 and isinstance(a, Bound):
        wt = Const(b.t.T, None if b.name is None else f"{b.name}.T")
        out = right_linear(ctx, a, wt, None, "matmul")
    elif isinstance(a, Const) and a.dim() == 2 and isinstance(b, Bound):
        out = left_linear(ctx, a, b)
    else:
        out = product(ctx, ctx.to_bound(a), ctx.to_bound(b))
    for i, d in enumerate(squeeze):
        out = _squeeze(ctx, out, d if d == -1 or len(squeeze) == 1 else -1, f"s{i}")
    return out


@rule(aten.matmul, aten.mm, aten.bmm)
def matmul(ctx: Ctx, a: Any, b: Any) -> Bound:
    """A @ B: a constant on the right is a linear layer, on the left a column map
    (:func:`left_linear`); two activations use the product rule (:func:`product`)."""
    return matmul_bounds(ctx, a, b)


@rule(aten.addmm, aten.baddbmm)
def addmm(ctx: Ctx, bias: Any, a: Any, b: Any, *, beta: float = 1, alpha: float = 1) -> Bound:
    """β·bias + α·(A @ B): the matmul rule, then :func:`linear_comb`."""
    return linear_comb(ctx, [(float(beta), bias), (float(alpha), matmul_bounds(ctx, a, b))])


@rule(aten.linear)
def linear(ctx: Ctx, x: Any, weight: Any, bias: Any = None) -> Bound:
    """y = x Wᵀ + b: :func:`right_linear` for a constant W (the usual layer), otherwise the
    product rule on x @ Wᵀ."""
    if isinstance(weight, Const) and isinstance(x, Bound) and not isinstance(bias, Bound):
        return right_linear(ctx, x, weight, bias, "linear")
    wt = (
        Const(weight.t.T, None)
        if isinstance(weight, Const)
        else gather_core(ctx, lambda ts: ts[0].transpose(-1, -2), [weight], ctx.key("wT"))
    )
    y = matmul_bounds(ctx, x, wt)
    return y if bias is None else linear_comb(ctx, [(1.0, y), (1.0, bias)])


# --------------------------------------------------------------------------- convolution


def _pair(v: Any, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


@rule(aten.conv1d, aten.conv2d, aten.convolution)
def conv(ctx: Ctx, x: Bound, weight: Any, bias: Any = None, *args: Any) -> Bound:
    """1-D/2-D convolution with a constant kernel. ``spectral.conv2d`` certifies its ℓ2
    operator norm on the actual input size (exact with circular padding, a certified bound
    with zero padding), so lip ≤ ‖conv‖·lip_x per sample (each sample is one batch entry);
    norm ≤ ‖conv‖·norm_x + ‖b‖·√(output positions). Intervals: midpoint–radius."""
    target = ctx.node.target
    if isinstance(weight, Bound) or isinstance(bias, Bound):
        raise UnsupportedOpError("convolution with a kernel that depends on the input")
    nd = weight.dim() - 2
    if target.overloadpacket is aten.convolution:
        stride, padding, dilation, transposed, _out_pad, groups = args
        if transposed:
            raise UnsupportedOpError("transposed convolution has no bound rule yet")
    else:
        defaults = [1, 0, 1, 1]
        vals = list(args) + defaults[len(args) :]
        stride, padding, dilation, groups = vals
    batched = x.dim() == nd + 2
    sp = tuple(x.shape[-nd:])
    W = weight.t.detach()
    stride_l, dil_l = _pair(stride, nd), _pair(dilation, nd)
    pad: Any = padding if isinstance(padding, str) else _pair(padding, nd)
    if nd == 1:
        W2 = W.unsqueeze(2)
        hw, st, dl = (1, sp[0]), (1, stride_l[0]), (1, dil_l[0])
        pd: Any = pad if isinstance(pad, str) else (0, pad[0])
    elif nd == 2:
        W2, hw, st, dl, pd = W, sp, tuple(stride_l), tuple(dil_l), (
            pad if isinstance(pad, str) else tuple(pad)
        )
    else:
        raise UnsupportedOpError(f"{nd}-D convolution has no bound rule yet")

    def make() -> float:
        res = spectral.conv2d(W2, hw, st, pd, "zeros", dilation=dl, groups=int(groups))
        if res.kind != "upper":
            raise UnsupportedOpError("convolution norm is not a certified upper bound")
        return float(res.value)

    s = ctx.cached(ctx.norm_cache, (weight.name, "conv", hw, st, str(pd), dl, groups), make)
    Wd = W.to(F64)
    b = None if bias is None else bias.t.detach().to(F64)

    def run(inp: Tensor, w: Tensor, bb: Tensor | None) -> Tensor:
        return target(inp, w, bb, *args)

    if ctx.use_ibp(6.0 * x.lo.numel() * W.shape[0] * math.prod(W.shape[2:]), x.lo, x.hi):
        c, r = mid_rad(x.lo, x.hi)
        yc = run(c, Wd, b)
        yr = run(r, Wd.abs(), None)
        k = W.shape[1] * math.prod(W.shape[2:])
        babs = None if b is None else b.abs()
        err = gamma(k + 1) * run(c.abs() + r, Wd.abs(), babs) + 1e-300
        lo, hi = yc - yr - err, yc + yr + err
    else:
        yc = run(torch.zeros_like(x.lo), Wd, b)
        lo = torch.full_like(yc, -math.inf)
        hi = torch.full_like(yc, math.inf)
    out_shape = lo.shape
    if x.sid is None:
        sid = None
    elif batched:
        bs = reduce_sid(x.sid, tuple(range(1, x.dim())), "convolution")
        sid = bs.reshape(-1, *([1] * (len(out_shape) - 1))).expand(out_shape)
    else:
        one = reduce_sid(x.sid, tuple(range(x.dim())), "convolution")
        sid = one.expand(out_shape)
    positions = math.prod(out_shape[-nd:])
    b_norm = 0.0 if b is None else float(torch.linalg.vector_norm(b)) * (1 + gamma(b.numel()))
    inf = ctx.full(math.inf)
    return Bound(
        lo,
        hi,
        s * x.lip,
        s * x.lip,
        s * x.norm + b_norm * math.sqrt(positions),
        inf,
        sid=sid,
    )
