"""Pooling over the last nd dimensions: average (plain and adaptive), max, and L2-norm
pooling (deel-torchlip's ``ScaledL2NormPool2d``, fused by the bound engine into
``lipcert_thirdparty.l2_norm_pool``). Derivations: docs/local-margin.md, "Pooling, sorting
and batch norm".

A pooling window is a list of K taps into the flattened plane of S elements
(:class:`Windows`; a tap in the padding points at an extra element S, filled with −inf for
max pooling and with 0 for the others), so every rule works on (..., O, K) tensors, O the
number of windows. An input position lies in at most m windows (its multiplicity).

* **Average pooling** is linear with non-negative constant weights: y ∈ [A·lo, A·hi]
  widened by γ_{S+2}·A(|lo| + |hi|) for the rounding of the sums and the division,
  e_y = A·e_x (affine: no own remainder), ‖Δy‖ ≤ ‖A‖₂‖Δx‖ with ‖A‖₂ ≤ √(max row sum ·
  max column sum) (Schur test, both computed on a plane of ones). Backward: Aᵀ·G exactly
  (``shape.vjp_nonneg``).
* **Max pooling** is the top order statistic of every window (``order.py``): intervals
  [max lo, max hi]; backward, each window's gradient goes to every tap that can be its
  maximum on the set, hi_j ≥ max_l lo_l (interval dominance): G_y·[1, 1] for a single such
  tap (it is the maximum everywhere), G_y·[0, 1] for each of several (the Clarke weights are
  a probability vector over them), summed over the windows holding the position; own
  remainder R = max_j (u_j − u_a) for the tap a the centre's J₀ selects, in
  [max_j (lo_j − hi_a), max_j (hi_j − lo_a)] (both with the 0 of j = a); ‖Δy‖ ≤ √m·‖Δx‖
  since |Δ max| ≤ max_j |Δu_j|.
* **L2-norm pooling** y_w = s·‖u‖₂, u = x restricted to window w (s ≥ 0). With
  D ≥ ‖Δu‖ (the box's deviations in ℓ2), ‖u‖ ∈ [n_lo, n_hi] = [‖u₀‖ − D, ‖u₀‖ + D] ∩ the
  box's [√Σ dist(0, [u_j])², √Σ max(lo_j², hi_j²)]. Backward: ∂y/∂u_j = s·û_j, û = u/‖u‖;
  where n_lo > 0, û − û₀ = Δu/‖u‖ + û₀(‖u₀‖ − ‖u‖)/‖u‖ gives |û_j − û₀_j| ≤
  (|Δu_j| + |û₀_j|·D)/n_lo, intersected with [lo_j, hi_j]/[n_lo, n_hi] and [−1, 1]; where the
  set may reach u = 0 the Clarke gradient of the norm there is the unit ball, û_j ∈ [−1, 1].
  Own remainder (J₀ = s·û₀ᵀ): with p = ⟨û₀, Δu⟩, ‖u₀ + Δu‖ ≥ ‖u₀‖ + p (convexity) and
  ‖u₀ + Δu‖ ≤ ‖u₀‖ + p + ‖Δu‖²/(2‖u₀‖), since the square of the right side exceeds
  ‖u₀‖² + 2‖u₀‖p + ‖Δu‖² by (p + ‖Δu‖²/(2‖u₀‖))² and the right side is positive; and
  |‖u‖ − ‖u₀‖ − p| ≤ 2‖Δu‖. So R ∈ [0, s·min(D²/(2‖u₀‖), 2D)]. At a window that is 0 at the
  centre the norm has no derivative (torch's is NaN there): refused with Taylor models.
  ‖Δy‖ ≤ s·√m·‖Δx‖ (reverse triangle inequality per window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.backward.interval import TINY, Box, Grad, mid_rad
from lipcert.bounds.backward.registry import BackCtx, FwdCtx, backward_rule, forward_rule
from lipcert.bounds.backward.rules.order import order_remainders
from lipcert.bounds.backward.rules.shape import vjp_nonneg
from lipcert.bounds.rules.pool import per_dim, pooled_dims
from lipcert.bounds.rules.thirdparty import l2_norm_pool_op
from lipcert.bounds.state import F64, gamma
from lipcert.errors import LipcertError

aten = torch.ops.aten
U = 2.0**-53

MAX_POOLS = (aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool1d_with_indices,
             aten.max_pool2d_with_indices, aten.max_pool3d_with_indices)
AVG_POOLS = (aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
             aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d,
             aten._adaptive_avg_pool3d)


@dataclass(frozen=True)
class Windows:
    """The taps of every window: ``idx`` (O, K) into the flattened plane (S = ``plane``
    marks a tap in the padding), ``valid`` (O, K), and the multiplicity m."""

    idx: Tensor
    valid: Tensor
    plane: int
    multiplicity: int

    def gather(self, t: Tensor, nd: int, fill: float) -> Tensor:
        """(..., O, K): the taps of every window of ``t`` (..., *plane), ``fill`` in the
        padding."""
        flat = t.flatten(-nd)
        pad = torch.full((*flat.shape[:-1], 1), fill, dtype=flat.dtype)
        return torch.cat([flat, pad], -1)[..., self.idx]


def windows(plane: tuple[int, ...], out: tuple[int, ...], kernel: list[int],
            stride: list[int], padding: list[int], dilation: list[int]) -> Windows:
    """The windows of a pooling with these sizes (PyTorch's convention: window o of dim i
    starts at o·stride − padding, taps every ``dilation``; the output sizes say how many)."""
    nd = len(plane)
    flat = torch.zeros((1,) * (2 * nd), dtype=torch.long)
    valid = torch.ones((1,) * (2 * nd), dtype=torch.bool)
    for i in range(nd):
        pos = (torch.arange(out[i])[:, None] * stride[i] - padding[i]
               + torch.arange(kernel[i])[None, :] * dilation[i])
        shape = [1] * (2 * nd)
        shape[i], shape[nd + i] = out[i], kernel[i]
        pos = pos.reshape(shape)
        valid = valid & (pos >= 0) & (pos < plane[i])
        flat = flat * plane[i] + pos
    size = math.prod(plane)
    n_out, taps = math.prod(out), math.prod(kernel)
    valid = valid.expand(*out, *kernel).reshape(n_out, taps)
    idx = torch.where(valid, flat.expand(*out, *kernel).reshape(n_out, taps), size)
    counts = torch.bincount(idx[valid], minlength=size)
    return Windows(idx, valid, size, int(counts.max()) if counts.numel() else 0)


def scatter_taps(g: Grad, w: Windows, nd: int, shape: torch.Size,
                 weight: tuple[Tensor, Tensor]) -> Grad:
    """Σ over the windows holding each position of G_y·[weight of that tap], the weight an
    enclosure (centre, radius) of shape (..., O, K) like the input's windows; G (M, ...,
    *out). Products c·w and the radius |c|·w_r + r·(|w_c| + w_r) per tap, then sums of at most
    m terms per position: slack γ_{m+4} of the sums of |products| and radii."""
    wc, wr = weight
    gc, gr = g.c.flatten(-nd), g.r.flatten(-nd)
    lead = gc.shape[:-1]
    out_c = torch.zeros((*lead, w.plane + 1), dtype=F64)
    out_r, base = torch.zeros_like(out_c), torch.zeros_like(out_c)
    for k in range(w.idx.shape[1]):
        c_k, r_k = wc[..., k], wr[..., k]
        prod = gc * c_k
        rad = gc.abs() * r_k + gr * (c_k.abs() + r_k)
        tap = w.idx[:, k]
        out_c.index_add_(-1, tap, prod)
        out_r.index_add_(-1, tap, rad)
        base.index_add_(-1, tap, prod.abs())
    r = out_r + gamma(w.multiplicity + 4) * (base + out_r) + TINY
    full = (g.c.shape[0], *shape)
    return Grad(out_c[..., :-1].reshape(full), r[..., :-1].reshape(full))


# --------------------------------------------------------------------------- average


def _schur_norm(target: Any, args: tuple[Any, ...], plane: tuple[int, ...]) -> float:
    """‖A‖₂ ≤ √(max row sum · max column sum) for the non-negative map A of the pooling,
    with both sums computed on a plane of ones (rounded up by γ of the plane's size)."""
    ones = torch.ones(1, 1, *plane, dtype=F64, requires_grad=True)
    rows = target(ones, *args)
    (cols,) = torch.autograd.grad(rows.sum(), ones)
    k = max(1, math.prod(plane))
    return math.sqrt(float(rows.detach().max()) * float(cols.max())) * (1 + gamma(k + 4))


@forward_rule(*AVG_POOLS)
def avg_pool_forward(ctx: FwdCtx, x: Box, *args: Any) -> Box:
    """Average pooling: the op applied to value, lo, hi and the remainder's ends, with
    rounding slack; the sample's deviation scaled by the Schur bound (module docstring)."""
    target = ctx.target
    nd = pooled_dims(target)
    plane = tuple(x.shape[-nd:])
    slack_of = gamma(math.prod(plane) + 2)
    value = target(x.value, *args)
    slack = slack_of * target(x.lo.abs() + x.hi.abs(), *args) + TINY
    lo, hi = target(x.lo, *args) - slack, target(x.hi, *args) + slack
    e_lo = e_hi = None
    if x.has_e:
        e_slack = slack + slack_of * target(x.e_lo.abs() + x.e_hi.abs(), *args)
        e_lo, e_hi = target(x.e_lo, *args) - e_slack, target(x.e_hi, *args) + e_slack
    l2 = None
    if x.l2 is not None and x.dim() >= 2:
        l2 = x.l2 * _schur_norm(target, args, plane)
    return Box(value, lo, hi, l2, None, e_lo, e_hi)


@backward_rule(*AVG_POOLS)
def avg_pool_(ctx: BackCtx, g: Grad, x: Box, *args: Any) -> tuple[Any, ...]:
    """Aᵀ·G through the op's own vector–Jacobian product (module docstring)."""
    return vjp_nonneg(g, (x, *args), {}, ctx.target, sums=True)


# --------------------------------------------------------------------------- max


def _max_windows(target: Any, x_shape: torch.Size, out_shape: torch.Size,
                 kernel_size: Any, stride: Any, padding: Any, dilation: Any) -> Windows:
    nd = pooled_dims(target)
    k = per_dim(kernel_size, nd, 1)
    return windows(tuple(x_shape[-nd:]), tuple(out_shape[-nd:]), k, per_dim(stride, nd, k),
                   per_dim(padding, nd, 0), per_dim(dilation, nd, 1))


@forward_rule(*MAX_POOLS)
def max_pool_forward(ctx: FwdCtx, x: Box, kernel_size: Any, stride: Any = None,
                     padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False) -> Any:
    """Max pooling: [max lo, max hi] per window, the own and Taylor remainders of the top
    order statistic (``order.order_remainders``), ℓ2 deviation × √m (module docstring)."""
    target = ctx.target
    nd = pooled_dims(target)
    args = (kernel_size, [] if stride is None else stride, padding, dilation, ceil_mode)
    out = target(x.value, *args)
    value = out[0] if isinstance(out, tuple) else out
    w = _max_windows(target, x.shape, value.shape, kernel_size, stride, padding, dilation)
    v, lo, hi = (w.gather(t, nd, -math.inf) for t in (x.value, x.lo, x.hi))
    e = (w.gather(x.e_lo, nd, 0.0), w.gather(x.e_hi, nd, 0.0)) if x.has_e else None
    top = torch.tensor([v.shape[-1] - 1])
    (own_lo, own_hi), e_out = order_remainders(v, lo, hi, top, e)

    def shaped(t: Tensor) -> Tensor:
        return t.reshape(value.shape)

    e_lo = e_hi = None
    if e_out is not None:
        e_lo, e_hi = shaped(e_out[0]), shaped(e_out[1])
    l2 = None
    if x.l2 is not None and x.dim() >= 2:
        l2 = x.l2 * math.sqrt(w.multiplicity) * (1 + 4 * U)
    box = Box(value, shaped(lo.amax(-1)), shaped(hi.amax(-1)), l2, None, e_lo, e_hi, None,
              shaped(own_lo), shaped(own_hi))
    return (box, out[1]) if isinstance(out, tuple) else box


@backward_rule(*MAX_POOLS)
def max_pool_(ctx: BackCtx, g: Any, x: Box, kernel_size: Any, stride: Any = None,
              padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False
              ) -> tuple[Any, ...]:
    """Every window's gradient to the taps that can be its maximum (module docstring)."""
    gy = g[0] if isinstance(g, list | tuple) else g
    rest = (None,) * 5
    if gy is None:
        return (None, *rest)
    nd = pooled_dims(ctx.target)
    out_shape = gy.shape[1:]
    w = _max_windows(ctx.target, x.shape, out_shape, kernel_size, stride, padding, dilation)
    lo = w.gather(x.lo, nd, -math.inf)
    hi = w.gather(x.hi, nd, -math.inf)
    can = w.valid & (hi >= lo.amax(-1, keepdim=True))
    single = can.sum(-1, keepdim=True) == 1
    wc = torch.where(can, torch.where(single, 1.0, 0.5), 0.0).to(F64)
    wr = torch.where(can & ~single, 0.5, 0.0).to(F64)
    return (scatter_taps(gy, w, nd, x.shape, (wc, wr)), *rest)


# --------------------------------------------------------------------------- L2 norm


def _l2_windows(x_shape: torch.Size, out_shape: torch.Size, kernel_size: list[int],
                stride: list[int]) -> Windows:
    nd = len(kernel_size)
    k = [int(i) for i in kernel_size]
    return windows(tuple(x_shape[-nd:]), tuple(out_shape[-nd:]), k, per_dim(stride, nd, k),
                   [0] * nd, [1] * nd)


@dataclass
class _Norms:
    """Per window (..., O): ‖u₀‖, D ≥ ‖Δu‖ and [n_lo, n_hi] ∋ ‖u‖ over the set."""

    n0: Tensor
    big_d: Tensor
    n_lo: Tensor
    n_hi: Tensor


def _window_norms(x: Box, w: Windows, nd: int) -> _Norms:
    """The window norms of the module docstring, rounded outwards."""
    v, lo, hi = (w.gather(t, nd, 0.0) for t in (x.value, x.lo, x.hi))
    k = v.shape[-1]
    grow = 1 + gamma(k + 2)
    n0 = torch.linalg.vector_norm(v, dim=-1)
    big_d = torch.linalg.vector_norm(torch.maximum(hi - v, v - lo).clamp(min=0), dim=-1) * grow
    dist = torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo)))
    box_lo = (dist.square().sum(-1) * (1 - gamma(k + 2))).sqrt()
    box_hi = (torch.maximum(lo.square(), hi.square()).sum(-1) * grow).sqrt()
    n_lo = torch.maximum((n0 * (1 - gamma(k + 2)) - big_d).clamp(min=0), box_lo)
    n_hi = torch.minimum(n0 * grow + big_d, box_hi)
    return _Norms(n0, big_d, n_lo, n_hi)


