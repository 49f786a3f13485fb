"""Shape operations: reshapes, permutes, slicing, concatenation, broadcasting, gathers.

All of them rearrange, drop or duplicate elements, so one generic rule covers them
(:func:`gather_core`). It applies the operation to the elementwise bounds (exact), to the
sample ids, and to a tensor of element ids, from which it reads off, for every input i:

* c_i: how often one element of input i appears in the output (expand, repeat, overlapping
  unfold); then ‖ΔY‖² = Σ_e c_e Δx_e² ≤ Σ_i c_i ‖ΔX_i‖², so lip² ≤ Σ_i c_i lip_i²
  (a reshape or permute keeps ``lip`` exactly: c = 1);
* per output row (vector along the last dimension), the number m_i of distinct rows of
  input i it draws from, and the largest multiplicity k of one element within a row; then
  ‖ΔY_row‖² ≤ k·Σ_i m_i·max‖ΔX_i,row‖², so lip_tok² ≤ k·max_rows Σ_i m_i·lip_tok_i².
  Splitting the last dimension keeps lip_tok (m = 1), merging h rows multiplies it by √h,
  and a permute that moves the last dimension merges whole rows (falls back towards
  ``lip``, since finalisation caps lip_tok ≤ lip).

The same counts bound the norms (norm² ≤ Σ c_i norm_i², tok_norm² ≤ k·max Σ m_i tok_norm_i²).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from lipcert.bounds.errors import UnsupportedOpError
from lipcert.bounds.registry import Exact, rule
from lipcert.bounds.state import F64, Bound, Const, Ctx, sid_or_wild

aten = torch.ops.aten

# --------------------------------------------------------------------------- generic core


def _stats(out_ids: Tensor, inputs: list[Bound]) -> tuple[list[int], int, Tensor, bool]:
    """(c_i per input, k = max multiplicity within a row, unique rows of the m_i counts,
    whether the output holds padding elements) for one output of a gather."""
    numels = [b.lo.numel() for b in inputs]
    lasts = [(b.shape[-1] if b.dim() else 1) or 1 for b in inputs]
    offsets = [0]
    row_offsets = [0]
    for ne, la in zip(numels, lasts, strict=True):
        offsets.append(offsets[-1] + ne)
        row_offsets.append(row_offsets[-1] + math.ceil(ne / la))
    total = offsets[-1]
    flat = out_ids.reshape(-1).long()
    valid = flat >= 0
    has_pad = not bool(valid.all())
    counts = torch.bincount(flat[valid], minlength=total)
    c = [
        int(counts[offsets[i] : offsets[i + 1]].max()) if numels[i] else 0
        for i in range(len(inputs))
    ]
    if out_ids.numel() == 0:
        return c, 1, torch.zeros(1, len(inputs), dtype=F64), has_pad
    triples = zip(numels, lasts, row_offsets, strict=False)
    row_of = torch.cat([torch.arange(ne) // la + ro for ne, la, ro in triples])
    inp_of_row = torch.cat(
        [torch.full((row_offsets[i + 1] - row_offsets[i],), i) for i in range(len(inputs))]
    )
    last_out = out_ids.shape[-1] if out_ids.dim() else 1
    rows = out_ids.reshape(-1, last_out)
    srt = rows.sort(dim=-1).values.long()
    ok = srt >= 0
    orow = torch.where(ok, row_of[srt.clamp(min=0)], -1)
    first = torch.ones_like(ok)
    first[:, 1:] = orow[:, 1:] != orow[:, :-1]
    first &= ok
    eq = (srt[:, 1:] == srt[:, :-1]) & ok[:, 1:]
    if eq.numel():
        run = eq.long().cumsum(-1)
        reset = torch.where(~eq, run, 0).cummax(-1).values
        k = int((run - reset).max()) + 1
    else:
        k = 1
    if len(inputs) == 1:
        m = first.sum(-1).max().reshape(1, 1).to(F64)
    else:
        inp = inp_of_row[orow.clamp(min=0)]
        cnt = torch.stack([(first & (inp == i)).sum(-1) for i in range(len(inputs))], -1)
        m = torch.unique(cnt, dim=0).to(F64)
    return c, k, m, has_pad


def gather_core(
    ctx: Ctx,
    fn: Callable[[list[Tensor]], Any],
    inputs: list[Bound],
    key: tuple[Any, ...],
    *,
    ids_fn: Callable[[list[Tensor]], Any] | None = None,
    const_fill: bool = False,
) -> Any:
    """Bounds of ``fn(inputs)`` for an ``fn`` that only moves, drops or copies elements.

    ``fn`` takes a list of tensors shaped like the inputs and returns a tensor or a
    list/tuple of tensors. ``ids_fn`` (default ``fn``) is used on element ids and sample ids
    and must fill any new (padding) element with -1; ``const_fill`` says the real op fills
    them with a nonzero constant (then norms come from the intervals only).
    """
    ids_fn = ids_fn or fn
    lo_out = fn([b.lo for b in inputs])
    hi_out = fn([b.hi for b in inputs])
    lo_list, spec = tree_flatten(lo_out)
    hi_list, _ = tree_flatten(hi_out)
    if ctx.n > 1:
        sid_list = [
            s.long() for s in tree_flatten(ids_fn([sid_or_wild(b).to(F64) for b in inputs]))[0]
        ]
    else:
        sid_list = [None] * len(lo_list)

    def make() -> list[tuple[list[int], int, Tensor, bool]]:
        offs = [0]
        for b in inputs:
            offs.append(offs[-1] + b.lo.numel())
        ids = [
            torch.arange(b.lo.numel(), dtype=F64).add_(o).reshape(b.shape)
            for b, o in zip(inputs, offs, strict=False)
        ]
        return [_stats(t, inputs) for t in tree_flatten(ids_fn(ids))[0]]

    shapes = tuple(tuple(b.shape) for b in inputs)
    stats = ctx.cached(ctx.shape_cache, (*key, shapes), make)
    lip2 = torch.stack([b.lip.square() for b in inputs])  # (n_in, n)
    tok2 = torch.stack([b.lip_tok.square() for b in inputs])
    nrm2 = torch.stack([b.norm.square() for b in inputs])
    tn2 = torch.stack([b.tok_norm.square() for b in inputs])
    l1 = [b.tok_l1 for b in inputs]
    outs = []
    for lo, hi, sid, (c, k, m, has_pad) in zip(lo_list, hi_list, sid_list, stats, strict=True):
        cw = torch.tensor(c, dtype=F64)[:, None]
        lip = (cw * lip2).sum(0).sqrt()
        lip_tok = (k * (m @ tok2).amax(0)).sqrt()
        if has_pad and const_fill:
            norm = tok = torch.full_like(lip, math.inf)
        else:
            norm = (cw * nrm2).sum(0).sqrt()
            tok = (k * (m @ tn2).amax(0)).sqrt()
        tok_l1 = None
        if all(t is not None for t in l1) and not (has_pad and const_fill):
            tok_l1 = k * (m @ torch.stack(l1)).amax(0)  # type: ignore[arg-type]
        outs.append(Bound(lo, hi, lip, lip_tok, norm, tok, sid=sid, tok_l1=tok_l1))
    return tree_unflatten(outs, spec)


def _operands(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], Any, list[int]]:
    """Flattened arguments and the positions of the data operands: Bounds and floating
    constants (integer or boolean constants are indices and masks, passed through)."""
    flat, spec = tree_flatten((args, kwargs))
    for i, leaf in enumerate(flat):
        if isinstance(leaf, Const) and not leaf.t.is_floating_point():
            flat[i] = leaf.t
    idx = [i for i, leaf in enumerate(flat) if isinstance(leaf, Bound | Const)]
    return flat, spec, idx


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
          torch.memory_format)


def _stats_key(ctx: Ctx, op: Any, flat: list[Any], spec: Any, idx: list[int]) -> tuple[Any, ...]:
    """Cache key of a gather's element statistics. They depend only on the op, its
    non-tensor arguments and the input shapes (which :func:`gather_core` appends), so an ATen
    op whose other arguments are plain values is keyed by exactly those (the twelve blocks of
    a GPT-2 share one analysis); anything else (tensor indices, Python callables) by its
    graph node. Values are keyed with their type, so ``1``, ``1.0`` and ``True`` differ."""
    if not isinstance(op, torch._ops.OpOverload):
        return ctx.key("gather")
    operands = set(idx)
    leaves = []
    for i, leaf in enumerate(flat):
        if i in operands:
            leaves.append(None)
        elif type(leaf) in _PLAIN:
            leaves.append((type(leaf), leaf))
        else:
            return ctx.key("gather")
    return ("gather", op, spec, tuple(leaves))


def _mark_exact(inputs: list[Bound], out: Any) -> Any:
    """``Exact(out)`` when no element was dropped (intervals and norms moved exactly), so
    finalisation skips the interval work; else ``out``."""
    n_in = sum(b.lo.numel() for b in inputs)
    outs = [o for o in tree_flatten(out)[0] if isinstance(o, Bound)]
    return Exact(out) if len(outs) == 1 and outs[0].lo.numel() >= n_in else out


def as_bound(ctx: Ctx, x: Any) -> Bound:
    """``ctx.to_bound(x)``, and for a constant without elements (a GPT-2's empty KV cache,
    which ``cat`` skips) a Bound with zero norms: it contributes nothing."""
    if isinstance(x, Const) and x.t.numel() == 0:
        t = x.t.detach().to(F64)
        zero = ctx.full(0.0)
        return Bound(t, t, zero, zero.clone(), zero.clone(), zero.clone(),
                     value=t if ctx.local else None)
    return ctx.to_bound(x)


def of_arguments(target: Any, flat: list[Any], spec: Any, positions: list[int]
                 ) -> Callable[..., Any]:
    """``target`` as a function of the flattened arguments at ``positions``, the others
    fixed to ``flat``; ``spec`` unflattens them into (args, kwargs)."""

    def f(*ts: Tensor) -> Any:
        new = list(flat)
        for i, t in zip(positions, ts, strict=True):
            new[i] = t
        a, k = tree_unflatten(new, spec)
        return target(*a, **k)

    return f


def gather(
    ctx: Ctx,
    op: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None = None,
    *,
    ids_op: Any = None,
    const_fill: bool = False,
) -> Any:
    """Apply the generic rule to an ATen shape op called as ``op(*args, **kwargs)``; every
    ``Bound``/``Const`` among the (nested) arguments is an input."""
    kwargs = kwargs or {}
    flat, spec, idx = _operands(args, kwargs)
    inputs = [as_bound(ctx, flat[i]) for i in idx]

    def caller(target: Any) -> Callable[[list[Tensor]], Any]:
        f = of_arguments(target, flat, spec, idx)
        return lambda tensors: f(*tensors)

    out = gather_core(
        ctx,
        caller(op),
        inputs,
        ctx.key("gather") if ids_op is not None else _stats_key(ctx, op, flat, spec, idx),
        ids_fn=caller(ids_op) if ids_op is not None else None,
        const_fill=const_fill,
    )
    if not const_fill and all(isinstance(flat[i], Bound) for i in idx):
        return _mark_exact(inputs, out)
    return out


def broadcast(ctx: Ctx, b: Bound, shape: torch.Size, tag: str) -> Bound:
    """``b`` expanded to a broadcast ``shape`` (duplicated elements raise lip by √copies)."""
    if b.shape == shape:
        return b
    return gather_core(ctx, lambda ts: ts[0].expand(shape), [b], ctx.key("broadcast", tag))


def reshape(ctx: Ctx, b: Bound, shape: list[int], tag: str) -> Bound:
    return gather_core(ctx, lambda ts: ts[0].reshape(shape), [b], ctx.key("reshape", tag))


# --------------------------------------------------------------------------- registered rules


@rule(
    aten.reshape,
    aten.permute,
    aten.transpose,
    aten.t,
    aten.flatten,
    aten.unflatten,
    aten.unsqueeze,
    aten.squeeze,
    aten.expand,
    aten.select,
    aten.slice,
    aten.narrow,
    aten.cat,
    aten.concat,
    aten.stack,
    aten.split,
    aten.split_with_sizes,
    aten.chunk,
    aten.unbind,
    aten.movedim,
    aten.repeat,
    aten.flip,
    aten.roll,
    aten.index_select,
    aten.unfold,
    aten.repeat_interleave,
    aten.diagonal,
    aten.tensor_split,
    aten.hstack,
    aten.vstack,
)
def shape_op(ctx: Ctx, *args: Any, **kwargs: Any) -> Any:
    """Moves, drops or copies elements: the generic rule of the module docstring."""
    return gather(ctx, ctx.node.target, args, kwargs)


@rule(aten.view, aten._unsafe_view, aten.view_copy)
def view(ctx: Ctx, x: Bound, size: list[int]) -> Bound:
    """A view: same as ``reshape`` (which also accepts the non-contiguous bound tensors)."""
    return gather(ctx, aten.reshape.default, (x, size))


@rule(aten.expand_as)
def expand_as(ctx: Ctx, x: Bound, other: Any) -> Bound:
    """``x.expand(other.shape)`` (duplicates raise lip by √copies)."""
    return gather(ctx, aten.expand.default, (x, list(other.shape)))


@rule(aten.index)
def index(ctx: Ctx, x: Any, indices: list[Any]) -> Bound:
    """Advanced indexing with constant indices: a gather (repeated indices counted)."""
    if any(isinstance(i, Bound) for i in tree_flatten(indices)[0]):
        raise UnsupportedOpError(
            "aten.index with indices that depend on the model input is not Lipschitz"
        )
    return gather(ctx, aten.index.Tensor, (x, indices))


@rule(aten.embedding)
def embedding(ctx: Ctx, weight: Any, indices: Any, *rest: Any) -> Bound:
    """A table lookup with constant indices (rows gathered, repeats counted). Indices that
    depend on the input are integers, not a Lipschitz input: certify in embedding space."""
    if isinstance(indices, Bound):
        raise UnsupportedOpError(
            "aten.embedding: the token ids are the certified input, which is not a continuous "
            "input; certify the model in embedding space (lipcert.models.EmbeddingSpaceGPT)"
        )
    return gather(ctx, aten.embedding.default, (weight, indices))


@rule(aten.constant_pad_nd, aten.pad)
def pad(ctx: Ctx, x: Bound, pad: list[int], *rest: Any, **kwargs: Any) -> Bound:
    """Padding: copies (reflect / replicate / circular) or constants (constant mode)."""
    mode = kwargs.get("mode", rest[0] if rest and isinstance(rest[0], str) else "constant")
    target = ctx.node.target
    if mode != "constant":
        return gather(ctx, target, (x, pad, *rest), kwargs)
    value = kwargs.get("value")
    if value is None:
        value = next((r for r in rest if isinstance(r, int | float)), 0.0)
    fill = float(value or 0.0)

    def ids_op(t: Tensor, p: list[int], *_a: Any, **_k: Any) -> Tensor:
        return aten.constant_pad_nd.default(t, p, -1.0)

    def real(t: Tensor, p: list[int], *_a: Any, **_k: Any) -> Tensor:
        return aten.constant_pad_nd.default(t, p, fill)

    return gather(ctx, real, (x, pad), ids_op=ids_op, const_fill=fill != 0.0)


@rule(
    aten.clone,
    aten.contiguous,
    aten.alias,
    aten.detach,
    aten.lift_fresh_copy,
    aten.lift_fresh,
    aten._to_copy,
    aten.to,
    aten.type_as,
    aten.alias_copy,
    aten.detach_copy,
)
def identity(ctx: Ctx, x: Bound, *args: Any, **kwargs: Any) -> Bound:
    """The identity (copies, aliases and float dtype conversions: the certificate is for the
    exact-arithmetic function)."""
    dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
    if dtype is not None and not dtype.is_floating_point:
        raise UnsupportedOpError(f"conversion of an activation to {dtype} is not Lipschitz")
    return Exact(x)  # type: ignore[return-value]


@rule(aten.sym_size, aten.sym_numel, aten.size, aten.numel, aten.dim)
def sizes(ctx: Ctx, x: Bound, *args: Any) -> Any:
    """Shape queries are exact (bounds have the node's real shape)."""
    return ctx.node.target(x.lo, *args)


@rule(aten.sym_stride)
def stride(ctx: Ctx, x: Bound, dim: int) -> int:
    """A stride is the real tensor's, which the bound tensors (possibly expanded views) need
    not share: it is read from the graph node's recorded value, which must be a number."""
    val = ctx.node.meta.get("val")
    if not isinstance(val, int):
        raise UnsupportedOpError(
            "sym_stride of an activation whose stride is not a fixed number in the graph"
        )
    return val


@rule(
    aten._assert_tensor_metadata,
    aten._assert_scalar,
    aten.sym_constrain_range_for_size,
    aten._assert_async,
    aten.sym_constrain_range,
)
def noop(ctx: Ctx, *args: Any, **kwargs: Any) -> None:
    """Runtime checks of the exported program; nothing to bound."""
    return None


@rule(aten.zeros_like, aten.ones_like, aten.full_like, aten.empty_like, aten.new_zeros,
      aten.new_ones, aten.new_full, aten.new_empty, aten.scalar_tensor)
def shape_only(ctx: Ctx, x: Any, *args: Any, **kwargs: Any) -> Const:
    """Ops that use only the shape of an activation give constants."""
    val = ctx.node.meta.get("val")
    dtype = val.dtype if isinstance(val, Tensor) else torch.float32
    like = torch.empty(x.shape, dtype=dtype)
    return Const(ctx.node.target(like, *args, **kwargs), ctx.node.name)
