"""Normalisations written out in elementary operators, recognised from the graph.

Models often spell RMSNorm and LayerNorm out instead of calling ``rms_norm`` /
``layer_norm``: a Llama RMSNorm exports to ``x * rsqrt(mean(x², -1, keepdim=True) + ε)``, a
ConvNeXt channels-first LayerNorm to ``u = x − mean(x, 1, keepdim=True)`` and
``u / sqrt(mean(u², 1, keepdim=True) + ε)``. Bounding those operator by operator multiplies
the slopes of x², rsqrt (½·ε^(−3/2) near 0) and a product: a bound of order 1/ε^(3/2)
instead of 1/√ε. The ``mul``, ``div`` and ``sub`` rules (``arithmetic.py``) ask the
recognisers here whether their graph node (``ctx.node``) is such a pattern, and if so use
the bounds of the whole normalisation, which the pattern computes exactly:

* :func:`rms_pattern`: y = x / √(mean_D(x²) + ε) over the dimensions D, bounded by the
  RMSNorm rule (``norm.normalize``): lip ≤ lip_x / √(ms_min + ε);
* :func:`centring_pattern`: y = x − mean_D(x), an orthogonal projection per group.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lipcert.bounds.rules.norm import normalize
from lipcert.bounds.rules.shape import gather_core
from lipcert.bounds.state import Bound, Ctx, gamma, reduce_sid

aten = torch.ops.aten
Node = torch.fx.Node


def _call(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def same_tensor(a: Any, b: Any, depth: int = 3) -> bool:
    """Whether graph nodes a and b compute the same tensor: the same node, or calls of the
    same operator on the same arguments (exported graphs repeat ``x − mean(x)`` rather than
    reuse it), compared to ``depth`` levels. Random operators never compute the same
    tensor twice."""
    if a is b:
        return True
    if depth == 0 or not (isinstance(a, Node) and isinstance(b, Node)):
        return False
    if a.op != "call_function" or b.op != "call_function" or a.target is not b.target:
        return False
    if torch.Tag.nondeterministic_seeded in getattr(a.target, "tags", ()):
        return False
    if a.kwargs != b.kwargs or len(a.args) != len(b.args):
        return False
    return all(same_tensor(x, y, depth - 1) if isinstance(x, Node) else x == y
               for x, y in zip(a.args, b.args, strict=True))


def _arg(node: Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _mean_keepdim(node: Any) -> tuple[Any, list[int]] | None:
    """(source, dims) of ``mean(source, dims, keepdim=True)``."""
    if not _call(node, aten.mean.dim) or not _arg(node, 2, "keepdim", False):
        return None
    dims = _arg(node, 1, "dim", None)
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, list | tuple) or not dims:
        return None
    return node.args[0], [int(d) for d in dims]


def _square_of(node: Any) -> Any:
    """x if ``node`` is x² (``pow(x, 2)`` or ``mul(x, x)``), else ``None``."""
    if _call(node, aten.pow.Tensor_Scalar) and node.args[1] in (2, 2.0):
        return node.args[0]
    if _call(node, aten.mul.Tensor) and same_tensor(node.args[0], node.args[1]):
        return node.args[0]
    return None


def _plus_number(node: Any) -> tuple[Any, float] | None:
    """(t, c) if ``node`` is t + c for a Python number c (``add.Tensor`` or ``add.Scalar``,
    either operand order, alpha 1)."""
    if not _call(node, aten.add.Tensor, aten.add.Scalar) or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[0], node.args[1]
    if isinstance(b, int | float) and not isinstance(b, bool):
        return a, float(b)
    if isinstance(a, int | float) and not isinstance(a, bool):
        return b, float(a)
    return None


def _rms_denominator(node: Any, root: Any) -> tuple[Any, list[int], float] | None:
    """(x, dims, ε) if ``node`` is root(mean(x², dims, keepdim=True) + ε), root = rsqrt or
    sqrt, with ε ≥ 0."""
    if not _call(node, root):
        return None
    shifted = _plus_number(node.args[0])
    if shifted is None or not shifted[1] >= 0:
        return None
    mean = _mean_keepdim(shifted[0])
    if mean is None:
        return None
    x = _square_of(mean[0])
    return None if x is None else (x, mean[1], shifted[1])


def rms_pattern(node: Any) -> tuple[int, list[int], float] | None:
    """(i, dims, ε) if ``node`` is x·rsqrt(mean(x², dims, keepdim=True) + ε) (``mul``, x its
    i-th operand) or x / sqrt(mean(x², dims, keepdim=True) + ε) (``div``, i = 0), with the
    same tensor x in both places (:func:`same_tensor`); else ``None``."""
    if _call(node, aten.mul.Tensor) and len(node.args) == 2:
        for i in (0, 1):
            found = _rms_denominator(node.args[1 - i], aten.rsqrt.default)
            if found is not None and same_tensor(found[0], node.args[i]):
                return i, found[1], found[2]
        return None
    if _call(node, aten.div.Tensor) and len(node.args) == 2 and "rounding_mode" not in node.kwargs:
        found = _rms_denominator(node.args[1], aten.sqrt.default)
        if found is not None and same_tensor(found[0], node.args[0]):
            return 0, found[1], found[2]
    return None


def _norm_dims(dims: list[int], rank: int) -> tuple[int, ...]:
    return tuple(sorted({d % rank for d in dims}))


def rms_over(ctx: Ctx, x: Bound, dims: list[int], eps: float) -> Bound:
    """y = x / √(mean_D(x²) + ε) over the dimensions D: the RMSNorm rule
    (``norm.normalize``, no weight) on the groups along D. For D the trailing dimensions it
    applies directly; otherwise D is first moved to the end and back by permutations, which
    the shape rule bounds exactly (lip unchanged)."""
    rank = x.dim()
    d = _norm_dims(dims, rank)
    k = len(d)
    if d == tuple(range(rank - k, rank)):
        return normalize(ctx, x, k, None, None, eps, centred=False)
    perm = [i for i in range(rank) if i not in d] + list(d)
    inv = [perm.index(i) for i in range(rank)]
    xp = gather_core(ctx, lambda ts: ts[0].permute(perm), [x], ctx.key("rms_perm"))
    y = normalize(ctx, xp, k, None, None, eps, centred=False)
    return gather_core(ctx, lambda ts: ts[0].permute(inv), [y], ctx.key("rms_unperm"))


def centring_pattern(node: Any) -> list[int] | None:
    """dims if ``node`` is x − mean(x, dims, keepdim=True) (``sub.Tensor``, alpha 1) for one
    tensor x (:func:`same_tensor`), else ``None``."""
    if not _call(node, aten.sub.Tensor) or node.kwargs.get("alpha", 1) != 1:
        return None
    mean = _mean_keepdim(node.args[1])
    if mean is None or not same_tensor(mean[0], node.args[0]):
        return None
    return mean[1]


def centre(ctx: Ctx, x: Bound, dims: list[int]) -> Bound:
    """y = x − mean_D(x): on each group (fibre along D) the orthogonal projection
    P = I − 11ᵀ/|G|, so ‖Δy‖ ≤ ‖Δx‖ group by group: lip ≤ lip_x and norm ≤ norm_x. Rows:
    for D = {last dimension} a row is a group (lip_tok ≤ lip_tok_x); otherwise
    Δy_row = Δx_row − (the group means on the row), and the means on one row have norm at
    most √(t/|G|)·lip_tok_x ≤ lip_tok_x, with t ≤ |G| the input rows a group spans
    (Cauchy–Schwarz: mean_G(Δx)² ≤ ‖Δx_G‖²/|G|), so lip_tok ≤ 2·lip_tok_x. Intervals: each
    centred element lies in [lo − mean_G(hi), hi − mean_G(lo)], widened by γ_|G| for the
    rounding of the means."""
    rank = x.dim()
    d = _norm_dims(dims, rank)
    reduce_sid(x.sid, d, "a mean over the batch")
    size = math.prod(x.shape[i] for i in d)
    slack = gamma(size) * torch.maximum(x.lo.abs(), x.hi.abs()).mean(d, keepdim=True)
    lo = x.lo - x.hi.mean(d, keepdim=True) - slack
    hi = x.hi - x.lo.mean(d, keepdim=True) + slack
    f = 1.0 if d == (rank - 1,) else 2.0
    return Bound(lo, hi, x.lip, f * x.lip_tok, x.norm, f * x.tok_norm, sid=x.sid)