def _scale(scale: Any) -> float:
    s = float(scale)
    if not s >= 0:
        raise LipcertError(f"L2-norm pooling with the scale {s} (must be ≥ 0)")
    return s


@forward_rule(l2_norm_pool_op)
def l2_norm_pool_forward(ctx: FwdCtx, x: Box, kernel_size: list[int], stride: list[int],
                         scale: float) -> Box:
    """y_w = s·‖u‖: s·[n_lo, n_hi]; remainder e_y = s⟨û₀, e_u⟩ + R with
    R ∈ [0, s·min(D²/(2‖u₀‖), 2D)]; ℓ2 deviation × s√m (module docstring)."""
    s = _scale(scale)
    nd = len(kernel_size)
    value = ctx.target(x.value, kernel_size, stride, scale)
    w = _l2_windows(x.shape, value.shape, kernel_size, stride)
    nm = _window_norms(x, w, nd)
    k = w.idx.shape[1]
    lo = (s * nm.n_lo * (1 - 4 * U)).reshape(value.shape)
    hi = (s * nm.n_hi * (1 + 4 * U)).reshape(value.shape)
    l2 = None
    if x.l2 is not None and x.dim() >= 2:
        l2 = x.l2 * s * math.sqrt(w.multiplicity) * (1 + 4 * U)
    e_lo = e_hi = own_lo = own_hi = None
    if x.has_e:
        if bool((nm.n0 == 0).any()):
            raise LipcertError("L2-norm pooling of a window that is 0 at the centre input, "
                               "where the norm has no derivative: margin mode needs one")
        n0_lo = nm.n0 * (1 - gamma(k + 2))
        own = s * torch.minimum(nm.big_d.square() / (2 * n0_lo), 2 * nm.big_d)
        own = (own * (1 + 8 * U)).reshape(value.shape)
        unit = w.gather(x.value, nd, 0.0) / nm.n0.unsqueeze(-1)
        ec, er = x.e_mid_rad()
        ec, er = w.gather(ec, nd, 0.0), w.gather(er, nd, 0.0)
        lin_c = s * (unit * ec).sum(-1)
        lin_r = s * (unit.abs() * er).sum(-1)
        lin_r = lin_r + gamma(k + 6) * (s * (unit.abs() * ec.abs()).sum(-1) + lin_r)
        lin_c, lin_r = lin_c.reshape(value.shape), lin_r.reshape(value.shape) + TINY
        e_lo, e_hi = lin_c - lin_r, lin_c + lin_r + own
        own_lo, own_hi = torch.zeros_like(own), own
    return Box(value, lo, hi, l2, None, e_lo, e_hi, None, own_lo, own_hi)


