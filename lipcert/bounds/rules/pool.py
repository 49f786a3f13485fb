"""Max and average pooling (1-D, 2-D, 3-D, and adaptive average pooling)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.registry import rule
from lipcert.bounds.state import F64, Bound, Ctx, Opaque, gamma, reduce_sid

aten = torch.ops.aten


def pooled_dims(target: Any) -> int:
    """How many trailing dimensions a pooling op pools (from its name: 1d, 2d or 3d)."""
    name = target.overloadpacket.__name__
    return 3 if "3d" in name else 2 if "2d" in name else 1


def per_dim(v: Any, n: int, default: Any) -> list[int]:
    """A pooling size argument (an int, one value, n values, or empty/None for
    ``default``) as n ints."""
    if v is None or (isinstance(v, list | tuple) and len(v) == 0):
        v = default
    if isinstance(v, int):
        return [v] * n
    v = [int(i) for i in v]
    return v * n if len(v) == 1 else v


def _plane_sid(x: Bound, out_shape: torch.Size, nd: int, what: str) -> Tensor | None:
    """Sample ids of the output: every pooled plane (last ``nd`` dims) is one sample's."""
    if x.sid is None:
        return None
    dims = tuple(range(x.dim() - nd, x.dim()))
    ps = reduce_sid(x.sid, dims, what)
    return ps.reshape(*ps.shape, *([1] * nd)).expand(out_shape)


def window_multiplicity(n: int, k: int, s: int, p: int, d: int, o: int) -> int:
    """The largest number of pooling windows (o windows of k taps, stride s, padding p,
    dilation d) that contain one position of a length-n input."""
    counts = [0] * n
    for i in range(o):
        for j in range(k):
            pos = i * s - p + j * d
            if 0 <= pos < n:
                counts[pos] += 1
    return max(counts) if counts else 0


@rule(
    aten.max_pool1d,
    aten.max_pool2d,
    aten.max_pool3d,
    aten.max_pool1d_with_indices,
    aten.max_pool2d_with_indices,
    aten.max_pool3d_with_indices,
)
def max_pool(
    ctx: Ctx,
    x: Bound,
    kernel_size: Any,
    stride: Any = None,
    padding: Any = 0,
    dilation: Any = 1,
    ceil_mode: bool = False,
) -> Any:
    """Max pooling. |Δ max_window| ≤ max_e |Δx_e| ≤ ‖Δx_window‖, and each input position lies
    in at most c windows (c = product over dims of the largest window count, computed
    exactly for the actual sizes), so ‖ΔY‖² ≤ c·‖ΔX‖²: lip ≤ √c·lip_x, and likewise
    ‖Y‖ ≤ √c·‖X‖. Max is increasing in each argument: Y ∈ [pool(lo), pool(hi)]."""
    target = ctx.node.target
    nd = pooled_dims(target)
    with_idx = "with_indices" in target.overloadpacket.__name__
    args = (kernel_size, stride if stride is not None else [], padding, dilation, ceil_mode)
    lo = target(x.lo, *args)
    hi = target(x.hi, *args)
    if with_idx:
        lo, hi = lo[0], hi[0]
    k = per_dim(kernel_size, nd, 1)
    s = per_dim(stride, nd, k)
    p = per_dim(padding, nd, 0)
    d = per_dim(dilation, nd, 1)
    c = 1
    for i in range(nd):
        c *= window_multiplicity(
            x.shape[-nd + i], k[i], s[i], p[i], d[i], lo.shape[-nd + i]
        )
    out = _pooled(ctx, x, lo, hi, math.sqrt(c), nd, "max pooling")
    return (out, Opaque("max pooling indices")) if with_idx else out


def _pooled(ctx: Ctx, x: Bound, lo: Tensor, hi: Tensor, factor: float, nd: int, what: str
            ) -> Bound:
    """The bound of a pooling whose Lipschitz factor (whole tensor) is ``factor``: lip, lip_tok
    and norm scale by it (lip_tok by the whole-tensor value, since pooling mixes rows)."""
    return Bound(lo, hi, factor * x.lip, factor * x.lip, factor * x.norm, ctx.full(math.inf),
                 sid=_plane_sid(x, lo.shape, nd, what))


def _avg_norm(target: Any, args: tuple[Any, ...], spatial: tuple[int, ...]) -> float:
    """Schur test for a linear map A with nonnegative entries: ‖A‖₂ ≤ √(‖A‖₁·‖A‖_∞), with
    the row sums A·1 and the column sums Aᵀ·1 computed exactly on a ones input by autograd."""
    ones = torch.ones(1, 1, *spatial, dtype=F64, requires_grad=True)
    out = target(ones, *args)
    (col,) = torch.autograd.grad(out.sum(), ones)
    k = max(1, math.prod(spatial))
    bound = float(out.detach().max()) * float(col.max()) * (1 + gamma(k)) ** 2
    return math.sqrt(bound) * (1 + 1e-15)


@rule(
    aten.avg_pool1d,
    aten.avg_pool2d,
    aten.avg_pool3d,
    aten.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d,
    aten._adaptive_avg_pool2d,
    aten._adaptive_avg_pool3d,
)
def avg_pool(ctx: Ctx, x: Bound, *args: Any) -> Bound:
    """Average pooling is linear with nonnegative weights: ‖A‖₂ ≤ √(max row sum · max column
    sum) (Schur test; computed for the actual sizes, padding and divisor), so
    lip ≤ ‖A‖·lip_x and ‖Y‖ ≤ ‖A‖·‖X‖; Y ∈ [A·lo, A·hi] (widened by γ for rounding)."""
    target = ctx.node.target
    nd = pooled_dims(target)
    spatial = tuple(x.shape[-nd:])
    f = ctx.cached(ctx.shape_cache, (*ctx.key("avgpool"), spatial), lambda: _avg_norm(
        target, args, spatial
    ))
    mag = torch.maximum(x.lo.abs(), x.hi.abs())
    slack = gamma(max(1, math.prod(spatial))) * target(mag, *args) + 1e-300
    lo = target(x.lo, *args) - slack
    hi = target(x.hi, *args) + slack
    return _pooled(ctx, x, lo, hi, f, nd, "average pooling")
