"""Linear maps: linear, matmul / mm / bmm, addmm / baddbmm and convolutions.

For Y = A·B (batched, broadcast), ∂m/∂A = G_Y·Bᵀ and ∂m/∂B = Aᵀ·G_Y. A constant factor is
exact in centre form (radius |G_r|·|W|); a factor that depends on the input is enclosed by
its forward interval over the input set (midpoint–radius product, Rump 1999). Dot products
carry the float64 slack 2·γ_{k+2}·Σ|a||b| (``interval.matmul``). ``linear`` is
Y = X·Wᵀ + b. A convolution with a constant kernel is linear in its input: its
vector–Jacobian product with the kernel W gives the centre and with |W| the radius.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.backward.interval import TINY, Box, Grad, iv_matmul, matmul, mid_rad, sum_to
from lipcert.bounds.backward.registry import BackCtx, FwdCtx, backward_rule, forward_rule
from lipcert.bounds.backward.rules.arithmetic import add_boxes, scale_box
from lipcert.bounds.state import F64, gamma
from lipcert.errors import LipcertError

aten = torch.ops.aten


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _parts(x: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(x, Box):
        return mid_rad(x.lo, x.hi)
    return x, None


def _gt(g: Grad) -> Grad:
    return Grad(_t(g.c), _t(g.r))


def matmul_grads(g: Grad, a: Any, b: Any) -> tuple[Grad | None, Grad | None]:
    """Enclosures of ∂m/∂A and ∂m/∂B for Y = A @ B (torch.matmul semantics)."""
    a_shape, b_shape = a.shape, b.shape
    a1, b1 = len(a_shape) == 1, len(b_shape) == 1
    ac, ar = _parts(a)
    bc, br = _parts(b)
    if a1:
        ac, ar = ac.unsqueeze(0), None if ar is None else ar.unsqueeze(0)
        g = g.map(lambda t: t.unsqueeze(-2))
    if b1:
        bc, br = bc.unsqueeze(-1), None if br is None else br.unsqueeze(-1)
        g = g.map(lambda t: t.unsqueeze(-1))
    ga = gb = None
    if isinstance(a, Box):
        ga = matmul(g, _t(bc), None if br is None else _t(br))
        if a1:
            ga = ga.map(lambda t: t.squeeze(-2))
        ga = sum_to(ga, a_shape)
    if isinstance(b, Box):
        gb = _gt(matmul(_gt(g), ac, ar))
        if b1:
            gb = gb.map(lambda t: t.squeeze(-1))
        gb = sum_to(gb, b_shape)
    return ga, gb


@backward_rule(aten.matmul, aten.mm, aten.bmm)
def matmul_(ctx: BackCtx, g: Grad, a: Any, b: Any) -> tuple[Any, ...]:
    """A @ B: G_A = G·Bᵀ, G_B = Aᵀ·G (module docstring)."""
    return matmul_grads(g, a, b)


@backward_rule(aten.addmm, aten.baddbmm)
def addmm(ctx: BackCtx, g: Grad, bias: Any, a: Any, b: Any, *, beta: float = 1,
          alpha: float = 1) -> tuple[Any, ...]:
    """β·bias + α·(A @ B)."""
    ga, gb = matmul_grads(g.scaled(float(alpha)), a, b)
    gbias = sum_to(g, bias.shape).scaled(float(beta)) if isinstance(bias, Box) else None
    return (gbias, ga, gb)


@backward_rule(aten.linear)
def linear(ctx: BackCtx, g: Grad, x: Any, weight: Any, bias: Any = None) -> tuple[Any, ...]:
    """Y = X·Wᵀ + b: G_X = G·W, G_W = Σ_rows Gᵀ·X (W of shape (out, in)), G_b = Σ_rows G."""
    wt: Any = _box_map(weight, _t) if isinstance(weight, Box) else _t(weight)
    gx, gw = matmul_grads(g, x, wt)
    if gw is not None:
        gw = _gt(gw)
    gb = sum_to(g, bias.shape) if isinstance(bias, Box) else None
    return (gx, gw, gb)


@backward_rule(aten.conv1d, aten.conv2d, aten.convolution)
def conv(ctx: BackCtx, g: Grad, x: Any, weight: Any, bias: Any = None, *args: Any
         ) -> tuple[Any, ...]:
    """Convolution with a constant kernel W: G_x = VJP_W(G_c) ± (VJP_|W|(G_r) + slack),
    slack γ_{K+2}·(VJP_|W|(|G_c|) + VJP_|W|(G_r)), K = output channels × kernel taps."""
    if isinstance(weight, Box) or isinstance(bias, Box) or not isinstance(x, Box):
        raise LipcertError("a convolution whose kernel or bias depends on the input")
    target = ctx.target

    def vjp_with(w: Tensor, cot: Tensor) -> Tensor:
        _, fn = torch.func.vjp(lambda t: target(t, w, None, *args), x.value)
        return torch.vmap(fn)(cot)[0]

    c = vjp_with(weight, g.c)
    wa = weight.abs()
    r = vjp_with(wa, g.r)
    base = vjp_with(wa, g.c.abs())
    k = weight.shape[0] * weight[0, 0].numel()
    return (Grad(c, r + gamma(k + 2) * (base + r) + TINY), None, None)


# --------------------------------------------------------------------------- forward


def spectral_norm(w: Tensor) -> float:
    """σ_max of a constant matrix, rounded up: LAPACK's float64 singular values are
    backward stable (each within a few ulps times σ_max of the exact ones, Demmel–Kahan),
    so 1 + 1e-10 more than covers their error for the sizes of neural-network weights."""
    return float(torch.linalg.matrix_norm(w, ord=2)) * (1 + 1e-10)


def right_forward(ctx: FwdCtx, x: Box, w: Tensor, b: Tensor | None) -> Box:
    """y = x·Wᵀ + b (W constant, shape (out, in)). Three enclosures, intersected:
    around the centre, |y − y₀| ≤ |Δx|·|W|ᵀ; the box's midpoint–radius product
    m·Wᵀ + b ± ρ_m·|W|ᵀ; and |y_e − y₀_e| ≤ ‖W_e‖·‖Δx_row‖ ≤ ‖W_e‖·rdev_row (the ℓ2
    geometry of the deviation, which boxes lose). Rounding: 2·γ_{k+2}·(|x₀| + ρ + |m| + ρ_m)·|W|ᵀ
    + |b|. Deviations of the output: σ_max(W)·rdev per row, σ_max(W)·l2 per sample.
    Remainder: e_y = e_x·Wᵀ (plus the rounding of the centre value)."""
    k = w.shape[-1]
    wa = ctx.cached(w, "abs", lambda: w.abs())
    v0 = x.value @ w.T
    dev = x.deviation()
    m, mr = x.mid_rad()
    stacked = torch.stack([dev, mr, x.value.abs() + dev + m.abs() + mr]) @ wa.T
    dy, mrad, mag = stacked[0], stacked[1], stacked[2]
    mc = m @ w.T
    bias = torch.zeros((), dtype=F64) if b is None else b
    err = 2 * gamma(k + 2) * (mag + bias.abs()) + TINY
    value = v0 + bias
    lo = torch.maximum(value - dy, mc + bias - mrad) - err
    hi = torch.minimum(value + dy, mc + bias + mrad) + err
    sigma = ctx.cached(w, "sigma", lambda: spectral_norm(w))
    l2 = None if x.l2 is None or x.dim() < 2 else x.l2 * sigma
    rdev = None
    if x.dim() >= 1:
        rows = ctx.cached(
            w, "rows", lambda: torch.linalg.vector_norm(w, dim=-1) * (1 + gamma(k + 2)))
        xr = x.row_dev()
        spread = xr.unsqueeze(-1) * rows
        lo = torch.maximum(lo, value - spread - err)
        hi = torch.minimum(hi, value + spread + err)
        rdev = xr * sigma
    e_lo = e_hi = None
    if x.has_e:
        ec, er = x.e_mid_rad()
        yc = ec @ w.T
        both = torch.stack([er, ec.abs()]) @ wa.T
        yr = both[0] + 2 * gamma(k + 2) * (both[0] + both[1]) + err
        e_lo, e_hi = yc - yr, yc + yr
    return Box(value, lo, hi, l2, rdev, e_lo, e_hi)


def product_forward(a: Box | Tensor, b: Box | Tensor) -> Box:
    """A @ B with at least one factor an activation: the centre product, and around it
    |ΔY| ≤ |ΔA|·|B₀| + |A₀|·|ΔB| + |ΔA|·|ΔB| (ΔA = 0 for a constant), intersected with the
    midpoint–radius product; rounding 2·γ_{k+4} of the magnitudes. Remainder:
    e_Y = A₀·e_B + e_A·B₀ + ΔA·ΔB (enclosures multiplied in midpoint–radius form); the op's
    own remainder is ΔA·ΔB (two activations; a product with a constant is affine)."""
    a0, da = (a.value, a.deviation()) if isinstance(a, Box) else (a, torch.zeros_like(a))
    b0, db = (b.value, b.deviation()) if isinstance(b, Box) else (b, torch.zeros_like(b))
    k = a0.shape[-1]
    value = a0 @ b0
    dev = da @ b0.abs() + a0.abs() @ db + da @ db
    err = 2 * gamma(k + 4) * (a0.abs() @ b0.abs() + dev) + TINY
    lo, hi = value - dev - err, value + dev + err
    mc, mr = iv_matmul(a.mid_rad() if isinstance(a, Box) else (a, None),
                       b.mid_rad() if isinstance(b, Box) else (b, None))
    e_lo = e_hi = own_lo = own_hi = None
    ea = a.e_mid_rad() if isinstance(a, Box) and a.has_e else None
    eb = b.e_mid_rad() if isinstance(b, Box) and b.has_e else None
    if (ea is not None or not isinstance(a, Box)) and (eb is not None or not isinstance(b, Box)):
        terms = []
        if eb is not None:
            terms.append(iv_matmul((a0, None), eb))
        if ea is not None:
            terms.append(iv_matmul(ea, (b0, None)))
        if isinstance(a, Box) and isinstance(b, Box):
            own_c, own_r = iv_matmul(mid_rad(*a.delta()), mid_rad(*b.delta()))
            own_lo, own_hi = own_c - own_r - err, own_c + own_r + err
            terms.append((own_c, own_r))
        c = sum(t[0] for t in terms)
        r = sum(t[1] for t in terms) + err
        e_lo, e_hi = c - r, c + r
    return Box(value, torch.maximum(lo, mc - mr), torch.minimum(hi, mc + mr),
               None, None, e_lo, e_hi, None, own_lo, own_hi)


def _matmul_forward(a: Any, b: Any) -> Box:
    a1, b1 = a.dim() == 1, b.dim() == 1
    if a1:
        a = _unsq(a, 0)
    if b1:
        b = _unsq(b, -1)
    out = product_forward(a, b)
    if b1:
        out = _sq(out, -1)
    if a1:
        out = _sq(out, -2)
    return out


def _unsq(x: Any, d: int) -> Any:
    if isinstance(x, Box):
        return _box_map(x, lambda t: t.unsqueeze(d))
    return x.unsqueeze(d)


def _sq(x: Box, d: int) -> Box:
    return _box_map(x, lambda t: t.squeeze(d))


def _box_map(x: Box, fn: Any) -> Box:
    """A Box with every elementwise part moved by ``fn`` (row deviations dropped)."""
    e_lo = fn(x.e_lo) if x.e_lo is not None else None
    e_hi = fn(x.e_hi) if x.e_hi is not None else None
    own = (fn(x.own_lo), fn(x.own_hi)) if x.has_own else (None, None)
    return Box(fn(x.value), fn(x.lo), fn(x.hi), None, None, e_lo, e_hi, None, *own)


@forward_rule(aten.linear)
def linear_forward(ctx: FwdCtx, x: Any, weight: Any, bias: Any = None) -> Box:
    """y = x·Wᵀ + b: :func:`right_forward` for a constant W, else the product rule."""
    if isinstance(x, Box) and not isinstance(weight, Box) and not isinstance(bias, Box):
        return right_forward(ctx, x, weight, bias)
    wt = _box_map(weight, _t) if isinstance(weight, Box) else _t(weight)
    out = _matmul_forward(x, wt)
    return out if bias is None else add_boxes(out, bias)


@forward_rule(aten.matmul, aten.mm, aten.bmm)
def matmul_forward(ctx: FwdCtx, a: Any, b: Any) -> Box:
    """A @ B: a constant right factor of rank 2 is a linear layer, else the product rule."""
    if isinstance(a, Box) and not isinstance(b, Box) and b.dim() == 2 and a.dim() >= 2:
        return right_forward(ctx, a, _t(b), None)
    return _matmul_forward(a, b)


@forward_rule(aten.addmm, aten.baddbmm)
def addmm_forward(ctx: FwdCtx, bias: Any, a: Any, b: Any, *, beta: float = 1,
                  alpha: float = 1) -> Box:
    """β·bias + α·(A @ B)."""
    prod = _matmul_forward(a, b)
    return add_boxes(scale_box(prod, float(alpha)), bias, float(beta))


@forward_rule(aten.conv1d, aten.conv2d, aten.convolution)
def conv_forward(ctx: FwdCtx, x: Box, weight: Any, bias: Any = None, *args: Any) -> Box:
    """Convolution with a constant kernel: around the centre, |Δy| ≤ conv_|W|(|Δx|), with
    the midpoint–radius form intersected; rounding γ_{K+2}·conv_|W|(|x₀| + ρ + |m| + ρ_m).
    Remainder: conv_W(e_x), radius through |W|."""
    if isinstance(weight, Box) or isinstance(bias, Box):
        raise LipcertError("a convolution whose kernel or bias depends on the input")
    target = ctx.target
    wa = ctx.cached(weight, "abs", lambda: weight.abs())
    m, mr = x.mid_rad()
    dev = x.deviation()
    value = target(x.value, weight, bias, *args)
    dy = target(dev, wa, None, *args)
    mc = target(m, weight, bias, *args)
    mrad = target(mr, wa, None, *args)
    k = weight[0].numel()
    babs = None if bias is None else bias.abs()
    err = gamma(k + 2) * target(x.value.abs() + dev + m.abs() + mr, wa, babs, *args) + TINY
    e_lo = e_hi = None
    if x.has_e:
        ec, er = x.e_mid_rad()
        yc = target(ec, weight, None, *args)
        yr = target(er, wa, None, *args)
        yr = yr + gamma(k + 2) * (target(ec.abs(), wa, None, *args) + yr) + err
        e_lo, e_hi = yc - yr, yc + yr
    return Box(value, torch.maximum(value - dy, mc - mrad) - err,
               torch.minimum(value + dy, mc + mrad) + err, None, None, e_lo, e_hi)
