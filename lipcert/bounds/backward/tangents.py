"""One op's forward-mode derivative applied to a stack of tangents (dim 0: the tangents)
at the centre values: ``push`` maps the tangents of a node's arguments to its own.

Most ops go through ``torch.func.jvp`` vectorised with ``torch.vmap``. The common ones have
exact shortcuts that skip recomputing the op's value for every stack:

* ``linear`` and matrix products with one tangent-carrying factor: the same product with
  the tangent (the map is linear in that factor);
* element moves (reshape, permute, slice, …) and sums or means with one tensor argument:
  the op itself applied to the tangents (it is linear);
* pointwise ops: Σ_i (∂f/∂x_i)·t_i elementwise, the partial derivatives computed once per
  node (``coeffs``) by ``jvp`` with a tangent of ones (each output element depends on its
  own element of each input only, so that jvp gives ∂f/∂x_i elementwise);
* ``layer_norm`` over the last dimension, y = w ⊙ ẑ + b with ẑ = (x − μ)·ρ,
  ρ = (σ² + ε)^(−1/2): dẑ = ρ·(dx − mean(dx)) + (x − μ)·dρ with
  dρ = −ρ³·mean((x − μ)·dx), so dy = w·ρ ⊙ (dx − mean(dx) − ẑ·mean(ẑ ⊙ dx)), with ẑ and
  w·ρ computed once per node;
* attention (S = c·QKᵀ + mask, P = softmax(S), Y = PV, as ``attention_parts_exact``
  writes it out): dS = c·(dQ·Kᵀ + Q·dKᵀ) (0 where masked), dP = P ⊙ (dS − ⟨P, dS⟩_row),
  dY = dP·V + P·dV, with P computed once per node.

All are the derivative the generic path computes, evaluated in float64 with other
roundings (of order 1e-16 relative), which the callers' paddings cover.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lipcert.bounds.backward.dependency import MOVES, PRODUCTS, SUMS, is_pointwise, packet
from lipcert.bounds.backward.evaluation import SDPA, as_f64, attention_parts_exact, evaluable
from lipcert.bounds.rules.shape import of_arguments

aten = torch.ops.aten


def push(node: torch.fx.Node, vals: dict[str, Any], tans: dict[str, Any],
         coeffs: dict[Any, Any]) -> Any:
    """The tangents of ``node`` (a stack, a list of stacks for several outputs, or None
    where it carries none) from those of its arguments (``tans``) at the centre values
    ``vals`` (float64)."""
    if node.target is operator.getitem:
        parent = tans.get(node.args[0].name)
        return None if parent is None else parent[node.args[1]]
    flat_nodes, spec = tree_flatten((tuple(node.args), dict(node.kwargs)))
    live = [i for i, a in enumerate(flat_nodes)
            if isinstance(a, torch.fx.Node) and tans.get(a.name) is not None]
    out = vals.get(node.name)
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
    if not live or not leaves or not all(t.is_floating_point() for t in leaves):
        return None
    flat_vals = [as_f64(vals[a.name]) if isinstance(a, torch.fx.Node) else a
                 for a in flat_nodes]
    tangents = [tans[flat_nodes[i].name] for i in live]
    fast = _shortcut(node, flat_vals, spec, live, tangents, out, coeffs)
    if fast is not None:
        return fast
    return _jvp(node, flat_vals, spec, live, tangents)


def _call(node: torch.fx.Node, flat_vals: list[Any], spec: Any, live: list[int]) -> Any:
    """The op as a function of its tangent-carrying arguments (the others fixed)."""
    return of_arguments(evaluable(node.target), flat_vals, spec, live)


def _shortcut(node: torch.fx.Node, flat_vals: list[Any], spec: Any, live: list[int],
              tangents: list[Any], out: Any, coeffs: dict[Any, Any]) -> Tensor | None:
    op = packet(node.target)
    tensors = [i for i, v in enumerate(flat_vals) if isinstance(v, Tensor)]
    plain = not node.kwargs
    if len(live) == 1 and isinstance(tangents[0], Tensor):
        i, t = live[0], tangents[0]
        if op is aten.linear and i == 0 and plain and len(node.args) >= 2:
            return torch.matmul(t, flat_vals[1].transpose(-1, -2))
        if op in PRODUCTS and plain and len(node.args) == 2 and all(
                flat_vals[j].dim() >= 2 for j in (0, 1)):
            return torch.matmul(t, flat_vals[1]) if i == 0 else torch.matmul(flat_vals[0], t)
        if (op in MOVES or op in SUMS) and tensors == live:
            res = torch.vmap(_call(node, flat_vals, spec, live))(t)
            return list(res) if isinstance(res, tuple) else res
    if node.target is SDPA:
        return _attention(node, flat_vals, spec, live, tangents, coeffs)
    if op is aten.layer_norm and live == [0] and isinstance(tangents[0], Tensor):
        return _layer_norm(node, flat_vals, spec, tangents[0], coeffs)
    if isinstance(out, Tensor) and is_pointwise(node.target) and all(
            isinstance(t, Tensor) and flat_vals[i].dim() == out.dim()
            for i, t in zip(live, tangents, strict=True)):
        total = None
        for i, t in zip(live, tangents, strict=True):
            key = (node.name, i)
            if key not in coeffs:
                f = _call(node, flat_vals, spec, [i])
                x = flat_vals[i].contiguous()  # a dual tensor cannot be an expanded view
                d = torch.func.jvp(f, (x,), (torch.ones_like(x),))[1]
                coeffs[key] = None if d.shape == x.shape and bool((d == 1).all()) else d
            term = t if coeffs[key] is None else t * coeffs[key]
            total = term if total is None else total + term
        return total
    return None


def _layer_norm(node: torch.fx.Node, flat_vals: list[Any], spec: Any, t: Tensor,
                coeffs: dict[Any, Any]) -> Tensor | None:
    """dy of layer_norm over the last dimension (module docstring); None for other shapes."""
    args, kwargs = tree_unflatten(flat_vals, spec)
    x, shape = args[0], args[1]
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    if len(shape) != 1 or (weight is not None and weight.dim() != 1):
        return None
    key = (node.name, "layer_norm")
    if key not in coeffs:
        centred = x - x.mean(-1, keepdim=True)
        rho = torch.rsqrt(centred.square().mean(-1, keepdim=True) + eps)
        coeffs[key] = (centred * rho, rho if weight is None else weight * rho)
    z, scale = coeffs[key]
    along = (t * z).mean(-1, keepdim=True)
    out = t - t.mean(-1, keepdim=True)
    out.addcmul_(z, along, value=-1.0)
    return out.mul_(scale)


def _attention(node: torch.fx.Node, flat_vals: list[Any], spec: Any, live: list[int],
               tangents: list[Any], coeffs: dict[Any, Any]) -> list[Tensor] | None:
    """[dY, dS, dP] of scaled_dot_product_attention (module docstring); None for the cases
    left to the generic path (a tangent on the mask, dropout, grouped heads)."""
    args, kwargs = tree_unflatten(flat_vals, spec)
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    dropout = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
    causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
    if any(i > 2 for i in live) or dropout or kwargs.get("enable_gqa") or \
            not all(isinstance(t, Tensor) for t in tangents):
        return None
    key = (node.name, "attention")
    if key not in coeffs:
        coeffs[key] = attention_parts_exact(*args, **kwargs)[2]
    p = coeffs[key]
    dq, dk, dv = (tangents[live.index(i)] if i in live else None for i in range(3))
    scale = kwargs.get("scale")
    c = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    ds = None
    if dq is not None:
        ds = _stacked_left(dq, k.transpose(-1, -2) * c)
    if dk is not None:
        term = _stacked_right(q * c, dk.transpose(-1, -2))
        ds = term if ds is None else ds.add_(term)
    if ds is None:
        ds = torch.zeros((tangents[0].shape[0], *p.shape), dtype=p.dtype)
    keep = None
    if mask is not None and mask.dtype == torch.bool:
        keep = mask
    if causal:
        lower = torch.ones(p.shape[-2], p.shape[-1], dtype=torch.bool).tril()
        keep = lower if keep is None else keep & lower
    if keep is not None:
        ds = ds.masked_fill(~keep, 0.0)
    dp = p * ds
    dp.addcmul_(p, dp.sum(-1, keepdim=True), value=-1.0)
    dy = _stacked_left(dp, v)
    if dv is not None:
        dy.add_(_stacked_right(p, dv))
    return [dy, ds, dp]


def _stacked_left(t: Tensor, b: Tensor) -> Tensor:
    """t·B for a stack t (k, *batch, m, j) and B (*batch, j, p): the stack folded into the
    rows (one batched product, B not copied k times)."""
    if torch.broadcast_shapes(t.shape[1:-2], b.shape[:-2]) != t.shape[1:-2]:
        return torch.matmul(t, b)
    u = t.movedim(0, -3)
    shape = u.shape
    b = b.expand(*shape[:-3], *b.shape[-2:])
    out = torch.matmul(u.reshape(*shape[:-3], shape[-3] * shape[-2], shape[-1]), b)
    return out.reshape(*shape[:-1], b.shape[-1]).movedim(-3, 0)


def _stacked_right(a: Tensor, t: Tensor) -> Tensor:
    """A·t for A (*batch, m, j) and a stack t (k, *batch, j, p), the stack folded into the
    columns."""
    if torch.broadcast_shapes(t.shape[1:-2], a.shape[:-2]) != t.shape[1:-2]:
        return torch.matmul(a, t)
    u = t.movedim(0, -2)
    shape = u.shape
    a = a.expand(*shape[:-3], *a.shape[-2:])
    out = torch.matmul(a, u.reshape(*shape[:-2], shape[-2] * shape[-1]))
    return out.reshape(*out.shape[:-1], shape[-2], shape[-1]).movedim(-2, 0)


def _jvp(node: torch.fx.Node, flat_vals: list[Any], spec: Any, live: list[int],
         tangents: list[Any]) -> Any:
    f = _call(node, flat_vals, spec, live)
    primals = tuple(flat_vals[i].contiguous() for i in live)
    _, tan = torch.vmap(lambda *ts: torch.func.jvp(f, primals, ts), out_dims=(None, 0))(
        *tangents)
    return list(tan) if isinstance(tan, tuple) else tan
