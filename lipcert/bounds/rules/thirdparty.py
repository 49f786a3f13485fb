"""Layers of third-party Lipschitz libraries, as their exported graphs spell them.

**L2-norm pooling** (deel-torchlip's ``ScaledL2NormPool2d``, which ``vanilla_export()``
turns into ``torch.nn.LPPool2d(2, k)``; ``LPPool1d`` alike). torch computes it as

    a = avg_pool(x², k, s);  y = (c · sign(a) · relu(|a|)) ** 0.5        (c = |window|)

so the export holds ``pow``, ``avg_pool``, ``sign``, ``abs``, ``relu``, two ``mul`` and a
``pow(·, 0.5)``. Bounded operator by operator, ``sign`` is discontinuous and √· has an
unbounded slope at 0: no finite bound. The whole map is, per window w,

    y_w = √(c · mean_w(x²)) = s · ‖x_w‖₂,   s = √(c / |w|)

(sign(a)·relu(|a|) = a for every a, and a ≥ 0 here), and that has a short proof:

* **Lipschitz.** |‖u‖ − ‖v‖| ≤ ‖u − v‖ (reverse triangle inequality), so
  ‖y(x) − y(x')‖² = s² Σ_w (‖x_w‖ − ‖x'_w‖)² ≤ s² Σ_w ‖x_w − x'_w‖² ≤ s² m ‖x − x'‖², where
  m is the largest number of windows that hold one input position (1 when the stride is the
  window, as deel requires; computed exactly otherwise). So lip ≤ s·√m·lip_x. The same sum
  with x' = 0 gives ‖y‖ ≤ s·√m·‖x‖.
* **Intervals.** With |x_e| ∈ [a_e, b_e] (b_e = max(|lo_e|, |hi_e|); a_e = 0 when
  lo_e ≤ 0 ≤ hi_e, else min(|lo_e|, |hi_e|)), y_w ∈ [s·√(Σ_w a_e²), s·√(Σ_w b_e²)], widened
  for the float64 rounding of the sums and roots.

:func:`fuse_l2_norm_pools` recognises the pattern (:func:`l2_pool_source`) and rewrites it as
one ``lipcert_thirdparty::l2_norm_pool`` node, the same function, whose rule is
:func:`l2_norm_pool`; it is registered with ``@graph_rewrite``, so the engine runs it on
every graph it walks, before propagation (deel's ``GroupSort2`` is fused by ``order.py``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lipcert.bounds.registry import graph_rewrite, rule
from lipcert.bounds.rules.pool import window_multiplicity
from lipcert.bounds.state import Bound, Ctx, U, gamma, reduce_sid

__all__ = ["fuse_l2_norm_pools", "l2_norm_pool", "l2_norm_pool_op", "l2_pool_source"]

aten = torch.ops.aten
Node = torch.fx.Node
_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_AVG = {aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}

_LIBRARY = torch.library.Library("lipcert_thirdparty", "DEF")
_LIBRARY.define("l2_norm_pool(Tensor x, int[] kernel_size, int[] stride, float scale) -> Tensor")


def _l2_norm_pool(x: Tensor, kernel_size: list[int], stride: list[int], scale: float) -> Tensor:
    """y_w = scale·‖x_w‖₂ over the windows of ``kernel_size`` at ``stride`` (no padding,
    floor mode) of the last ``len(kernel_size)`` dimensions."""
    pool = _POOLS[len(kernel_size)]
    summed = pool(x * x, list(kernel_size), list(stride)) * math.prod(kernel_size)
    return scale * summed.sqrt()


_LIBRARY.impl("l2_norm_pool", _l2_norm_pool, "CompositeImplicitAutograd")
l2_norm_pool_op = torch.ops.lipcert_thirdparty.l2_norm_pool.default


# --------------------------------------------------------------------------- the rule


def _plane_sid(x: Bound, out_shape: torch.Size, nd: int) -> Tensor | None:
    """Every pooled plane (the last ``nd`` dimensions) belongs to one sample."""
    if x.sid is None:
        return None
    ps = reduce_sid(x.sid, tuple(range(x.dim() - nd, x.dim())), "L2-norm pooling")
    return ps.reshape(*ps.shape, *([1] * nd)).expand(out_shape)


@rule(l2_norm_pool_op)
def l2_norm_pool(ctx: Ctx, x: Bound, kernel_size: list[int], stride: list[int],
                 scale: float) -> Bound:
    """y_w = s·‖x_w‖₂ (module docstring): lip ≤ s·√m·lip_x and ‖y‖ ≤ s·√m·‖x‖ with m the
    largest window count of an input position; lip_tok by the whole-tensor bound (windows
    mix rows); y_w ∈ [s·√Σ a², s·√Σ b²] with a, b the bounds of |x_e|."""
    nd = len(kernel_size)
    k, st = list(kernel_size), list(stride) or list(kernel_size)
    pool = _POOLS[nd]
    size = math.prod(k)
    b = torch.maximum(x.lo.abs(), x.hi.abs())
    a = torch.where((x.lo <= 0) & (x.hi >= 0), torch.zeros_like(b),
                    torch.minimum(x.lo.abs(), x.hi.abs()))
    slack = gamma(size) + 4 * U  # the sum of |w| squares, the product and the root
    lo = float(scale) * (pool(a * a, k, st) * size).sqrt() * (1 - slack)
    hi = float(scale) * (pool(b * b, k, st) * size).sqrt() * (1 + slack)
    m = 1
    for i in range(nd):
        m *= window_multiplicity(x.shape[-nd + i], k[i], st[i], 0, 1, lo.shape[-nd + i])
    f = abs(float(scale)) * math.sqrt(m) * (1 + 4 * U)
    return Bound(lo, hi, f * x.lip, f * x.lip, f * x.norm, ctx.full(math.inf),
                 sid=_plane_sid(x, lo.shape, nd))


# --------------------------------------------------------------------------- the pattern


def _call(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _times_number(node: Any) -> tuple[Any, float] | None:
    """(t, c) if ``node`` is t·c for a Python number c (either operand order)."""
    if not _call(node, aten.mul.Tensor, aten.mul.Scalar) or len(node.args) != 2:
        return None
    a, b = node.args
    if _number(b) is not None:
        return a, float(b)
    if _number(a) is not None:
        return b, float(a)
    return None


def _unsigned(node: Any) -> Any:
    """a if ``node`` is sign(a)·relu(|a|) (either order), which equals a; else ``node``."""
    if not _call(node, aten.mul.Tensor) or len(node.args) != 2:
        return node
    for s, r in (node.args, node.args[::-1]):
        if (_call(s, aten.sign.default) and _call(r, aten.relu.default)
                and _call(r.args[0], aten.abs.default)
                and s.args[0] is r.args[0].args[0]):
            return s.args[0]
    return node


def _square_source(node: Any) -> Any:
    """x if ``node`` is x² (``pow(x, 2)`` or ``mul(x, x)``)."""
    if _call(node, aten.pow.Tensor_Scalar) and _number(node.args[1]) == 2.0:
        return node.args[0]
    if _call(node, aten.mul.Tensor) and len(node.args) == 2 and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _avg_args(node: Node) -> tuple[list[int], list[int]] | None:
    """(kernel, stride) of ``avg_pool{1,2,3}d(p, kernel, stride, padding=0,
    ceil_mode=False, count_include_pad, divisor_override=None)``: windows fully inside, each
    divided by its size."""
    nd = _AVG[node.target]
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
             "divisor_override")
    defaults = (None, [], 0, False, True, None)
    vals = [node.args[i + 1] if len(node.args) > i + 1 else node.kwargs.get(n, d)
            for i, (n, d) in enumerate(zip(names, defaults, strict=True))]
    kernel, stride, padding, ceil_mode, _, divisor = vals

    def ints(v: Any) -> list[int] | None:
        if isinstance(v, int):
            return [v] * nd
        if isinstance(v, list | tuple) and all(isinstance(i, int) for i in v):
            return list(v) * nd if len(v) == 1 else list(v)
        return None

    k = ints(kernel)
    s = ints(stride) if stride not in ([], (), None) else k
    p = ints(padding)
    if k is None or s is None or p is None or len(k) != nd or len(s) != nd:
        return None
    if any(p) or ceil_mode or divisor is not None:
        return None
    return k, s


def l2_pool_source(node: Any) -> tuple[Any, list[int], list[int], float] | None:
    """(x, kernel, stride, scale) if ``node`` computes y_w = scale·‖x_w‖₂ as torch writes
    ``LPPool{1,2,3}d(2, …)``: ``pow(c·sign(a)·relu(|a|), 0.5)`` or ``sqrt(c·a)`` with
    a = ``avg_pool(x², kernel, stride)`` (no padding, floor mode) and a number c > 0, so
    scale = √(c / |window|); else ``None``."""
    root = (_call(node, aten.pow.Tensor_Scalar) and _number(node.args[1]) == 0.5) or _call(
        node, aten.sqrt.default)
    times = _times_number(node.args[0]) if root else None
    if times is None or not times[1] > 0:
        return None
    avg = _unsigned(times[0])
    if not _call(avg, *_AVG):
        return None
    x = _square_source(avg.args[0])
    found = _avg_args(avg)
    if x is None or found is None:
        return None
    kernel, stride = found
    return x, kernel, stride, math.sqrt(times[1] / math.prod(kernel))


@graph_rewrite
def fuse_l2_norm_pools(graph: torch.fx.Graph) -> int:
    """Rewrite every :func:`l2_pool_source` pattern as one ``l2_norm_pool`` node (the same
    function) and remove the pattern's nodes that are left without users. Returns the
    number of rewrites; the graph is linted."""
    count = 0
    position = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        found = l2_pool_source(node)
        if found is None:
            continue
        x, kernel, stride, scale = found
        chain = _chain(node)
        with graph.inserting_before(node):
            fused = graph.call_function(l2_norm_pool_op, (x, kernel, stride, scale))
        fused.meta = dict(node.meta)
        fake = x.meta.get("val") if isinstance(x, Node) else None
        mode = getattr(fake, "fake_mode", None)
        if mode is not None:
            with mode:
                fused.meta["val"] = l2_norm_pool_op(fake, kernel, stride, scale)
        node.replace_all_uses_with(fused)
        for dead in sorted(chain, key=position.__getitem__, reverse=True):  # users first
            if not dead.users:
                graph.erase_node(dead)
        count += 1
    if count:
        graph.lint()
    return count


def _chain(node: Node) -> list[Node]:
    """The pattern's nodes, from the output back to x² (not x itself)."""
    out, seen = [], set()
    stack = [node]
    while stack:
        n = stack.pop(0)
        if not isinstance(n, Node) or n in seen or n.op != "call_function":
            continue
        seen.add(n)
        out.append(n)
        if n.target in _AVG:
            out.append(n.args[0])  # x², and no further: x itself stays
            continue
        stack.extend(a for a in n.args if isinstance(a, Node))
    return out
