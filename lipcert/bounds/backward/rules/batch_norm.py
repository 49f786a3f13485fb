"""Batch norm in eval mode: a per-channel affine map (channel = dim 1, or dim 0 of a 1-D
input), y = (x − μ)·a + β with a = γ/√(σ² + ε) from the running statistics (derivation:
docs/local-margin.md, "Pooling, sorting and batch norm").

a is computed in float64 (a sum, a root, a quotient and a product: relative error below
4u), so the rules use the enclosure a_c ± 6u·|a_c|. Forward: the interval product
[lo − μ, hi − μ]·[a] + β, intersected with the centre form y₀ ± max|a|·|Δx| (y₀ the op's own
float64 value, with slack 8u of the magnitudes involved); the remainder e_y = a·e_x (affine:
no own remainder); per-row and per-sample deviations scaled by the channel's (the tensor's)
largest |a|. Backward: G_x = G_y·a, the channel's enclosure broadcast. Training mode mixes
the samples of a batch and is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.backward.interval import TINY, Box, Grad, iv_times, mul
from lipcert.bounds.backward.registry import BackCtx, FwdCtx, backward_rule, forward_rule
from lipcert.bounds.backward.rules.norm import constant
from lipcert.errors import LipcertError

aten = torch.ops.aten
U = 2.0**-53


def coefficients(x: Box, weight: Any, bias: Any, mean: Any, var: Any, eps: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(μ, a_c, a_r, β), each shaped to broadcast against x along its channel dimension."""
    mu = constant(mean, "a batch norm running mean")
    v = constant(var, "a batch norm running variance")
    if mu is None or v is None:
        raise LipcertError("batch norm without running statistics normalises over the batch, "
                           "which mixes samples: put the model in eval mode")
    g, b = constant(weight, "a batch norm weight"), constant(bias, "a batch norm bias")
    a = 1.0 / torch.sqrt(v + float(eps))
    if g is not None:
        a = a * g
    shape = [-1] + [1] * (x.dim() - 2) if x.dim() >= 2 else [-1]
    beta = torch.zeros_like(a) if b is None else b
    return (mu.reshape(shape), a.reshape(shape), (6 * U * a.abs() + TINY).reshape(shape),
            beta.reshape(shape))


def affine_box(x: Box, value: Tensor, mu: Tensor, ac: Tensor, ar: Tensor, beta: Tensor
               ) -> Box:
    """The forward intervals of y = (x − μ)·a + β (module docstring)."""
    a_lo, a_hi = ac - ar, ac + ar
    d_lo, d_hi = x.lo - mu, x.hi - mu
    d_lo, d_hi = d_lo - 2 * U * d_lo.abs(), d_hi + 2 * U * d_hi.abs()
    p_lo, p_hi = iv_times(d_lo, d_hi, a_lo, a_hi)
    lo = p_lo + beta - 2 * U * (p_lo.abs() + beta.abs())
    hi = p_hi + beta + 2 * U * (p_hi.abs() + beta.abs())
    steep = torch.maximum(a_lo.abs(), a_hi.abs())
    move = steep * x.deviation()
    slack = 8 * U * (value.abs() + steep * (x.value - mu).abs() + beta.abs() + move) + TINY
    lo = torch.maximum(lo, value - move - slack)
    hi = torch.minimum(hi, value + move + slack)
    e_lo = e_hi = None
    if x.has_e:
        e_lo, e_hi = iv_times(x.e_lo, x.e_hi, a_lo, a_hi)
    l2 = None if x.l2 is None or x.dim() < 2 else x.l2 * float(steep.max()) * (1 + 2 * U)
    rdev = None
    if x.dim() >= 3:
        rdev = x.row_dev() * steep.squeeze(-1) * (1 + 2 * U)
    elif x.dim() == 2:
        rdev = x.row_dev() * float(steep.max()) * (1 + 2 * U)
    return Box(value, lo, hi, l2, rdev, e_lo, e_hi)


@forward_rule(aten._native_batch_norm_legit_no_training)
def native_batch_norm_forward(ctx: FwdCtx, x: Box, weight: Any, bias: Any, running_mean: Any,
                              running_var: Any, momentum: float, eps: float
                              ) -> tuple[Any, ...]:
    """Eval-mode batch norm of exported graphs: the output's intervals (module docstring);
    the other two outputs (empty in eval mode) are constants."""
    out = ctx.target(x.value, weight, bias, running_mean, running_var, momentum, eps)
    coeffs = coefficients(x, weight, bias, running_mean, running_var, eps)
    return (affine_box(x, out[0], *coeffs), *out[1:])


@forward_rule(aten.batch_norm)
def batch_norm_forward(ctx: FwdCtx, x: Box, weight: Any, bias: Any, running_mean: Any,
                       running_var: Any, training: bool, momentum: float, eps: float,
                       *args: Any) -> Box:
    """``batch_norm`` in eval mode (module docstring)."""
    if training:
        raise LipcertError("batch norm in training mode normalises over the batch, which "
                           "mixes samples: put the model in eval mode")
    value = ctx.target(x.value, weight, bias, running_mean, running_var, training, momentum,
                       eps, *args)
    coeffs = coefficients(x, weight, bias, running_mean, running_var, eps)
    return affine_box(x, value, *coeffs)


def _backward(g: Any, x: Box, weight: Any, bias: Any, mean: Any, var: Any, eps: float
              ) -> Grad | None:
    gy = g[0] if isinstance(g, list | tuple) else g
    if gy is None:
        return None
    _, ac, ar, _ = coefficients(x, weight, bias, mean, var, eps)
    return mul(gy, ac, ar)


@backward_rule(aten._native_batch_norm_legit_no_training)
def native_batch_norm_(ctx: BackCtx, g: Any, x: Box, weight: Any, bias: Any,
                       running_mean: Any, running_var: Any, momentum: float, eps: float
                       ) -> tuple[Any, ...]:
    """G_x = G_y·a (module docstring)."""
    gx = _backward(g, x, weight, bias, running_mean, running_var, eps)
    return (gx, None, None, None, None, None, None)


@backward_rule(aten.batch_norm)
def batch_norm_(ctx: BackCtx, g: Any, x: Box, weight: Any, bias: Any, running_mean: Any,
                running_var: Any, training: bool, momentum: float, eps: float, *args: Any
                ) -> tuple[Any, ...]:
    """G_x = G_y·a (module docstring)."""
    gx = _backward(g, x, weight, bias, running_mean, running_var, eps)
    return (gx, *([None] * (7 + len(args))))