def _unit_range(x: Box, w: Windows, nd: int) -> tuple[Tensor, Tensor]:
    """An enclosure (centre, radius) of û_j = u_j/‖u‖ for every tap, (..., O, K) (module
    docstring): [−1, 1] where the window may reach 0."""
    nm = _window_norms(x, w, nd)
    v, lo, hi = (w.gather(t, nd, 0.0) for t in (x.value, x.lo, x.hi))
    k = v.shape[-1]
    n_lo, n_hi = nm.n_lo.unsqueeze(-1), nm.n_hi.unsqueeze(-1)
    safe = n_lo > 0
    n_safe = torch.where(safe, n_lo, 1.0)
    u0 = v / nm.n0.clamp(min=1e-300).unsqueeze(-1)
    dev = torch.maximum(hi - v, v - lo).clamp(min=0)
    rad = ((dev + u0.abs() * nm.big_d.unsqueeze(-1)) / n_safe * (1 + 4 * U)
           + gamma(k + 4) * u0.abs() + TINY)
    q = torch.stack([lo / n_safe, lo / n_hi, hi / n_safe, hi / n_hi])
    q_lo = q.amin(0) - 2 * U * q.abs().amax(0) - TINY
    q_hi = q.amax(0) + 2 * U * q.abs().amax(0) + TINY
    u_lo = torch.maximum(torch.maximum(u0 - rad, q_lo), torch.tensor(-1.0, dtype=F64))
    u_hi = torch.minimum(torch.minimum(u0 + rad, q_hi), torch.tensor(1.0, dtype=F64))
    u_lo = torch.where(safe, u_lo, -1.0)
    u_hi = torch.where(safe, torch.maximum(u_hi, u_lo), 1.0)
    return mid_rad(u_lo, u_hi)


@backward_rule(l2_norm_pool_op)
def l2_norm_pool_(ctx: BackCtx, g: Grad, x: Box, kernel_size: list[int], stride: list[int],
                  scale: float) -> tuple[Any, ...]:
    """G_u_j = Σ_w G_y_w·s·û_j over the windows holding j (module docstring)."""
    s = _scale(scale)
    nd = len(kernel_size)
    w = _l2_windows(x.shape, g.shape[1:], kernel_size, stride)
    uc, ur = _unit_range(x, w, nd)
    valid = w.valid.to(F64)
    wc = s * uc * valid
    weight = (wc, s * ur * valid * (1 + 2 * U) + 2 * U * wc.abs())
    return (scatter_taps(g, w, nd, x.shape, weight), None, None, None)
