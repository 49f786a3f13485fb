"""Elementwise arithmetic: add, sub, rsub, neg, mul, div.

Broadcasting: an operand expanded to the output shape gets the output gradient summed over
the expanded dimensions (``sum_to``). Products of two activations use the product rule
∂(ab)/∂a = b, ∂(ab)/∂b = a with the other factor enclosed by its forward interval over the
input set; for a quotient a/b (b's interval excluding 0), ∂/∂a = 1/b and ∂/∂b = −a/b².
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.backward.interval import Box, Grad, iv_times, mid_rad, mul, sum_to
from lipcert.bounds.backward.registry import BackCtx, FwdCtx, backward_rule, forward_rule
from lipcert.bounds.state import F64
from lipcert.errors import LipcertError

aten = torch.ops.aten
U = 2.0**-53


def _shape(x: Any) -> torch.Size:
    return x.shape if isinstance(x, Box | Tensor) else torch.Size([])


def _to(g: Grad | None, x: Any, s: float = 1.0) -> Grad | None:
    """s·G summed to the shape of operand x, or None for a constant operand."""
    if not isinstance(x, Box) or g is None:
        return None
    out = sum_to(g, _shape(x))
    return out if s == 1.0 else out.scaled(s)


@backward_rule(aten.add)
def add(ctx: BackCtx, g: Grad, a: Any, b: Any, alpha: float = 1) -> tuple[Any, ...]:
    """a + α·b: G_a = G, G_b = α·G."""
    return (_to(g, a), _to(g, b, float(alpha)))


@backward_rule(aten.sub)
def sub(ctx: BackCtx, g: Grad, a: Any, b: Any, alpha: float = 1) -> tuple[Any, ...]:
    """a − α·b: G_a = G, G_b = −α·G."""
    return (_to(g, a), _to(g, b, -float(alpha)))


@backward_rule(aten.rsub)
def rsub(ctx: BackCtx, g: Grad, a: Any, b: Any, alpha: float = 1) -> tuple[Any, ...]:
    """b − α·a: G_a = −α·G, G_b = G."""
    return (_to(g, a, -float(alpha)), _to(g, b))


@backward_rule(aten.neg)
def neg(ctx: BackCtx, g: Grad, a: Box) -> tuple[Any, ...]:
    """−a: G_a = −G."""
    return (g.scaled(-1.0),)


def _factor(x: Any) -> tuple[Tensor, Tensor | None]:
    """A factor as centre and radius: a Box's midpoint–radius form, or a constant."""
    if isinstance(x, Box):
        return mid_rad(x.lo, x.hi)
    return torch.as_tensor(x, dtype=F64), None


@backward_rule(aten.mul)
def mul_(ctx: BackCtx, g: Grad, a: Any, b: Any) -> tuple[Any, ...]:
    """a ⊙ b: G_a = G ⊙ b, G_b = G ⊙ a (each factor enclosed by its forward interval)."""
    ga = _to(mul(g, *_factor(b)), a) if isinstance(a, Box) else None
    gb = _to(mul(g, *_factor(a)), b) if isinstance(b, Box) else None
    return (ga, gb)


def _inverse(b: Any) -> tuple[Tensor, Tensor]:
    """An enclosure c ± r of 1/b (b a Box whose interval excludes 0, or a constant)."""
    if isinstance(b, Box):
        if not bool(((b.lo > 0) | (b.hi < 0)).all()):
            raise LipcertError("division by an activation whose interval contains 0")
        lo, hi = 1.0 / b.hi, 1.0 / b.lo
        c, r = mid_rad(lo, hi)
        return c, r + 2 * U * c.abs()
    inv = 1.0 / torch.as_tensor(b, dtype=F64)
    return inv, U * inv.abs()


@backward_rule(aten.div)
def div(ctx: BackCtx, g: Grad, a: Any, b: Any, rounding_mode: str | None = None
        ) -> tuple[Any, ...]:
    """a / b: G_a = G ⊙ (1/b), G_b = −G ⊙ a ⊙ (1/b)² (b's interval excluding 0)."""
    if rounding_mode is not None:
        raise LipcertError(f"division with rounding_mode={rounding_mode!r} has no gradient")
    ic, ir = _inverse(b)
    ga = _to(mul(g, ic, ir), a) if isinstance(a, Box) else None
    gb = None
    if isinstance(b, Box):
        ac, ar = _factor(a)
        q = mul(mul(Grad(ac, torch.zeros_like(ac) if ar is None else ar), ic, ir), ic, ir)
        gb = _to(mul(g, -q.c, q.r), b)
    return (ga, gb)


# --------------------------------------------------------------------------- forward


def _value(x: Any) -> Tensor:
    return x.value if isinstance(x, Box) else torch.as_tensor(x, dtype=F64)


