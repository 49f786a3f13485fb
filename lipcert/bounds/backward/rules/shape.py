"""Ops that move, copy, sum or average elements with non-negative constant coefficients.

Such an op is a linear map y = A x whose matrix A has entries ≥ 0 that do not depend on x
(a permutation, selection or duplication of elements, or a mean/sum). The gradient of the
margins with respect to x is Aᵀ·G_y exactly, and for an enclosure G_y ∈ c ± r,
Aᵀ G_y ∈ Aᵀc ± Aᵀr because |A| = A. Both parts are computed by the op's own vector–Jacobian
product (``torch.func.vjp``, batched over the margin axis with ``torch.vmap``), evaluated at
the centre value (any point gives the same A). Pure moves are exact; ops that add several
elements (expand, repeat, gathers with repeated indices, mean, sum) get the rounding slack
γ_K·(Aᵀ|c| + Aᵀr), K the number of output elements (at least the number of terms in any sum).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lipcert.bounds.backward.evaluation import evaluable
from lipcert.bounds.backward.interval import TINY, Box, Grad
from lipcert.bounds.backward.registry import BackCtx, FwdCtx, backward_rule, forward_rule
from lipcert.bounds.rules.shape import of_arguments
from lipcert.bounds.state import gamma
from lipcert.errors import LipcertError

aten = torch.ops.aten

_MOVES = (
    aten.reshape, aten.view, aten._unsafe_view, aten.view_copy, aten.permute, aten.transpose,
    aten.t, aten.flatten, aten.unflatten, aten.unsqueeze, aten.squeeze, aten.select,
    aten.slice, aten.narrow, aten.cat, aten.concat, aten.stack, aten.split,
    aten.split_with_sizes, aten.chunk, aten.unbind, aten.movedim, aten.flip, aten.roll,
    aten.tensor_split, aten.hstack, aten.vstack, aten.constant_pad_nd,
    aten.clone, aten.contiguous, aten.alias, aten.detach, aten._to_copy, aten.to,
    aten.type_as, aten.alias_copy, aten.detach_copy, aten.lift_fresh_copy, aten.lift_fresh,
)
_SUMS = (
    aten.expand, aten.expand_as, aten.repeat, aten.index_select, aten.index,
    aten.repeat_interleave, aten.unfold, aten.diagonal, aten.mean, aten.sum, aten.pad,
)


def vjp_nonneg(g: Any, args: tuple[Any, ...], kwargs: dict[str, Any], target: Any,
               sums: bool) -> tuple[Any, ...]:
    """Aᵀ·G for the op ``target(*args, **kwargs)``, linear in its Box arguments with
    non-negative coefficients (module docstring); returns one entry per positional argument
    (a list for a list argument)."""
    flat, spec = tree_flatten((args, kwargs))
    idx = [i for i, a in enumerate(flat) if isinstance(a, Box)]
    if not idx:
        return tuple(None for _ in args)

    primals = [flat[i].value for i in idx]
    out, vjp_fn = torch.func.vjp(of_arguments(target, flat, spec, idx), *primals)
    outs, out_spec = tree_flatten(out)
    gs = g if isinstance(g, list | tuple) else [g]
    if len(gs) != len(outs):
        raise RuntimeError(f"{target}: {len(gs)} gradients for {len(outs)} outputs")
    m = next(x.c.shape[0] for x in gs if x is not None)

    def cot(part: str) -> Any:
        parts = [torch.zeros((m, *o.shape), dtype=o.dtype) if x is None else getattr(x, part)
                 for x, o in zip(gs, outs, strict=True)]
        return tree_unflatten(parts, out_spec)

    batched = torch.vmap(vjp_fn)
    gc, gr = batched(cot("c")), batched(cot("r"))
    if sums:
        base = batched(tree_unflatten(
            [p.abs() for p in tree_flatten(cot("c"))[0]], out_spec))
        k = max((o.numel() for o in outs), default=1)
        gr = tuple(r + gamma(k + 2) * (b + r) + TINY for r, b in zip(gr, base, strict=True))
    grads: list[Any] = [None] * len(flat)
    for i, c, r in zip(idx, gc, gr, strict=True):
        grads[i] = Grad(c, r)
    pos, _ = tree_unflatten(grads, spec)
    return tuple(pos)


@backward_rule(*_MOVES)
def move(ctx: BackCtx, g: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """A permutation, selection or copy of elements (and padding with constants): the
    adjoint moves G back exactly (module docstring)."""
    dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
    if dtype is not None and not dtype.is_floating_point:
        raise LipcertError(f"{ctx.target}: a conversion to {dtype} has no gradient")
    return vjp_nonneg(g, args, kwargs, evaluable(ctx.target), sums=False)


@backward_rule(*_SUMS)
def sums(ctx: BackCtx, g: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """A duplication, gather, mean or sum: Aᵀ G with rounding slack (module docstring)."""
    return vjp_nonneg(g, args, kwargs, ctx.target, sums=True)


@backward_rule(aten.dropout, aten.feature_dropout, aten.alpha_dropout)
def dropout(ctx: BackCtx, g: Grad, x: Box, *args: Any) -> tuple[Any, ...]:
    """Dropout in eval mode is the identity (the forward pass refuses train mode)."""
    return (g,)


# --------------------------------------------------------------------------- forward


def _dim_is_batch(dim: Any, rank: int) -> bool:
    return isinstance(dim, int) and dim % max(rank, 1) == 0


def keeps_batch(target: Any, x: Box, out: Tensor, args: tuple[Any, ...]) -> bool:
    """Whether every dim-0 slice of the output holds elements of the same dim-0 slice of
    ``x`` only, each at most once (so a per-sample deviation bound carries over)."""
    packet = getattr(target, "overloadpacket", target)
    rank = x.dim()
    if packet in (aten.clone, aten.contiguous, aten.alias, aten.detach, aten._to_copy,
                  aten.to, aten.type_as, aten.alias_copy, aten.detach_copy):
        return True
    if not (out.dim() >= 1 and rank >= 1 and out.shape[0] == x.shape[0]):
        return False
    if packet in (aten.reshape, aten.view, aten._unsafe_view, aten.view_copy, aten.flatten,
                  aten.unflatten):
        return True
    if packet is aten.permute:
        return args[1][0] % rank == 0
    if packet is aten.transpose:
        return not (_dim_is_batch(args[1], rank) or _dim_is_batch(args[2], rank))
    if packet in (aten.select, aten.slice, aten.narrow, aten.squeeze):
        dim = args[1] if len(args) > 1 else 0
        return isinstance(dim, int) and not _dim_is_batch(dim, rank)
    if packet is aten.unsqueeze:
        return isinstance(args[1], int) and args[1] % (rank + 1) != 0
    return False


def _apply_parts(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], part: str
                 ) -> Any:
    """The op on one part of every Box argument; for the remainder parts ("e_lo", "e_hi")
    constant tensors count as 0 (they have no remainder)."""
    flat, spec = tree_flatten((args, kwargs))
    remainder = part.startswith("e_")
    flat = [getattr(a, part) if isinstance(a, Box) else
            torch.zeros_like(a) if remainder and isinstance(a, Tensor) and a.is_floating_point()
            else a for a in flat]
    a, k = tree_unflatten(flat, spec)
    return target(*a, **k)


def _zero_fill(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of a constant pad with the fill value set to 0 (a filled element is
    the same constant at every point, so its remainder is 0); other ops' as they are."""
    op = getattr(target, "overloadpacket", target)
    if op is aten.constant_pad_nd:
        return args[:2], {"value": 0.0}
    if op is aten.pad:
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        if mode == "constant":
            return args[:2], {"mode": "constant", "value": 0.0}
    return args, kwargs


