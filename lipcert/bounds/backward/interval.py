"""Centre–radius intervals: the enclosures the backward pass computes with.

An enclosure ``Grad(c, r)`` stands for every tensor G with |G − c| ≤ r elementwise (r ≥ 0).
Forward intervals of activations are ``Box(value, lo, hi, l2, rdev)``: the activation x₀ at
the centre input, elementwise bounds of x over the whole input set, and optionally bounds of
the deviation x − x₀ in ℓ2: per sample (``l2``, when dim 0 is the batch) and per row of the
last dimension (``rdev``, a token's deviation), which keep the geometry of the input ball
that elementwise boxes lose. ``e_lo``, ``e_hi`` enclose the second-order remainder of the
Taylor model x = x₀ + A·δ + e (δ the input's deviation from the centre, A the exact
Jacobian at the centre), whose first-order part the forward walk bounds by r·‖A_row‖.
Every rule computes it as e_y = J₀·e_x + R_y (J₀ the op's Jacobian at the centre); a rule
of an op that is not affine also reports its own term R_y (``own_lo``, ``own_hi``), an
enclosure of y − y₀ − J₀·(x − x₀) over the op's input set, which the symbolic remainders
(``symbolic.py``) carry without wrapping.

Float64 rounding (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1 and (3.5)):
a sum of k products computed in floating point differs from the exact one by at most
γ_k·Σ|a_i||b_i|, γ_k = k·u/(1 − k·u), u = 2⁻⁵³. Every product of enclosures below adds
that slack to the radius, computed from the same absolute values it bounds; elementwise
operations add γ of their operation count relative to |c| + r. The radius computations
themselves only add non-negative terms, whose relative rounding error the same γ covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lipcert.bounds.state import F64, BoxDomain, Domain, gamma

TINY = 1e-300  # covers underflow of products of tiny magnitudes
U = 2.0**-53  # float64 unit roundoff


@dataclass
class Grad:
    """The enclosure c ± r of a gradient; dim 0 is the margin axis."""

    c: Tensor
    r: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.c.shape

    def __add__(self, other: Grad) -> Grad:
        c = self.c + other.c
        r = self.r + other.r
        return Grad(c, widen(c, r, 2))

    def scaled(self, s: float | Tensor) -> Grad:
        """s·G for a constant s (a number or a tensor broadcast against G)."""
        s = torch.as_tensor(s, dtype=F64)
        c = self.c * s
        return Grad(c, widen(c, self.r * s.abs(), 2))

    def t(self) -> Grad:
        """Both parts with their last two dimensions swapped."""
        return Grad(self.c.transpose(-1, -2), self.r.transpose(-1, -2))

    def map(self, fn: object) -> Grad:
        """An exact rearrangement of the elements (both parts moved alike)."""
        return Grad(fn(self.c), fn(self.r))  # type: ignore[operator]


def worst_slopes(g: Grad, x: Tensor, domain: Domain | None) -> Tensor:
    """Per coordinate k, the largest −G_k·δ_k/|δ_k| over G ∈ g and the directions δ_k the
    domain allows at x (broadcast against g): |G_c,k| + G_r,k for a free coordinate; on a box
    domain a coordinate at the lower end can only grow (δ_k ≥ 0), max(0, G_r,k − G_c,k),
    and one at the upper end only shrink, max(0, G_c,k + G_r,k). By Cauchy–Schwarz,
    −⟨G, δ⟩ ≤ ‖v‖·‖δ‖ for every allowed δ, v these slopes (docs/local-margin.md,
    "The certificate")."""
    v = g.c.abs() + g.r
    if isinstance(domain, BoxDomain):
        v = torch.where(x <= domain.lo, (g.r - g.c).clamp(min=0), v)
        v = torch.where(x >= domain.hi, (g.c + g.r).clamp(min=0), v)
    return v


@dataclass
class GroupDot:
    """The range [lo, hi] over the input set of ⟨w_g, x_g − x₀_g⟩ for every group g of an
    activation's last ``d`` elements (groups in the order of ``x.reshape(-1, d)``), with
    ``w`` (groups, d) a fixed vector per group: the centre's centred values, for the
    LayerNorm that reads x (``symbolic.py``)."""

    w: Tensor
    lo: Tensor  # (groups, 1)
    hi: Tensor


@dataclass
class Box:
    """Forward intervals of one activation: ``value`` at the centre input and ``lo``, ``hi``
    over the input set (float64, the activation's shape; ``value`` lies in [lo, hi])."""

    value: Tensor
    lo: Tensor
    hi: Tensor
    l2: Tensor | None = None  # (n,) bound of ‖x − x₀‖₂ per sample when dim 0 is the batch
    rdev: Tensor | None = None  # shape[:-1]: bound of ‖x_row − x₀_row‖₂ per row (last dim)
    e_lo: Tensor | None = None  # remainder x − x₀ − A·(input − centre) ∈ [e_lo, e_hi], A the
    e_hi: Tensor | None = None  # exact Jacobian at the centre (None: not tracked)
    aux: dict[str, Tensor] | None = None  # a rule's internal enclosures, for its backward rule
    own_lo: Tensor | None = None  # the op's own remainder y − y₀ − J₀(x − x₀) ∈ [own_lo,
    own_hi: Tensor | None = None  # own_hi] (None: affine op, or not tracked)
    dot: GroupDot | None = None  # ⟨u₀, x − x₀⟩ per group, for a normalisation reading x
    own_rows: Tensor | None = None  # shape[:-1]: bound of the own remainder's ‖row‖₂
    mdev: Tensor | None = None  # shape[:-2]: bound of ‖x − x₀‖_F over the last two dims
    # shape[:-1]: r·‖A_row‖₂ ≥ ‖A_row·δ‖, the first-order part of the row deviation, where
    # the input pass recorded the row's Gram matrix and the input units A_row reads
    # (``FwdCtx.units``)
    lin_rows: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    def dim(self) -> int:
        return self.value.dim()

    def mid_rad(self) -> tuple[Tensor, Tensor]:
        """Midpoint m and radius ρ with [lo, hi] ⊆ [m − ρ, m + ρ] despite rounding."""
        return mid_rad(self.lo, self.hi)

    def abs_max(self) -> Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def row_dev(self) -> Tensor:
        """A bound of ‖x_row − x₀_row‖₂ per row: ``rdev`` or the box's."""
        if self.rdev is not None:
            return self.rdev
        return row_norm(self.deviation())

    @property
    def has_e(self) -> bool:
        return self.e_lo is not None and self.e_hi is not None

    @property
    def has_own(self) -> bool:
        return self.own_lo is not None and self.own_hi is not None

    def e_mid_rad(self) -> tuple[Tensor, Tensor]:
        """The remainder's enclosure as midpoint and radius."""
        assert self.e_lo is not None and self.e_hi is not None
        return mid_rad(self.e_lo, self.e_hi)

    def delta(self) -> tuple[Tensor, Tensor]:
        """Enclosure [lo − x₀, hi − x₀] of the deviation x − x₀."""
        return self.lo - self.value, self.hi - self.value

    def deviation(self) -> Tensor:
        """ρ ≥ 0 with |x − x₀| ≤ ρ elementwise over the input set."""
        return torch.maximum(self.hi - self.value, self.value - self.lo).clamp(min=0)


def row_norm(t: Tensor) -> Tensor:
    """‖t_row‖₂ over the last dimension, rounded up."""
    if t.dim() == 0:
        return t.abs()
    return torch.linalg.vector_norm(t, dim=-1) * (1 + gamma(t.shape[-1] + 2))


def mid_rad(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Midpoint m and radius ρ with [lo, hi] ⊆ [m − ρ, m + ρ] despite rounding."""
    m = (lo + hi) / 2
    return m, torch.maximum(hi - m, m - lo) * (1 + 4 * 2.0**-53)


def widen(c: Tensor, r: Tensor, ops: int) -> Tensor:
    """The radius r enlarged by γ_ops·(|c| + r): the rounding of ``ops`` elementwise
    floating-point operations that produced c and r."""
    return r + gamma(ops) * (c.abs() + r) + TINY


def mul(g: Grad, dc: Tensor, dr: Tensor | None = None) -> Grad:
    """Elementwise product of G with the enclosure dc ± dr (dr None: the constant dc).
    Midpoint–radius product (Rump 1999): (c₁ ± r₁)(c₂ ± r₂) ⊆ c₁c₂ ± (|c₁|r₂ + r₁|c₂| + r₁r₂)."""
    c = g.c * dc
    r = g.r * dc.abs() if dr is None else g.c.abs() * dr + g.r * (dc.abs() + dr)
    return Grad(c, widen(c, r, 6))


def matmul(a: Grad, bc: Tensor, br: Tensor | None = None) -> Grad:
    """The enclosure of A·B (torch.matmul, batched) for A ∈ a and B ∈ bc ± br (br None:
    B = bc exactly). Radius |A_c|·B_r + A_r·(|B_c| + B_r), plus the rounding slack
    2·γ_{k+2}·(|A_c|·|B_c| + radius) of k-term dot products."""
    k = bc.shape[-2] if bc.dim() >= 2 else bc.shape[0]
    c = torch.matmul(a.c, bc)
    bca = bc.abs()
    if br is None:
        both = torch.matmul(torch.stack([a.r, a.c.abs()]), bca)
        r, base = both[0], both[1]
    else:
        r = torch.matmul(a.c.abs(), br) + torch.matmul(a.r, bca + br)
        base = torch.matmul(a.c.abs(), bca)
    return Grad(c, r + 2 * gamma(k + 2) * (base + r) + TINY)


def dot_last(a: Grad, bc: Tensor, br: Tensor, keepdim: bool = True) -> Grad:
    """The enclosure of Σ_i a_i b_i over the last dimension (b ∈ bc ± br)."""
    k = a.c.shape[-1]
    c = (a.c * bc).sum(-1, keepdim=keepdim)
    r = (a.c.abs() * br + a.r * (bc.abs() + br)).sum(-1, keepdim=keepdim)
    base = (a.c.abs() * bc.abs()).sum(-1, keepdim=keepdim)
    return Grad(c, r + 2 * gamma(k + 4) * (base + r) + TINY)


def sum_to(g: Grad, shape: torch.Size) -> Grad:
    """The gradient of an operand that was broadcast to G's trailing shape: G summed over
    the broadcast dimensions (the margin axis, dim 0, stays)."""
    target = torch.Size((g.c.shape[0], *shape))
    if g.c.shape == target:
        return g
    lead = g.c.dim() - len(target)
    dims = list(range(1, 1 + lead))
    dims += [lead + i for i in range(1, len(target)) if target[i] == 1 and g.c.shape[lead + i] != 1]
    if not dims:
        return Grad(g.c.reshape(target), g.r.reshape(target))
    c = g.c.sum(dims, keepdim=True).reshape(target)
    r = g.r.sum(dims, keepdim=True).reshape(target)
    base = g.c.abs().sum(dims, keepdim=True).reshape(target)
    k = g.c.numel() // max(c.numel(), 1)
    return Grad(c, r + gamma(k + 1) * (base + r) + TINY)


def iv_times(a_lo: Tensor, a_hi: Tensor, b_lo: Tensor, b_hi: Tensor) -> tuple[Tensor, Tensor]:
    """The elementwise interval product [a]·[b] (broadcast), widened by 4u of its ends."""
    c = torch.stack(torch.broadcast_tensors(a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi))
    lo, hi = c.amin(0), c.amax(0)
    pad = 4 * U * torch.maximum(lo.abs(), hi.abs()) + TINY
    return lo - pad, hi + pad


def iv_matmul(a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None]
              ) -> tuple[Tensor, Tensor]:
    """A·B for interval matrices in midpoint–radius form (a radius None: exact), as
    (centre, radius) with the rounding slack 2·γ_{k+4}·(|A_c|·|B_c| + radius)."""
    (ac, ar), (bc, br) = a, b
    k = ac.shape[-1]
    c = ac @ bc
    r = torch.zeros_like(c)
    if br is not None:
        r = r + ac.abs() @ br
    if ar is not None:
        r = r + ar @ (bc.abs() if br is None else bc.abs() + br)
    return c, r + 2 * gamma(k + 4) * (ac.abs() @ bc.abs() + r) + TINY