def _ends(x: Any) -> tuple[Tensor, Tensor]:
    if isinstance(x, Box):
        return x.lo, x.hi
    t = torch.as_tensor(x, dtype=F64)
    return t, t


def _own_l2(x: Any, shape: torch.Size) -> Tensor | None:
    """A Box operand's per-sample deviation if the op does not broadcast it (0 for a
    constant; None if unknown)."""
    if not isinstance(x, Box):
        return torch.zeros(())
    return x.l2 if x.shape == shape else None


def rows_to(x: Any, shape: torch.Size) -> Tensor | None:
    """An operand's row deviations as rows of a broadcast output of ``shape`` (0 for a
    constant): broadcasting copies rows, or (a last dimension of 1) repeats one element k
    times, which multiplies the row's deviation by √k."""
    if not isinstance(x, Box):
        return torch.zeros(())
    if x.dim() == 0 or len(shape) == 0:
        return None
    r = x.row_dev()
    if x.shape[-1] != shape[-1]:
        r = r * math.sqrt(shape[-1]) * (1 + 2 * U)
    return r.expand(shape[:-1]) if r.dim() <= len(shape) - 1 else None


def e_ends(x: Any) -> tuple[Tensor, Tensor] | None:
    """The remainder enclosure of an operand: a Box's, 0 for a constant, None if unknown."""
    if isinstance(x, Box):
        return (x.e_lo, x.e_hi) if x.has_e else None
    z = torch.zeros((), dtype=F64)
    return z, z


def add_boxes(a: Any, b: Any, s: float = 1.0) -> Box:
    """a + s·b (Boxes, tensors or numbers): interval sum, widened by 2u of the magnitudes;
    per-sample and per-row deviations add."""
    value = _value(a) + s * _value(b)
    a_lo, a_hi = _ends(a)
    b_lo, b_hi = _ends(b)
    if s < 0:
        b_lo, b_hi = b_hi, b_lo
    lo, hi = a_lo + s * b_lo, a_hi + s * b_hi
    pad = 2 * U * torch.maximum(lo.abs(), hi.abs()) + 1e-300
    la, lb = _own_l2(a, value.shape), _own_l2(b, value.shape)
    l2 = None if la is None or lb is None else (la + abs(s) * lb) * (1 + 4 * U)
    ra, rb = rows_to(a, value.shape), rows_to(b, value.shape)
    rdev = None if ra is None or rb is None else (ra + abs(s) * rb) * (1 + 4 * U)
    ea, eb = e_ends(a), e_ends(b)
    e_lo = e_hi = None
    if ea is not None and eb is not None:
        b_lo, b_hi = (eb[0], eb[1]) if s >= 0 else (eb[1], eb[0])
        e_lo, e_hi = ea[0] + s * b_lo, ea[1] + s * b_hi
        e_pad = 2 * U * (torch.maximum(e_lo.abs(), e_hi.abs()) + value.abs()) + 1e-300
        e_lo, e_hi = (e_lo - e_pad).expand(value.shape), (e_hi + e_pad).expand(value.shape)
    return Box(value, lo - pad, hi + pad, l2, rdev, e_lo, e_hi)