def _ids_like(x: Any, offset: int) -> Any:
    if isinstance(x, Box):
        return torch.arange(offset, offset + x.value.numel()).reshape(x.shape)
    return x


def row_sources(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[Tensor, Tensor] | None:
    """For an op that moves elements of its Box arguments: per output row (last dimension),
    the distinct source rows it draws from (indices into the concatenated rows of all Box
    arguments, and a mask), found by running the op on element ids. None when an output
    row holds an element twice (the row's deviation could then exceed the sum)."""
    flat, spec = tree_flatten((args, kwargs))
    ids, row_of, off, rows_off = [], [], 0, 0
    for a in flat:
        if isinstance(a, Box):
            if a.dim() == 0:
                return None
            ids.append(_ids_like(a, off))
            k = a.shape[-1]
            row_of.append(torch.arange(a.value.numel()) // max(k, 1) + rows_off)
            off += a.value.numel()
            rows_off += a.value.numel() // max(k, 1)
        else:
            ids.append(a)
    a2, k2 = tree_unflatten(ids, spec)
    out = target(*a2, **k2)
    if not isinstance(out, Tensor) or out.dim() == 0 or out.dtype != torch.int64:
        return None
    flat_ids = out.reshape(-1, out.shape[-1]) if out.numel() else out.reshape(0, 1)
    srt = flat_ids.sort(-1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        return None
    rows = torch.cat(row_of)[srt].sort(-1).values
    first = torch.ones_like(rows, dtype=torch.bool)
    first[:, 1:] = rows[:, 1:] != rows[:, :-1]
    return rows.reshape(*out.shape), first.reshape(*out.shape)


def apply_to_box(ctx: FwdCtx, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The op applied to the centre values, to both interval ends and to both remainder ends:
    exact for an op that moves or copies elements or fills constants (a filled element's
    remainder is 0: :func:`_zero_fill`). A per-sample deviation carries over when
    :func:`keeps_batch` says so; a row's deviation is at most the ℓ2 sum of the deviations of
    the distinct rows it draws elements from (:func:`row_sources`, cached per node)."""
    target = evaluable(ctx.target)  # view as reshape: the parts' strides are our own
    value = _apply_parts(target, args, kwargs, "value")
    lo = _apply_parts(target, args, kwargs, "lo")
    hi = _apply_parts(target, args, kwargs, "hi")
    boxes = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Box)]
    single = len(boxes) == 1 and boxes[0].l2 is not None
    rdev = None
    if isinstance(value, Tensor) and value.dim() >= 1 and all(b.dim() >= 1 for b in boxes):
        key = ("rows", getattr(ctx.node, "name", None),
               tuple(tuple(b.shape) for b in boxes))
        src = ctx.cache.get(key) if key[1] is not None else None
        if src is None:
            src = row_sources(target, args, kwargs) or (None,)
            if key[1] is not None:
                ctx.cache[key] = src
        if src[0] is not None:
            idx, first = src
            dev_sq = torch.cat([b.row_dev().reshape(-1) for b in boxes]).square()
            rdev = (torch.where(first, dev_sq[idx], 0.0).sum(-1)
                    * (1 + gamma(value.shape[-1] + 2))).sqrt()

    e_lo = e_hi = None
    if all(b.has_e for b in boxes):
        e_args, e_kwargs = _zero_fill(target, args, kwargs)
        e_lo = _apply_parts(target, e_args, e_kwargs, "e_lo")
        e_hi = _apply_parts(target, e_args, e_kwargs, "e_hi")

    def make(v: Tensor, low: Tensor, high: Tensor, r: Tensor | None, el: Any, eh: Any) -> Box:
        keep = single and keeps_batch(target, boxes[0], v, args)
        return Box(v, low, high, boxes[0].l2 if keep else None, r, el, eh)

    if isinstance(value, list | tuple):
        n_out = len(value)
        els = [None] * n_out if e_lo is None else e_lo
        ehs = [None] * n_out if e_hi is None else e_hi
        return type(value)(make(v, a, b, None, el, eh)
                           for v, a, b, el, eh in zip(value, lo, hi, els, ehs, strict=True))
    return make(value, lo, hi, rdev, e_lo, e_hi)


@forward_rule(*_MOVES, aten.expand, aten.expand_as, aten.repeat, aten.index_select,
              aten.index, aten.repeat_interleave, aten.unfold, aten.diagonal, aten.pad)
def move_forward(ctx: FwdCtx, *args: Any, **kwargs: Any) -> Any:
    """Elements moved or copied: the op applied to value, lo and hi."""
    return apply_to_box(ctx, args, kwargs)


@forward_rule(aten.mean, aten.sum)
def reduce_forward(ctx: FwdCtx, x: Box, dim: Any = None, keepdim: bool = False,
                   **kwargs: Any) -> Box:
    """Mean or sum (non-negative weights): the op applied to lo and hi, widened by
    γ_{N+2}·op(|lo| + |hi|) for the float64 sums of N terms; per-sample deviation:
    |Δ mean| ≤ ‖Δ group‖/√N, so a reduction over non-batch dims scales it by 1/√N
    (a sum by √N); a reduction over dims other than the last averages (sums) rows, whose
    deviation is at most the mean (sum) of theirs."""
    if isinstance(dim, torch.dtype):
        dim = None
    target = ctx.target
    args = (x,) if dim is None else (x, dim, keepdim)
    value = _apply_parts(target, args, kwargs, "value")
    lo = _apply_parts(target, args, kwargs, "lo")
    hi = _apply_parts(target, args, kwargs, "hi")
    n_red = max(1, x.value.numel() // max(value.numel(), 1))
    mag = target(x.lo.abs() + x.hi.abs(), *args[1:], **kwargs)
    slack = gamma(n_red + 2) * mag + TINY
    l2 = None
    dims = [] if dim is None else [dim] if isinstance(dim, int) else list(dim)
    if x.l2 is not None and dims and not any(_dim_is_batch(d, x.dim()) for d in dims):
        is_mean = getattr(target, "overloadpacket", target) is aten.mean
        l2 = x.l2 * (n_red ** (-0.5 if is_mean else 0.5)) * (1 + gamma(4))
    rdev = None
    last = x.dim() - 1
    if dims and x.dim() >= 1 and last not in [d % x.dim() for d in dims]:
        red = [d % x.dim() for d in dims]
        r = x.row_dev()
        rdev = (r.mean(red, keepdim=keepdim) if getattr(target, "overloadpacket", target)
                is aten.mean else r.sum(red, keepdim=keepdim)) * (1 + gamma(n_red + 2))
    e_lo = e_hi = None
    if x.has_e:
        e_mag = target(x.e_lo.abs() + x.e_hi.abs(), *args[1:], **kwargs)
        e_slack = slack + gamma(n_red + 2) * e_mag
        e_lo = _apply_parts(target, args, kwargs, "e_lo") - e_slack
        e_hi = _apply_parts(target, args, kwargs, "e_hi") + e_slack
    return Box(value, lo - slack, hi + slack, l2, rdev, e_lo, e_hi)


@forward_rule(aten.dropout, aten.feature_dropout, aten.alpha_dropout)
def dropout_forward(ctx: FwdCtx, x: Box, p: float = 0.5, train: bool | None = False) -> Box:
    """Dropout in eval mode is the identity; in train mode it is random (refused)."""
    if train:
        raise LipcertError("dropout in training mode: put the model in eval mode first")
    return x


CONSTANT_OPS = (aten.zeros_like, aten.ones_like, aten.full_like, aten.new_zeros, aten.new_ones,
                aten.new_full)


@forward_rule(*CONSTANT_OPS)
def constant_like(ctx: FwdCtx, x: Box, *args: Any, **kwargs: Any) -> Tensor:
    """Ops that read only the shape of an activation give constants (float64)."""
    kwargs.pop("dtype", None)
    return ctx.target(x.value, *args, **kwargs)


@forward_rule(aten.sym_size, aten.sym_numel, aten.sym_stride, aten.size, aten.numel, aten.dim)
def shape_query(ctx: FwdCtx, x: Box, *args: Any) -> Any:
    """Shape queries read the centre value's shape."""
    return ctx.target(x.value, *args)
