"""Normalisation layers: layer_norm, rms_norm, batch_norm (eval), and vector norms.

LayerNorm of a token x ∈ ℝ^d: u = P x (P = I − 11ᵀ/d, ‖P‖ = 1),
y = γ ⊙ u / s + β with s = √(‖u‖²/d + ε). The Jacobian of u ↦ u/s is
(I − uuᵀ/(d·s²))/s, whose eigenvalues are 1/s and ε/s³ ≤ 1/s, so
‖∂y/∂x‖ ≤ max|γ| / √(var + ε), var = ‖Px‖²/d. Over the input set var ≥ var_min, with
√(d·var_min) a lower bound of ‖P x‖: from the intervals (each centred component lies in
[lo_i − mean(hi), hi_i − mean(lo)], so ‖Px‖² ≥ Σ_i dist(0, that interval)²) and, in local
mode, ‖P x₀‖ − ‖P Δx‖ ≥ ‖P x₀‖ − lip_tok·r. Globally var_min = 0: max|γ|/√ε.
Outputs: a standardised component is at most √(d − 1) in size, and ‖u/s‖ ≤ √d.
RMSNorm is the same without P (and ε defaults to the input dtype's machine epsilon).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.errors import BatchMixingError, UnsupportedOpError
from lipcert.bounds.registry import rule
from lipcert.bounds.rules.affine import linear_comb, scale
from lipcert.bounds.state import (
    F64,
    Bound,
    Const,
    Ctx,
    Opaque,
    gamma,
    per_elem,
    reduce_sid,
    sample_max,
)

aten = torch.ops.aten


def _dist0_sq(lo: Tensor, hi: Tensor) -> Tensor:
    """dist(0, [lo, hi])² elementwise (0 when the interval contains 0)."""
    return torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo))).square()


def _const(x: Any, what: str) -> Tensor | None:
    if x is None:
        return None
    if isinstance(x, Bound):
        raise UnsupportedOpError(f"{what} that depends on the model input")
    return (x.t if isinstance(x, Const) else torch.as_tensor(x, dtype=F64)).detach().to(F64)


def normalize(
    ctx: Ctx,
    x: Bound,
    k: int,
    weight: Any,
    bias: Any,
    eps: float,
    centred: bool,
) -> Bound:
    """Shared LayerNorm (centred) / RMSNorm rule over the last ``k`` dimensions."""
    d = math.prod(x.shape[-k:]) if k else 1
    g = _const(weight, "a normalisation weight")
    b = _const(bias, "a normalisation bias")
    gmax = 1.0 if g is None else float(g.abs().max())
    dims = tuple(range(x.dim() - k, x.dim()))
    gsid = reduce_sid(x.sid, dims, "a normalisation layer")
    lo = x.lo.reshape(*x.shape[: x.dim() - k], d)
    hi = x.hi.reshape(*x.shape[: x.dim() - k], d)
    if centred:
        m_lo, m_hi = lo.mean(-1, keepdim=True), hi.mean(-1, keepdim=True)
        slack = gamma(d) * torch.maximum(lo.abs(), hi.abs()).mean(-1, keepdim=True)
        c_lo, c_hi = lo - m_hi - slack, hi - m_lo + slack
    else:
        c_lo, c_hi = lo, hi
    low_sq = _dist0_sq(c_lo, c_hi).sum(-1) * (1 - gamma(d))  # lower bound of ‖u‖²
    # Lipschitz bound of x's groups (tokens) in the input perturbation
    rows_per_group = d // (x.shape[-1] or 1) if k else 1
    grp_lip = torch.minimum(x.lip, math.sqrt(rows_per_group) * x.lip_tok) if k > 1 else x.lip_tok
    if ctx.local and x.value is not None:
        assert ctx.radius is not None
        v = x.value.reshape(lo.shape)
        if centred:
            v = v - v.mean(-1, keepdim=True)
        vn = torch.linalg.vector_norm(v, dim=-1) * (1 - gamma(d + 2))
        move = per_elem(grp_lip * ctx.radius, gsid, vn.shape)
        low = torch.maximum(low_sq.sqrt(), (vn - move).clamp(min=0))
    else:
        low = low_sq.sqrt()
    var_min = low.square() / d * (1 - 4 * 2.0**-53)
    factor = gmax / torch.sqrt(var_min + eps) * (1 + 1e-15)
    f = sample_max(factor, gsid, ctx.n)
    # output bounds
    comp = math.sqrt(d - 1) if centred else math.sqrt(d)
    gabs = torch.ones(x.shape[-k:], dtype=F64) if g is None else g.abs().expand(x.shape[-k:])
    b0 = torch.zeros((), dtype=F64) if b is None else b.expand(x.shape[-k:])
    out_lo = (b0 - gabs * comp).expand(x.shape).clone()
    out_hi = (b0 + gabs * comp).expand(x.shape).clone()
    b_norm = 0.0 if b is None else float(torch.linalg.vector_norm(b0))
    tok = gmax * math.sqrt(d) + b_norm
    inf = ctx.full(math.inf)
    return Bound(
        out_lo,
        out_hi,
        f * x.lip,
        f * x.lip_tok if k == 1 else f * x.lip,
        inf,
        ctx.full(tok * (1 + 1e-15)) if k == 1 else inf,
        sid=x.sid,
    )


@rule(aten.layer_norm)
def layer_norm(
    ctx: Ctx,
    x: Bound,
    normalized_shape: list[int],
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *args: Any,
) -> Bound:
    """LayerNorm: lip ≤ max|γ|/√(var_min + ε) (module docstring)."""
    return normalize(ctx, x, len(normalized_shape), weight, bias, float(eps), centred=True)


@rule(aten.native_layer_norm)
def native_layer_norm(
    ctx: Ctx, x: Bound, normalized_shape: list[int], weight: Any, bias: Any, eps: float
) -> tuple[Any, ...]:
    """native_layer_norm: the LayerNorm rule for the output; mean and rstd are opaque."""
    out = normalize(ctx, x, len(normalized_shape), weight, bias, float(eps), centred=True)
    return (out, Opaque("layer_norm mean"), Opaque("layer_norm rstd"))


@rule(aten.rms_norm)
def rms_norm(
    ctx: Ctx, x: Bound, normalized_shape: list[int], weight: Any = None, eps: Any = None
) -> Bound:
    """RMSNorm y = γ ⊙ x/√(‖x‖²/d + ε): lip ≤ max|γ|/√(ms_min + ε) (module docstring)."""
    if eps is None:
        val = ctx.node.meta.get("val") if ctx.node is not None else None
        dtype = val.dtype if isinstance(val, Tensor) else torch.float32
        eps = torch.finfo(dtype).eps
    return normalize(ctx, x, len(normalized_shape), weight, None, float(eps), centred=False)


def _affine_channels(ctx: Ctx, x: Bound, sc: Tensor, sh: Tensor) -> Bound:
    shape = [1] * x.dim()
    if x.dim() >= 2:
        shape[1] = -1
    else:
        shape[0] = -1
    y = scale(ctx, x, sc.reshape(shape))
    return linear_comb(ctx, [(1.0, y), (1.0, Const(sh.reshape(shape)))])


def _bn(
    ctx: Ctx, x: Bound, weight: Any, bias: Any, mean: Any, var: Any, training: bool, eps: float
) -> Bound:
    """Batch norm in eval mode is a per-channel affine map (channel = dim 1):
    y = x·γ/√(σ² + ε) + (β − μ·γ/√(σ² + ε)), handled by the scale and add rules."""
    if training or mean is None or var is None:
        raise BatchMixingError(
            "batch_norm in training mode (or without running statistics) normalises over the "
            "batch, which mixes samples: put the model in eval mode"
        )
    mu, v = _const(mean, "running mean"), _const(var, "running var")
    assert mu is not None and v is not None
    g = _const(weight, "batch norm weight")
    b = _const(bias, "batch norm bias")
    inv = 1.0 / torch.sqrt(v + eps)
    sc = inv if g is None else g * inv
    sh = -mu * sc if b is None else b - mu * sc
    out = _affine_channels(ctx, x, sc, sh)
    return out


@rule(aten.batch_norm)
def batch_norm(
    ctx: Ctx,
    x: Bound,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    training: bool,
    momentum: float,
    eps: float,
    *args: Any,
) -> Bound:
    """batch_norm: see :func:`_bn`."""
    return _bn(ctx, x, weight, bias, running_mean, running_var, training, float(eps))


@rule(aten._native_batch_norm_legit_no_training)
def native_batch_norm_eval(
    ctx: Ctx,
    x: Bound,
    weight: Any,
    bias: Any,
    running_mean: Any,
    running_var: Any,
    momentum: float,
    eps: float,
) -> tuple[Any, ...]:
    """Eval-mode batch norm of decomposed graphs: see :func:`_bn`."""
    out = _bn(ctx, x, weight, bias, running_mean, running_var, False, float(eps))
    return (out, Opaque("batch_norm mean"), Opaque("batch_norm invstd"))


@rule(aten.linalg_vector_norm)
def vector_norm(
    ctx: Ctx, x: Bound, ord: float = 2, dim: Any = None, keepdim: bool = False, **kwargs: Any
) -> Bound:
    """The L2 norm of groups (over ``dim``): |Δ‖x_g‖| ≤ ‖Δx_g‖, so summing over groups the map
    is 1-Lipschitz (lip unchanged); each output lies in [‖x_g‖_min, ‖x_g‖_max] from the
    intervals."""
    if float(ord) != 2.0:
        raise UnsupportedOpError(f"linalg_vector_norm with ord={ord} has no bound rule yet")
    dims = tuple(range(x.dim())) if dim is None else tuple(
        d % x.dim() for d in ([dim] if isinstance(dim, int) else dim)
    )
    sid = reduce_sid(x.sid, dims, "a vector norm")
    if keepdim and sid is not None:
        sid = sid.reshape([1 if i in dims else s for i, s in enumerate(x.shape)])
    sq_hi = torch.maximum(x.lo.square(), x.hi.square()).sum(dims, keepdim=keepdim)
    sq_lo = _dist0_sq(x.lo, x.hi).sum(dims, keepdim=keepdim)
    n_el = max(1, math.prod(x.shape[d] for d in dims))
    inf = ctx.full(math.inf)
    return Bound(
        (sq_lo * (1 - gamma(n_el))).sqrt(),
        (sq_hi * (1 + gamma(n_el))).sqrt(),
        x.lip,
        x.lip,
        x.norm,
        inf,
        sid=sid,
    )