def scaled_devs(x: Box, shape: torch.Size, c: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(l2, rdev) of x ⊙ c for a constant c (broadcast to ``shape``): ×max|c|."""
    cmax = float(c.abs().max()) * (1 + 2 * U) if c.numel() else 0.0
    l2 = x.l2 * cmax if x.l2 is not None and shape == x.shape else None
    r = rows_to(x, shape)
    return l2, None if r is None else r * cmax


def scale_box(x: Box, c: Any) -> Box:
    """x ⊙ c for a constant c: the products of the ends, widened by u; deviations × max|c|."""
    ct = torch.as_tensor(c, dtype=F64)
    value = x.value * ct
    p1, p2 = x.lo * ct, x.hi * ct
    lo, hi = torch.minimum(p1, p2), torch.maximum(p1, p2)
    pad = U * torch.maximum(lo.abs(), hi.abs()) + 1e-300
    return Box(value, lo - pad, hi + pad, *scaled_devs(x, value.shape, ct),
               *scaled_e(x, ct, value))


def scaled_e(x: Box, c: Tensor, value: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The remainder of x ⊙ c: [e]·c, widened by u of it and of the value (rounding)."""
    if not x.has_e:
        return None, None
    p1, p2 = x.e_lo * c, x.e_hi * c
    lo, hi = torch.minimum(p1, p2), torch.maximum(p1, p2)
    pad = 2 * U * (torch.maximum(lo.abs(), hi.abs()) + value.abs()) + 1e-300
    return lo - pad, hi + pad


def product_box(a: Box, b: Box) -> Box:
    """a ⊙ b of two activations: the natural interval product, intersected with the centre
    form |Δ(ab)| ≤ ρ_a|b₀| + |a₀|ρ_b + ρ_aρ_b. Remainder: ab − a₀b₀ − (b₀A_a + a₀A_b)δ =
    a₀e_b + b₀e_a + ΔaΔb, of which ΔaΔb is the op's own."""
    value = a.value * b.value
    cands = torch.stack([a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi])
    da, db = a.deviation(), b.deviation()
    dev = da * b.value.abs() + a.value.abs() * db + da * db
    lo = torch.maximum(cands.amin(0), value - dev)
    hi = torch.minimum(cands.amax(0), value + dev)
    pad = 4 * U * (torch.maximum(lo.abs(), hi.abs()) + dev) + 1e-300
    e_lo = e_hi = own_lo = own_hi = None
    if a.has_e and b.has_e:
        p_lo, p_hi = iv_times(*a.delta(), *b.delta())
        x_lo, x_hi = iv_times(a.value, a.value, b.e_lo, b.e_hi)
        y_lo, y_hi = iv_times(b.value, b.value, a.e_lo, a.e_hi)
        e_lo, e_hi = p_lo + x_lo + y_lo - pad, p_hi + x_hi + y_hi + pad
        own_lo, own_hi = p_lo - pad, p_hi + pad
    return Box(value, lo - pad, hi + pad, None, None, e_lo, e_hi, None, own_lo, own_hi)


@forward_rule(aten.add)
def add_forward(ctx: FwdCtx, a: Any, b: Any, alpha: float = 1) -> Box:
    """a + α·b."""
    if not isinstance(a, Box):
        return add_boxes(b, a, 1.0) if float(alpha) == 1.0 else add_boxes(
            scale_box(b, float(alpha)), a)
    return add_boxes(a, b, float(alpha))


@forward_rule(aten.sub)
def sub_forward(ctx: FwdCtx, a: Any, b: Any, alpha: float = 1) -> Box:
    """a − α·b."""
    if not isinstance(a, Box):
        return add_boxes(scale_box(b, -float(alpha)), a)
    return add_boxes(a, b, -float(alpha))


@forward_rule(aten.rsub)
def rsub_forward(ctx: FwdCtx, a: Any, b: Any, alpha: float = 1) -> Box:
    """b − α·a."""
    return add_boxes(scale_box(a, -float(alpha)), b) if isinstance(a, Box) else add_boxes(
        b, a, -float(alpha))


@forward_rule(aten.neg)
def neg_forward(ctx: FwdCtx, a: Box) -> Box:
    """−a."""
    return scale_box(a, -1.0)


@forward_rule(aten.mul)
def mul_forward(ctx: FwdCtx, a: Any, b: Any) -> Box:
    """a ⊙ b: by a constant, or of two activations (:func:`product_box`)."""
    if not isinstance(a, Box):
        a, b = b, a
    return product_box(a, b) if isinstance(b, Box) else scale_box(a, b)


def inverse_box(b: Box) -> Box:
    """1/b for an interval that excludes 0: decreasing on each side."""
    if not bool(((b.lo > 0) | (b.hi < 0)).all()):
        raise LipcertError("division by an activation whose interval contains 0")
    lo, hi = 1.0 / b.hi, 1.0 / b.lo
    pad = 2 * U * torch.maximum(lo.abs(), hi.abs())
    return Box(1.0 / b.value, lo - pad, hi + pad)


@forward_rule(aten.div)
def div_forward(ctx: FwdCtx, a: Any, b: Any, rounding_mode: str | None = None) -> Box:
    """a / b: a constant b scales (the quotients of the ends, widened by u); an activation
    b goes through 1/b and the product."""
    if rounding_mode is not None:
        raise LipcertError(f"division with rounding_mode={rounding_mode!r} is not Lipschitz")
    if isinstance(b, Box):
        inv = inverse_box(b)
        return product_box(a, inv) if isinstance(a, Box) else scale_box(inv, a)
    ct = torch.as_tensor(b, dtype=F64)
    value = a.value / ct
    q1, q2 = a.lo / ct, a.hi / ct
    lo, hi = torch.minimum(q1, q2), torch.maximum(q1, q2)
    pad = U * torch.maximum(lo.abs(), hi.abs()) + 1e-300
    inv = 1.0 / ct
    e_lo, e_hi = scaled_e(a, inv, value)
    if e_lo is not None:
        e_lo, e_hi = e_lo - U * inv.abs() * a.abs_max(), e_hi + U * inv.abs() * a.abs_max()
    return Box(value, lo - pad, hi + pad, *scaled_devs(a, value.shape, inv), e_lo, e_hi)
