"""Order statistics: max / min over dimensions (``max.dim``, ``amax``, ...), elementwise
max / min of two tensors, ``sort`` and ``topk`` (values), and the recognition of the
GroupSort2 (MaxMin) pattern as deel-torchlip exports it.

The facts used throughout, for vectors u, v of one group (a fibre of the reduced or sorted
dimensions):

* max and min are increasing in every argument and 1-Lipschitz in the ∞-norm:
  |max u − max v| ≤ max_i |u_i − v_i| = ‖u − v‖_∞ ≤ ‖u − v‖₂, and |max u| ≤ ‖u‖_∞. The same
  holds for every order statistic u₍ᵢ₎ (the i-th smallest), since
  u₍ᵢ₎ = max over i-element subsets S of min_{j∈S} u_j.
* Sorting is non-expansive in L2: ‖sort(u) − sort(v)‖₂ ≤ ‖u − v‖₂. (Rearrangement
  inequality: sort(u)·sort(v) ≥ u·v, and sorting keeps ‖u‖ and ‖v‖.) Any sub-vector of the
  sorted values (topk) is then non-expansive too.

Groups are disjoint, so summing the squares over groups, every rule here has lip ≤ lip_x and
norm ≤ norm_x. For the max-token norm, an output row (vector along the last dimension) of m
elements draws each element from one group; if those groups lie in t input rows, then
‖Δy_row‖² ≤ Σ_e max_{i∈G_e} Δx_i² is at most t·lip_tok_x² (each input row's squares are
counted at most once) and at most m·lip_tok_x² (each term is one input element, at most its
row's norm): lip_tok ≤ √min(t, m)·lip_tok_x, and the same factor for tok_norm.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds.errors import UnsupportedOpError
from lipcert.bounds.registry import graph_rewrite, rule
from lipcert.bounds.rules.shape import broadcast
from lipcert.bounds.state import Bound, Ctx, Opaque, reduce_sid, unify_sid

aten = torch.ops.aten


def _rows(shape: torch.Size | tuple[int, ...]) -> int:
    """Number of rows (vectors along the last dimension) of a tensor of this shape."""
    return math.prod(shape[:-1]) if len(shape) else 1


def row_factor(in_shape: torch.Size, out_shape: torch.Size) -> float:
    """√min(t, m) of the module docstring: every output row is built from t = (input rows) /
    (output rows) input rows (the groups partition the input, and an input row belongs to
    one output row's groups) and has m elements."""
    out_rows = _rows(out_shape)
    if out_rows == 0 or _rows(in_shape) == 0:
        return 1.0
    t = max(1, _rows(in_shape) // out_rows)
    m = out_shape[-1] if len(out_shape) else 1
    return math.sqrt(min(t, max(m, 1)))


def _dims(x: Bound, dim: Any) -> tuple[int, ...]:
    """Reduced dimensions, normalised; ``None`` or ``[]`` means all (as ``amax`` reads it)."""
    rank = max(x.dim(), 1)
    if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
        return tuple(range(x.dim()))
    if isinstance(dim, int):
        dim = [dim]
    return tuple(sorted({d % rank for d in dim}))


def _group_sid(x: Bound, dims: tuple[int, ...], keepdim: bool, what: str) -> Tensor | None:
    sid = reduce_sid(x.sid, dims, what)
    if keepdim and sid is not None and x.dim():
        sid = sid.reshape([1 if d in dims else s for d, s in enumerate(x.shape)])
    return sid


def reduce_order(ctx: Ctx, x: Bound, dims: tuple[int, ...], keepdim: bool, largest: bool,
                 what: str) -> Bound:
    """max (``largest``) or min over ``dims``: y_g = max_{i∈g} x_i per group g (module
    docstring). Increasing in every argument, so y_g ∈ [max lo_g, max hi_g] (min alike);
    1-Lipschitz per group in the ∞-norm, so lip ≤ lip_x, norm ≤ norm_x and
    lip_tok ≤ √min(t, m)·lip_tok_x (:func:`row_factor`)."""

    def red(t: Tensor) -> Tensor:
        if not dims:
            return t
        return t.amax(dims, keepdim=keepdim) if largest else t.amin(dims, keepdim=keepdim)

    lo, hi = red(x.lo), red(x.hi)
    f = row_factor(x.shape, lo.shape)
    return Bound(lo, hi, x.lip, f * x.lip_tok, x.norm, f * x.tok_norm,
                 sid=_group_sid(x, dims, keepdim, what))


@rule(aten.max.dim, aten.min.dim)
def max_dim(ctx: Ctx, x: Bound, dim: int, keepdim: bool = False) -> tuple[Any, ...]:
    """max / min over one dimension: :func:`reduce_order` for the values; the indices are
    integers, not a Lipschitz output (opaque)."""
    largest = ctx.node.target is aten.max.dim
    out = reduce_order(ctx, x, _dims(x, dim), bool(keepdim), largest, f"{ctx.node.target}")
    return (out, Opaque("the indices of max/min"))


@rule(aten.amax, aten.amin)
def amax(ctx: Ctx, x: Bound, dim: Any = (), keepdim: bool = False) -> Bound:
    """amax / amin over dimensions (all when none are given): :func:`reduce_order`."""
    largest = ctx.node.target.overloadpacket is aten.amax
    return reduce_order(ctx, x, _dims(x, dim), bool(keepdim), largest, f"{ctx.node.target}")


@rule(aten.max.default, aten.min.default)
def max_all(ctx: Ctx, x: Bound) -> Bound:
    """max / min of all elements (a 0-d output): :func:`reduce_order` over every dimension."""
    largest = ctx.node.target is aten.max.default
    return reduce_order(ctx, x, _dims(x, None), False, largest, f"{ctx.node.target}")


def extreme(ctx: Ctx, a: Any, b: Any, largest: bool) -> Bound:
    """Elementwise max(a, b) (``largest``) or min(a, b) of two operands (Bounds, constants or
    numbers), broadcast (copies counted by the broadcast rule).
    |Δmax(a_e, b_e)| ≤ max(|Δa_e|, |Δb_e|), so Δy_e² ≤ Δa_e² + Δb_e² and, summed over the
    tensor or over one row, lip ≤ √(lip_a² + lip_b²) and lip_tok ≤ √(lip_tok_a² + lip_tok_b²)
    (a constant operand has lip 0); likewise |y_e| ≤ max(|a_e|, |b_e|) for the norms.
    Increasing in both arguments: y ∈ [max(lo_a, lo_b), max(hi_a, hi_b)] (min alike)."""
    a, b = ctx.to_bound(a), ctx.to_bound(b)
    shape = torch.broadcast_shapes(a.shape, b.shape)
    a = broadcast(ctx, a, shape, "max_a")
    b = broadcast(ctx, b, shape, "max_b")
    pick = torch.maximum if largest else torch.minimum

    def root(u: Tensor, v: Tensor) -> Tensor:
        return (u.square() + v.square()).sqrt() * (1 + 4 * 2.0**-53)

    return Bound(
        pick(a.lo, b.lo),
        pick(a.hi, b.hi),
        root(a.lip, b.lip),
        root(a.lip_tok, b.lip_tok),
        root(a.norm, b.norm),
        root(a.tok_norm, b.tok_norm),
        sid=unify_sid(shape, a.sid, b.sid),
    )


@rule(aten.maximum, aten.minimum, aten.max.other, aten.min.other, aten.fmax, aten.fmin)
def maximum(ctx: Ctx, a: Any, b: Any) -> Bound:
    """Elementwise max / min of two tensors (``fmax``/``fmin`` agree on finite values):
    :func:`extreme`."""
    largest = ctx.node.target.overloadpacket in (aten.maximum, aten.max, aten.fmax)
    return extreme(ctx, a, b, largest)


def sort_values(ctx: Ctx, x: Bound, dim: int, descending: bool, k: int | None,
                what: str) -> Bound:
    """The sorted values along ``dim`` (the first ``k`` of them when given: topk).

    Per group (fibre along ``dim``) sorting is non-expansive in L2 and keeps norms, and a
    sub-vector of it is no larger (module docstring): lip ≤ lip_x, norm ≤ norm_x. Rows:
    along the last dimension a row is one group, so lip_tok ≤ lip_tok_x; along another
    dimension every element of an output row is an order statistic of its own group, and
    the groups of one row span the ``size`` input rows of that dimension:
    lip_tok ≤ √min(size, m)·lip_tok_x. The i-th order statistic is increasing in every
    argument, so y_i ∈ [sort(lo)_i, sort(hi)_i]. A sort moves values between the
    positions of one group, so every output element belongs to its group's sample."""
    d = dim % max(x.dim(), 1)
    if x.dim() == 0:
        return x
    size = x.shape[d]
    k = size if k is None else k

    def values(t: Tensor) -> Tensor:
        return torch.sort(t, dim=d, descending=descending).values.narrow(d, 0, k)

    lo, hi = values(x.lo), values(x.hi)
    last = d == x.dim() - 1
    m = lo.shape[-1]
    f = 1.0 if last else math.sqrt(max(1, min(size, m)))
    gsid = reduce_sid(x.sid, (d,), what)
    sid = None if gsid is None else gsid.unsqueeze(d).expand(lo.shape)
    return Bound(lo, hi, x.lip, f * x.lip_tok, x.norm, f * x.tok_norm, sid=sid)


@rule(aten.sort)
def sort(ctx: Ctx, x: Bound, dim: int = -1, descending: bool = False, *,
         stable: bool | None = None) -> tuple[Any, ...]:
    """sort along ``dim`` (``sort.default`` and ``sort.stable``): :func:`sort_values` for the
    values; the indices are integers (opaque)."""
    out = sort_values(ctx, x, int(dim), bool(descending), None, "sort")
    return (out, Opaque("the indices of sort"))


@rule(aten.topk)
def topk(ctx: Ctx, x: Bound, k: int, dim: int = -1, largest: bool = True,
         sorted: bool = True) -> tuple[Any, ...]:
    """The k largest (or smallest) values along ``dim`` in sorted order: the first k of a
    descending (ascending) sort, :func:`sort_values`. With ``sorted=False`` their order is
    unspecified and may jump when two values cross, so only k = 1 is accepted."""
    if not sorted and int(k) > 1:
        raise UnsupportedOpError(
            "topk with sorted=False and k > 1: the order of its values is unspecified, "
            "so the map is not continuous"
        )
    out = sort_values(ctx, x, int(dim), bool(largest), int(k), "topk")
    return (out, Opaque("the indices of topk"))


# --------------------------------------------------------------------------- GroupSort2


_PICKS = {aten.min.dim: False, aten.max.dim: True, aten.amin.default: False,
          aten.amax.default: True}


def _pick(node: Any) -> tuple[Any, int, bool, bool] | None:
    """(source node, dimension, keepdim, is max) if ``node`` is the values of a max or min
    over one dimension (``getitem(max.dim(v, d, k), 0)`` or ``amax(v, [d], k)``)."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target is operator.getitem:
        red, idx = node.args
        if idx != 0 or not isinstance(red, torch.fx.Node) or red.target not in (
                aten.min.dim, aten.max.dim):
            return None
        a = red.args
        keep = a[2] if len(a) > 2 else red.kwargs.get("keepdim", False)
        return a[0], int(a[1]), bool(keep), _PICKS[red.target]
    if node.target in (aten.amin.default, aten.amax.default):
        args = list(node.args)
        dims = args[1] if len(args) > 1 else node.kwargs.get("dim", [])
        keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        if isinstance(dims, int):
            dims = [dims]
        if len(dims) != 1:
            return None
        return args[0], int(dims[0]), bool(keep), _PICKS[node.target]
    return None


def pair_sort_source(node: Any) -> tuple[Any, int, bool] | None:
    """``(v, d, descending)`` if ``node`` computes the sort of v along a dimension d of size
    2, written as the min and the max of the pair put back side by side, else ``None``:

    * ``cat([min(v, d, keepdim=True), max(v, d, keepdim=True)], d)``, or
    * ``stack([min(v, d), max(v, d)], d)``,

    with min and max from ``min.dim``/``max.dim`` (values) or ``amin``/``amax`` over [d],
    of the SAME graph node v (max first: ``descending``). This is GroupSort2 (MaxMin) as
    deel-torchlip writes it (``view`` to pairs, then this, then ``view`` back). For a pair
    (a, b), (min(a, b), max(a, b)) is a permutation of (a, b), and sorting is non-expansive
    (module docstring), so the whole map is 1-Lipschitz (lip = lip_v), where bounding the
    min and the max separately would give √2·lip_v.
    """
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target in (aten.cat.default, aten.concat.default):
        keep = True
    elif node.target is aten.stack.default:
        keep = False
    else:
        return None
    parts = node.args[0]
    cat_dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, list | tuple) or len(parts) != 2 or not isinstance(cat_dim, int):
        return None
    picks = [_pick(p) for p in parts]
    if picks[0] is None or picks[1] is None:
        return None
    (v0, d0, k0, max0), (v1, d1, k1, max1) = picks
    val = v0.meta.get("val") if isinstance(v0, torch.fx.Node) else None
    if v0 is not v1 or not isinstance(val, Tensor) or val.dim() == 0:
        return None
    rank = val.dim()
    d = d0 % rank
    if d1 % rank != d or k0 != keep or k1 != keep or max0 == max1 or val.shape[d] != 2:
        return None
    if cat_dim % rank != d:  # stack: rank of its inputs + 1 = rank of v; cat: rank of v
        return None
    return v0, d, max0


@graph_rewrite
def fuse_pair_sorts(graph: torch.fx.Graph) -> int:
    """Rewrite every :func:`pair_sort_source` pattern as ``sort(v, d, descending)[0]``,
    the same function (for finite values), whose rule certifies lip = lip_v. Unused min /
    max nodes are removed. Returns the number of rewrites; the graph is linted."""
    count = 0
    for node in list(graph.nodes):
        found = pair_sort_source(node)
        if found is None:
            continue
        v, d, descending = found
        parts = list(node.args[0])
        with graph.inserting_before(node):
            srt = graph.call_function(aten.sort.default, (v, d, descending))
            vals = graph.call_function(operator.getitem, (srt, 0))
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in node.meta:
                srt.meta[key] = node.meta[key]
        vals.meta = dict(node.meta)
        fake = v.meta.get("val")
        mode = getattr(fake, "fake_mode", None)
        if mode is not None:
            with mode:
                srt.meta["val"] = aten.sort.default(fake, d, descending)
        node.replace_all_uses_with(vals)
        graph.erase_node(node)
        for p in parts:
            _erase_if_unused(graph, p)
        count += 1
    if count:
        graph.lint()
    return count


def _erase_if_unused(graph: torch.fx.Graph, node: Any) -> None:
    """Erase a min / max values node without users, and a ``max.dim`` / ``min.dim`` node
    whose outputs are all unused getitems."""
    if not isinstance(node, torch.fx.Node) or node.users:
        return
    red = node.args[0] if node.target is operator.getitem else None
    graph.erase_node(node)
    if isinstance(red, torch.fx.Node) and all(
            u.target is operator.getitem and not u.users for u in red.users):
        for u in list(red.users):
            graph.erase_node(u)
        graph.erase_node(red)
