"""Soundness of every bound rule: seeded random property tests plus gradient-ascent searches.

Each case is a tiny random program over a random input set (a box per sample, and in local
cases a ball around a centre inside it). The program runs twice: through the rules (bounds)
and on float64 tensors (truth) at many points of the set. Checked, with tolerances at the
level of float64 rounding only:

* every output lies in [lo, hi]; its norm and largest row norm are ≤ norm and tok_norm;
* ‖f(x) − f(y)‖/‖x − y‖ ≤ lip and max_row ‖Δrow‖/‖x − y‖ ≤ lip_tok for random pairs and for
  pairs found by gradient ascent on that ratio;
* the exact local Jacobian's spectral norm (and per-row block norms) ≤ lip (lip_tok);
* in local mode the propagated centre value equals the program's output at the centre.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from lipcert.bounds import (
    BatchMixingError,
    Bound,
    BoxDomain,
    Const,
    Ctx,
    EmbeddingDomain,
    UnsupportedOpError,
    apply_op,
    input_bound,
)
from lipcert.bounds.rules.activation import GELU_MAX_SLOPE

aten = torch.ops.aten
F64 = torch.float64
CASES = 200  # random cases per rule
SEARCHED = 8  # of which this many also get a gradient-ascent search and exact Jacobians
POINTS = 24  # random points per case and sample


class FakeNode:
    def __init__(self, name: str, target: Any) -> None:
        self.name, self.target, self.meta, self.users = name, target, {}, {}


class BoundCall:
    """Runs a program through the rules."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx, self.k = ctx, 0

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        self.k += 1
        k = self.k

        def wrap(a: Any) -> Any:
            return Const(a, f"c{k}_{id(a)}") if isinstance(a, Tensor) else a

        args, kwargs = tree_map(wrap, (args, kwargs))
        self.ctx.node = FakeNode(f"n{k}", target)
        return apply_op(self.ctx, target, args, kwargs)


def real_call(target: Any, *args: Any, **kwargs: Any) -> Any:
    return target(*args, **kwargs)


Program = Callable[[Callable[..., Any], Any], Any]


@dataclass
class Case:
    prog: Program
    shape: tuple[int, ...]  # per sample
    pos: bool = False  # inputs must be positive
    width: float = 1.0
    offset: float = 1.0


# --------------------------------------------------------------------------- the harness


def _rand_set(g: torch.Generator, case: Case, n: int, local: bool):
    shape = (n, *case.shape)
    mid = torch.randn(shape, generator=g, dtype=F64) * case.offset
    w = (torch.rand(shape, generator=g, dtype=F64) * 0.95 + 0.05) * case.width
    if torch.rand((), generator=g) < 0.2:  # some degenerate (thin) coordinates
        w = w * (torch.rand(shape, generator=g, dtype=F64) < 0.7)
    lo, hi = mid - w, mid + w
    if case.pos:
        lo, hi = lo.abs() + 0.2, hi.abs() + 0.2
        lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    if not local:
        return lo, hi, None, None
    t = torch.rand(shape, generator=g, dtype=F64)
    center = lo + t * (hi - lo)
    r = torch.rand(n, generator=g, dtype=F64) * float(w.mean()) * 2
    if torch.rand((), generator=g) < 0.15:
        r = r * 0
    return lo, hi, center, r


def _project(x: Tensor, lo: Tensor, hi: Tensor, c: Tensor | None, r: Tensor | None) -> Tensor:
    """Onto box ∩ ball (box, then towards the centre: stays in the box since c is in it)."""
    x = torch.maximum(torch.minimum(x, hi), lo)
    if c is None:
        return x
    d = x - c
    nrm = d.flatten(1).norm(dim=1).clamp_min(1e-300)
    f = torch.clamp(r / nrm, max=1.0).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.maximum(torch.minimum(c + d * f, hi), lo)


def _sample(g, lo, hi, c, r, k):
    """k points of the set of each sample, shape (k, n, ...)."""
    P = k
    n = lo.shape[0]
    u = torch.rand((P, *lo.shape), generator=g, dtype=F64)
    corner = torch.rand((P, 1, *([1] * (lo.dim() - 1))), generator=g) < 0.3
    u = torch.where(corner, (u > 0.5).to(F64), u)
    x = lo + u * (hi - lo)
    if c is None:
        return x
    d = torch.randn((P, *lo.shape), generator=g, dtype=F64)
    d = d / d.flatten(2).norm(dim=2).reshape(P, n, *([1] * (lo.dim() - 1))).clamp_min(1e-300)
    rho = r.reshape(1, n, *([1] * (lo.dim() - 1))) * torch.rand(
        (P, n, *([1] * (lo.dim() - 1))), generator=g, dtype=F64
    ) ** (1 / 3)
    pts = c + d * rho
    return torch.stack([_project(p, lo, hi, c, r) for p in pts])


def _run(prog: Program, x: Tensor) -> Tensor:
    """The program on points x (P, n, ...) → outputs (P, n, ...)."""
    P, n = x.shape[:2]
    y = prog(real_call, x.reshape(P * n, *x.shape[2:]))
    return y.reshape(P, n, *y.shape[1:])


def _row_norms(d: Tensor) -> Tensor:
    """Largest row (last dim) norm per (point, sample) of a (P, n, ...) tensor."""
    if d.dim() == 2:
        return d.abs()
    r = d.norm(dim=-1)
    return r.flatten(2).amax(-1) if r.dim() > 2 else r


def _check_points(out: Bound, xs: Tensor, ys: Tensor, what: str) -> None:
    tol_box = 1e-9 * (1 + torch.maximum(out.lo.abs(), out.hi.abs()))
    lo, hi = out.lo.unsqueeze(0), out.hi.unsqueeze(0)
    bad = (ys < lo - tol_box) | (ys > hi + tol_box)
    assert not bool(bad.any()), f"{what}: output outside [lo, hi]"
    norms = _flat(ys).norm(dim=2)
    assert bool((norms <= out.norm * (1 + 1e-9) + 1e-9).all()), f"{what}: norm bound"
    tok = _row_norms(ys)
    assert bool((tok <= out.tok_norm * (1 + 1e-9) + 1e-9).all()), f"{what}: tok_norm bound"


def _flat(y: Tensor) -> Tensor:
    return y.reshape(y.shape[0], y.shape[1], -1)


def _check_pairs(out: Bound, xa, xb, ya, yb, what: str) -> float:
    dx = _flat(xa - xb).norm(dim=2)
    dy = ya - yb
    keep = dx > 1e-7
    ratio = _flat(dy).norm(dim=2) / dx.clamp_min(1e-300)
    scale = 1 + _flat(ya).norm(dim=2) + _flat(yb).norm(dim=2)
    tol = 1e-9 * out.lip + 1e-11 * scale / dx.clamp_min(1e-300)
    assert bool(((ratio <= out.lip + tol) | ~keep).all()), (
        f"{what}: ratio {float(ratio[keep].max())} > lip {out.lip.tolist()}"
    )
    rt = _row_norms(dy) / dx.clamp_min(1e-300)
    tol_t = 1e-9 * out.lip_tok + 1e-11 * scale / dx.clamp_min(1e-300)
    assert bool(((rt <= out.lip_tok + tol_t) | ~keep).all()), (
        f"{what}: row ratio {float(rt[keep].max())} > lip_tok {out.lip_tok.tolist()}"
    )
    return float((ratio / out.lip.clamp_min(1e-300))[keep].max()) if bool(keep.any()) else 0.0


def _ascent(prog, out, lo, hi, c, r, x0, y0, steps=25):
    """Gradient ascent on ‖f(x) − f(y)‖/‖x − y‖ and on the max row version."""
    xa, xb = x0.clone(), y0.clone()
    for step in range(steps):
        xa.requires_grad_(True)
        xb.requires_grad_(True)
        ya, yb = _run(prog, xa), _run(prog, xb)
        dx = _flat(xa - xb).norm(dim=2).clamp_min(1e-9)
        obj = _flat(ya - yb).norm(dim=2) / dx + _row_norms(ya - yb) / dx
        ga, gb = torch.autograd.grad(obj.sum(), (xa, xb), allow_unused=True)
        size = 0.3 * (hi - lo).flatten(1).norm(dim=1).mean() * (0.85**step) + 1e-6
        with torch.no_grad():
            for x, gr in ((xa, ga), (xb, gb)):
                if gr is None:
                    continue
                gn = _flat(gr).norm(dim=2).clamp_min(1e-300)
                x += size * gr / gn.reshape(*gn.shape, *([1] * (x.dim() - 2)))
            xa = torch.stack([_project(p, lo, hi, c, r) for p in xa.detach()])
            xb = torch.stack([_project(p, lo, hi, c, r) for p in xb.detach()])
    return xa.detach(), xb.detach()


def _jacobian_check(prog, out: Bound, x: Tensor, what: str) -> None:
    """Exact Jacobians at points x (P, n, ...): spectral norm ≤ lip, row blocks ≤ lip_tok."""
    P, n = x.shape[:2]
    flat = x.reshape(P * n, *x.shape[2:]).clone().requires_grad_(True)
    y = prog(real_call, flat)
    ysum = y.sum(0).reshape(-1)
    rows = []
    for i in range(ysum.numel()):
        (gi,) = torch.autograd.grad(ysum[i], flat, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(flat) if gi is None else gi)
    J = torch.stack(rows, 1).reshape(P, n, ysum.numel(), -1)  # (P, n, out, in)
    sn = torch.linalg.matrix_norm(J, ord=2)
    assert bool((sn <= out.lip * (1 + 1e-9) + 1e-10).all()), (
        f"{what}: Jacobian norm {float(sn.max())} > lip {out.lip.tolist()}"
    )
    last = y.shape[-1] if y.dim() > 1 else 1
    Jr = J.reshape(P, n, -1, last, J.shape[-1])
    rn = torch.linalg.matrix_norm(Jr, ord=2).amax(-1)
    assert bool((rn <= out.lip_tok * (1 + 1e-9) + 1e-10).all()), (
        f"{what}: row Jacobian {float(rn.max())} > lip_tok {out.lip_tok.tolist()}"
    )


def check_rule(make: Callable[[torch.Generator], Case], seed: int, cases: int = CASES) -> None:
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for i in range(cases):
        case = make(g)
        n = 1 if torch.rand((), generator=g) < 0.6 else 2
        local = bool(torch.rand((), generator=g) < 0.5)
        lo, hi, c, r = _rand_set(g, case, n, local)
        ctx = Ctx(n, radius=r)
        zb = input_bound(ctx, BoxDomain(-math.inf, math.inf), lo.shape, c, box=(lo, hi))
        out = case.prog(BoundCall(ctx), zb)
        assert isinstance(out, Bound)
        what = f"seed {seed} case {i} ({'local' if local else 'global'}, n={n})"
        if local:
            yc = case.prog(real_call, c)
            assert torch.allclose(out.value, yc, rtol=1e-9, atol=1e-9), f"{what}: value"
        xs = _sample(g, lo, hi, c, r, POINTS)
        ys = _run(case.prog, xs)
        assert ys.shape[1:] == out.shape, f"{what}: shape {ys.shape} vs {out.shape}"
        _check_points(out, xs, ys, what)
        half = POINTS // 2
        worst = max(worst, _check_pairs(out, xs[:half], xs[half:], ys[:half], ys[half:], what))
        near = _project_all(xs[:half] + 1e-3 * torch.randn(xs[:half].shape, generator=g,
                                                           dtype=F64), lo, hi, c, r)
        worst = max(worst, _check_pairs(out, xs[:half], near, ys[:half],
                                        _run(case.prog, near), what))
        if i < SEARCHED:
            xa, xb = _ascent(case.prog, out, lo, hi, c, r, xs[:6], xs[6:12])
            ya, yb = _run(case.prog, xa), _run(case.prog, xb)
            _check_points(out, xa, ya, what + " ascent")
            worst = max(worst, _check_pairs(out, xa, xb, ya, yb, what + " ascent"))
            _jacobian_check(case.prog, out, torch.cat([xs[:4], xa[:2]]), what)
    assert worst <= 1 + 1e-6


def _project_all(x, lo, hi, c, r):
    return torch.stack([_project(p, lo, hi, c, r) for p in x])


# --------------------------------------------------------------------------- programs


def _ri(g, lo, hi):
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _w(g, o, i, scale=1.0):
    return torch.randn(o, i, generator=g, dtype=F64) * scale / math.sqrt(i)


def _maybe(g, p=0.5):
    return bool(torch.rand((), generator=g) < p)


def case_linear(g):
    t, i, o = _ri(g, 1, 3), _ri(g, 1, 5), _ri(g, 1, 5)
    W = _w(g, o, i, 2.0)
    b = torch.randn(o, generator=g, dtype=F64) if _maybe(g) else None
    return Case(lambda call, z: call(aten.linear.default, z, W, b), (t, i))


def case_matmul_const(g):
    k, m, t = _ri(g, 1, 4), _ri(g, 1, 4), _ri(g, 1, 3)
    kind = _ri(g, 0, 3)
    if kind == 0:  # x @ W
        W = _w(g, k, m, 2.0)
        return Case(lambda call, z: call(aten.matmul.default, z, W), (t, k))
    if kind == 1:  # A @ x (columns)
        A = _w(g, t + 1, t, 2.0)
        return Case(lambda call, z: call(aten.matmul.default, A, z), (t, k))
    if kind == 2:  # addmm on 2-D
        W, bias = _w(g, k, m), torch.randn(m, generator=g, dtype=F64)
        return Case(lambda call, z: call(aten.addmm.default, bias, z, W, beta=0.5, alpha=2.0),
                    (k,))
    W = _w(g, k, m)  # vector @ matrix on 2-D input via mm
    return Case(lambda call, z: call(aten.mm.default, z, W), (k,))


def case_matmul_two(g):
    t, d, k = _ri(g, 1, 3), _ri(g, 1, 4), _ri(g, 1, 3)
    W1, W2 = _w(g, k, d), _w(g, k, d)
    op = aten.bmm.default if _maybe(g) else aten.matmul.default
    add_bias = _maybe(g, 0.3)
    bias = torch.randn(t, t, generator=g, dtype=F64)

    def prog(call, z):
        a = call(aten.linear.default, z, W1)
        b = call(aten.linear.default, z, W2)
        bt = call(aten.transpose.int, b, 1, 2)
        if add_bias:
            return call(aten.baddbmm.default, bias, a, bt, beta=0.5, alpha=-1.5)
        return call(op, a, bt)

    return Case(prog, (t, d), width=0.7)


def case_conv(g):
    c_in, c_out = _ri(g, 1, 2), _ri(g, 1, 3)
    groups = 1
    if c_in == 2 and c_out % 2 == 0 and _maybe(g):
        groups = 2
    if _maybe(g, 0.3):  # conv1d
        L, k = _ri(g, 2, 6), _ri(g, 1, 3)
        W = torch.randn(c_out, c_in // groups, k, generator=g, dtype=F64)
        s, p, d = _ri(g, 1, 2), _ri(g, 0, 1), _ri(g, 1, 2)
        if (L + 2 * p - d * (k - 1) - 1) < 0:
            p = k
        return Case(lambda call, z: call(aten.conv1d.default, z, W, None, [s], [p], [d], groups),
                    (c_in, L))
    H, Wd, k = _ri(g, 2, 5), _ri(g, 2, 5), _ri(g, 1, 3)
    W = torch.randn(c_out, c_in // groups, k, k, generator=g, dtype=F64)
    b = torch.randn(c_out, generator=g, dtype=F64) if _maybe(g) else None
    s, p, d = _ri(g, 1, 2), _ri(g, 0, 1), _ri(g, 1, 2)
    if min(H, Wd) + 2 * p - d * (k - 1) - 1 < 0:
        p = d * (k - 1)
    if _maybe(g, 0.3):
        return Case(lambda call, z: call(aten.convolution.default, z, W, b, [s, s], [p, p],
                                         [d, d], False, [0, 0], groups), (c_in, H, Wd))
    return Case(lambda call, z: call(aten.conv2d.default, z, W, b, [s, s], [p, p], [d, d], groups),
                (c_in, H, Wd))


def case_layer_norm(g):
    t, d = _ri(g, 1, 3), _ri(g, 2, 5)
    two = _maybe(g, 0.25)
    shape = [t, d] if two else [d]
    gamma = torch.randn(shape, generator=g, dtype=F64) if _maybe(g) else None
    beta = torch.randn(shape, generator=g, dtype=F64) if _maybe(g) else None
    eps = float(10 ** torch.empty(()).uniform_(-3, 0, generator=g))
    native = _maybe(g)

    def prog(call, z):
        if native:
            out = call(aten.native_layer_norm.default, z, shape, gamma, beta, eps)
            return call(operator.getitem, out, 0)
        return call(aten.layer_norm.default, z, shape, gamma, beta, eps)

    return Case(prog, (t, d), offset=2.0, width=float(torch.empty(()).uniform_(0.05, 1.5,
                                                                              generator=g)))


def case_rms_norm(g):
    t, d = _ri(g, 1, 3), _ri(g, 1, 5)
    w = torch.randn(d, generator=g, dtype=F64) if _maybe(g) else None
    eps = float(10 ** torch.empty(()).uniform_(-3, 0, generator=g))
    return Case(lambda call, z: call(aten.rms_norm.default, z, [d], w, eps), (t, d), offset=2.0,
                width=0.6)


def case_batch_norm(g):
    c, h = _ri(g, 1, 3), _ri(g, 1, 3)
    mean = torch.randn(c, generator=g, dtype=F64)
    var = torch.rand(c, generator=g, dtype=F64) + 0.05
    w = torch.randn(c, generator=g, dtype=F64) if _maybe(g) else None
    b = torch.randn(c, generator=g, dtype=F64) if _maybe(g) else None
    if _maybe(g):
        return Case(lambda call, z: call(aten.batch_norm.default, z, w, b, mean, var, False, 0.1,
                                         1e-5, False), (c, h, 2))

    def prog(call, z):
        out = call(aten._native_batch_norm_legit_no_training.default, z, w, b, mean, var, 0.1,
                   1e-5)
        return call(operator.getitem, out, 0)

    return Case(prog, (c, h))


def case_sdpa(g):
    t, h, dh = _ri(g, 1, 4), _ri(g, 1, 2), _ri(g, 1, 3)
    d = h * dh
    kv = _ri(g, 0, 2)  # 0: one k/v head per query head, 1: shared (broadcast), 2: GQA
    if kv and h == 1:
        h, d = 2, 2 * dh
    hk = h if kv == 0 else 1
    Wq = _w(g, d, d, 1.5)
    Wk, Wv = (_w(g, hk * dh, d, 1.5) for _ in range(2))
    bq = torch.randn(d, generator=g, dtype=F64) if _maybe(g) else None
    causal = _maybe(g)
    scale = None if _maybe(g) else float(torch.rand((), generator=g)) * 3
    mask = None
    if not causal and _maybe(g, 0.3):
        if _maybe(g):
            mask = torch.rand(t, t, generator=g) < 0.7
            mask[:, 0] = True
        else:
            mask = torch.randn(t, t, generator=g, dtype=F64)

    def prog(call, z):
        B = z.shape[0]

        def heads(w, n_heads, b=None):
            y = call(aten.linear.default, z, w, b)
            y = call(aten.view.default, y, [B, t, n_heads, dh])
            return call(aten.transpose.int, y, 1, 2)

        q, k, v = heads(Wq, h, bq), heads(Wk, hk), heads(Wv, hk)
        kw = {"scale": scale} if scale is not None else {}
        if kv == 2:
            kw["enable_gqa"] = True
        y = call(aten.scaled_dot_product_attention.default, q, k, v, mask, 0.0, causal, **kw)
        y = call(aten.transpose.int, y, 1, 2)
        return call(aten.reshape.default, y, [B, t, d])

    return Case(prog, (t, d), width=float(torch.empty(()).uniform_(0.05, 1.0, generator=g)))


def case_softmax(g):
    t, d = _ri(g, 1, 3), _ri(g, 1, 5)
    W = _w(g, d, d, 3.0)
    dim = _ri(g, 1, 2)

    def prog(call, z):
        y = call(aten.linear.default, z, W)
        if _flip[0]:
            return call(aten._softmax.default, y, dim, False)
        return call(aten.softmax.int, y, -1)

    _flip = [_maybe(g)]
    return Case(prog, (t, d))


_POINTWISE = {
    "gelu": (lambda call, z: call(aten.gelu.default, z), False),
    "gelu_tanh": (lambda call, z: call(aten.gelu.default, z, approximate="tanh"), False),
    "relu": (lambda call, z: call(aten.relu.default, z), False),
    "silu": (lambda call, z: call(aten.silu.default, z), False),
    "tanh": (lambda call, z: call(aten.tanh.default, z), False),
    "sigmoid": (lambda call, z: call(aten.sigmoid.default, z), False),
    "leaky_relu": (lambda call, z: call(aten.leaky_relu.default, z, 0.2), False),
    "hardtanh": (lambda call, z: call(aten.hardtanh.default, z, -0.5, 1.0), False),
    "clamp": (lambda call, z: call(aten.clamp.default, z, -0.3, None), False),
    "abs": (lambda call, z: call(aten.abs.default, z), False),
    "exp": (lambda call, z: call(aten.exp.default, z), False),
    "neg": (lambda call, z: call(aten.neg.default, z), False),
    "square": (lambda call, z: call(aten.pow.Tensor_Scalar, z, 2), False),
    "sqrt": (lambda call, z: call(aten.sqrt.default, z), True),
    "rsqrt": (lambda call, z: call(aten.rsqrt.default, z), True),
    "reciprocal": (lambda call, z: call(aten.reciprocal.default, z), True),
    "pow1.5": (lambda call, z: call(aten.pow.Tensor_Scalar, z, 1.5), True),
    "dropout_eval": (lambda call, z: call(aten.dropout.default, z, 0.3, False), False),
    "native_dropout_eval": (
        lambda call, z: call(operator.getitem, call(aten.native_dropout.default, z, 0.3, False), 0),
        False,
    ),
    "clip": (lambda call, z: call(aten.clip.default, z, None, 0.4), False),
}


def make_pointwise(name):
    fn, pos = _POINTWISE[name]

    def make(g):
        t, d = _ri(g, 1, 3), _ri(g, 1, 4)
        if pos or _maybe(g, 0.4):
            return Case(fn, (t, d), pos=pos, offset=2.0, width=float(
                torch.empty(()).uniform_(0.1, 2.0, generator=g)))
        W = _w(g, d, d, 2.0)

        def prog(call, z):  # correlated inputs through a linear layer
            return fn(call, call(aten.linear.default, z, W))

        return Case(prog, (t, d), offset=2.0)

    return make


def case_arith(g):
    t, d = _ri(g, 1, 3), _ri(g, 1, 4)
    W1, W2 = _w(g, d, d), _w(g, d, d)
    c = torch.randn(d, generator=g, dtype=F64)
    kind = _ri(g, 0, 7)

    def prog(call, z):
        a = call(aten.linear.default, z, W1)
        b = call(aten.linear.default, z, W2)
        if kind == 0:
            return call(aten.add.Tensor, a, b, alpha=-0.5)
        if kind == 1:
            return call(aten.sub.Tensor, a, c)
        if kind == 2:
            return call(aten.mul.Tensor, a, b)
        if kind == 3:
            return call(aten.mul.Tensor, a, c)
        if kind == 4:
            return call(aten.div.Tensor, a, c.abs() + 0.5)
        if kind == 5:
            e = call(aten.exp.default, b)
            return call(aten.div.Tensor, a, e)
        if kind == 6:
            return call(aten.rsub.Scalar, a, 2.0, alpha=3.0)
        s = call(aten.mean.dim, a, [1], True)  # broadcast of an activation
        return call(aten.add.Tensor, b, s)

    return Case(prog, (t, d), width=0.8)


def case_reduce(g):
    shape = tuple(_ri(g, 1, 3) for _ in range(_ri(g, 1, 3)))
    dims = [i + 1 for i in range(len(shape)) if _maybe(g)] or [len(shape)]
    keep = _maybe(g)
    op = aten.mean.dim if _maybe(g) else aten.sum.dim_IntList
    W = _w(g, shape[-1], shape[-1])

    def prog(call, z):
        y = call(aten.linear.default, z, W)
        return call(op, y, dims, keep)

    return Case(prog, shape)


def case_shape(g):
    """One random shape op after an optional expand (lip_tok < lip) and a linear layer."""
    t, d = _ri(g, 1, 3), _ri(g, 1, 4)
    rep = _ri(g, 1, 3)
    W = _w(g, d, d)
    W2 = _w(g, d, d)
    kind = _ri(g, 0, 31)
    idx = torch.randint(0, d, (d + 1,), generator=g)

    def prog(call, z):
        B = z.shape[0]
        y = call(aten.linear.default, z, W)  # (B, t, d)
        y = call(aten.unsqueeze.default, y, 1)  # (B, 1, t, d)
        y = call(aten.expand.default, y, [B, rep, t, d])  # lip = √rep·lip_tok
        if kind == 0:
            return call(aten.reshape.default, y, [B, rep * t * d])
        if kind == 1:
            return call(aten.permute.default, y, [0, 3, 1, 2])
        if kind == 2:
            return call(aten.transpose.int, y, 2, 3)
        if kind == 3:
            return call(aten.flatten.using_ints, y, 1, 2)
        if kind == 4:
            return call(aten.unflatten.int, y, 1, [rep, 1])
        if kind == 5:
            return call(aten.squeeze.dim, call(aten.unsqueeze.default, y, -1), -1)
        if kind == 6:
            return call(aten.select.int, y, 2, t - 1)
        if kind == 7:
            return call(aten.slice.Tensor, y, 3, 0, d, 2)
        if kind == 8:
            y2 = call(aten.linear.default, z, W2)
            return call(aten.cat.default, [call(aten.select.int, y, 1, 0), y2], -1)
        if kind == 9:
            y2 = call(aten.linear.default, z, W2)
            return call(aten.stack.default, [call(aten.select.int, y, 1, 0), y2], 1)
        if kind == 10:
            parts = call(aten.split.Tensor, y, 1, -1)
            return call(operator.getitem, parts, 0)
        if kind == 11:
            return call(aten.clone.default, call(aten.contiguous.default, y))
        if kind == 12:
            return call(aten.repeat.default, y, [1, 1, 2, 1])
        if kind == 13:
            return call(aten.flip.default, y, [2, 3])
        if kind == 14:
            return call(aten.index_select.default, y, 3, idx)
        if kind == 15:
            return call(aten.constant_pad_nd.default, y, [1, 2], 0.0)
        if kind == 16:
            return call(aten.constant_pad_nd.default, y, [1, 0, 0, 1], 1.5)
        if kind == 17:
            return call(aten.unfold.default, y, 3, min(2, d), 1)
        if kind == 18:
            return call(aten.roll.default, y, [1], [3])
        if kind == 20:
            return call(aten.narrow.default, y, 3, 0, max(1, d - 1))
        if kind == 21:
            return call(operator.getitem, call(aten.chunk.default, y, 2, 2), 0)
        if kind == 22:
            return call(operator.getitem, call(aten.unbind.int, y, 2), t - 1)
        if kind == 23:
            return call(aten.movedim.int, y, 3, 1)
        if kind == 24:
            return call(aten.repeat_interleave.self_int, y, 2, 3)
        if kind == 25:
            return call(aten.index.Tensor, y, [None, None, None, idx])
        if kind == 26:
            return call(aten.diagonal.default, y, 0, 2, 3)
        if kind == 27:
            return call(aten.pad.default, call(aten.reshape.default, y, [B, rep * t, d]), [1, 1],
                        "reflect" if d > 1 else "replicate")
        if kind == 28:
            return call(operator.getitem, call(aten.tensor_split.sections, y, 2, 3), 0)
        if kind == 29:
            return call(aten._to_copy.default, call(aten.expand_as.default, y, y), dtype=F64)
        if kind == 30:
            return call(aten.hstack.default, [y, y])
        return call(aten.cat.default, [y, y], 1)

    if kind == 31:
        return Case(lambda call, z: call(aten.linear.default, z, W), (t, d))
    return Case(prog, (t, d))


def case_pool(g):
    c, H, Wd = _ri(g, 1, 2), _ri(g, 2, 6), _ri(g, 2, 6)
    k = _ri(g, 1, min(3, H, Wd))
    s = _ri(g, 1, 3)
    p = _ri(g, 0, k // 2)
    kind = _ri(g, 0, 6)
    ceil = _maybe(g)
    if kind == 0:
        d = _ri(g, 1, 2)
        if (k - 1) * d + 1 > min(H, Wd):
            d = 1
        return Case(lambda call, z: call(aten.max_pool2d.default, z, [k, k], [s, s], [p, p],
                                         [d, d], ceil), (c, H, Wd))
    if kind == 1:
        def prog(call, z):
            out = call(aten.max_pool2d_with_indices.default, z, [k, k], [s, s], [p, p])
            return call(operator.getitem, out, 0)

        return Case(prog, (c, H, Wd))
    if kind == 2:
        inc = _maybe(g)
        return Case(lambda call, z: call(aten.avg_pool2d.default, z, [k, k], [s, s], [p, p],
                                         ceil, inc), (c, H, Wd))
    if kind == 3:
        o = [_ri(g, 1, H), _ri(g, 1, Wd)]
        return Case(lambda call, z: call(aten.adaptive_avg_pool2d.default, z, o), (c, H, Wd))
    if kind == 4:
        return Case(lambda call, z: call(aten.max_pool1d.default, z, [k], [s], [p]), (c, H))
    if kind == 5:
        return Case(lambda call, z: call(aten.avg_pool1d.default, z, [k], [s], [p], ceil),
                    (c, H))
    o1 = _ri(g, 1, H)
    return Case(lambda call, z: call(aten.adaptive_avg_pool1d.default, z, [o1]), (c, H))


def case_token_ball(g):
    t, d = _ri(g, 1, 3), _ri(g, 1, 4)
    rho = float(torch.rand((), generator=g)) * 2 + 0.1
    W = _w(g, d, d, 2.0)

    def prog(call, z):
        return call(torch.ops.lipcert.token_ball.default, call(aten.linear.default, z, W), rho)

    return Case(prog, (t, d), offset=1.5)


def case_group_sort2(g):
    t, d = _ri(g, 1, 3), 2 * _ri(g, 1, 3)
    W = _w(g, d, d, 2.0)

    def prog(call, z):
        return call(torch.ops.lipcert.group_sort2.default, call(aten.linear.default, z, W))

    return Case(prog, (t, d), offset=0.5)


def case_vector_norm(g):
    t, d = _ri(g, 1, 3), _ri(g, 1, 4)
    keep = _maybe(g)
    W = _w(g, d, d)

    def prog(call, z):
        y = call(aten.linear.default, z, W)
        return call(aten.linalg_vector_norm.default, y, 2, [-1], keep)

    return Case(prog, (t, d))


RULE_CASES = {
    "linear": case_linear,
    "matmul_const": case_matmul_const,
    "matmul_two_activations": case_matmul_two,
    "convolution": case_conv,
    "layer_norm": case_layer_norm,
    "rms_norm": case_rms_norm,
    "batch_norm": case_batch_norm,
    "sdpa": case_sdpa,
    "softmax": case_softmax,
    "arithmetic": case_arith,
    "mean_sum": case_reduce,
    "shape_ops": case_shape,
    "pooling": case_pool,
    "token_ball": case_token_ball,
    "group_sort2": case_group_sort2,
    "vector_norm": case_vector_norm,
    **{f"pointwise_{k}": make_pointwise(k) for k in _POINTWISE},
}


@pytest.mark.parametrize("name", list(RULE_CASES))
def test_rule_soundness(name: str) -> None:
    check_rule(RULE_CASES[name], seed=1000 + list(RULE_CASES).index(name))


# --------------------------------------------------------------------------- specific checks


def test_gelu_max_slope_is_rounded_up() -> None:
    x = torch.linspace(-6, 6, 2_000_001, dtype=F64, requires_grad=True)
    (gr,) = torch.autograd.grad(torch.nn.functional.gelu(x).sum(), x)
    assert float(gr.max()) <= GELU_MAX_SLOPE <= float(gr.max()) + 1e-9
    assert 1.1289041 < GELU_MAX_SLOPE < 1.1289042


def test_global_slopes() -> None:
    """Over the whole real line the pointwise rules give the known global slopes."""
    ctx = Ctx(1)
    inf = torch.full((1, 3), math.inf, dtype=F64)
    x = input_bound(ctx, BoxDomain(-math.inf, math.inf), (1, 3), box=(-inf, inf))
    call = BoundCall(ctx)
    expect = {"gelu": 1.128904145185155, "silu": 1.099839320128867, "tanh": 1.0,
              "sigmoid": 0.25, "relu": 1.0}
    for name, slope in expect.items():
        out = _POINTWISE[name][0](call, x)
        assert float(out.lip) == pytest.approx(slope, rel=1e-7)
        assert float(out.lip) >= slope - 1e-9


def _mha_prog(wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor, t: int, h: int) -> Program:
    d = wq.shape[0]
    dh = d // h

    def prog(call, z):
        b = z.shape[0]

        def heads(w):
            y = call(aten.view.default, call(aten.linear.default, z, w), [b, t, h, dh])
            return call(aten.transpose.int, y, 1, 2)

        y = call(aten.scaled_dot_product_attention.default, heads(wq), heads(wk), heads(wv),
                 scale=1.0)
        y = call(aten.reshape.default, call(aten.transpose.int, y, 1, 2), [b, t, d])
        return call(aten.linear.default, y, wo)

    return prog


def test_multihead_attention_forms() -> None:
    """DESIGN.md: the engine certifies several heads with the proven √H form. The paper's
    single form ‖W_O‖‖W_V‖(1 + 2R²‖A‖) (unproven for H > 1) is searched adversarially here:
    orthogonal W_V, W_O, large query scales (near one-hot attention), tokens in the ball of
    radius R = 1, gradient ascent on the max-token Lipschitz ratio. Both must hold."""
    g = torch.Generator().manual_seed(7)
    worst_paper = 0.0
    for trial in range(6):
        h, t = (2, 4, 8)[trial % 3], (2, 3, 4)[trial % 3]
        d = 2 * h
        a = 1.0 + 19.0 * float(torch.rand((), generator=g))
        wq = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0] * a
        wk, wv, wo = (torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
                      for _ in range(3))
        prog = _mha_prog(wq, wk, wv, wo, t, h)
        ctx = Ctx(1)
        x = input_bound(ctx, EmbeddingDomain(1.0), (1, t, d))
        token_ball = torch.ops.lipcert.token_ball.default
        out = prog(BoundCall(ctx), BoundCall(ctx)(token_ball, x, 1.0))
        paper = 1.0 + 2.0 * a  # ‖W_O‖ = ‖W_V‖ = ‖W_K‖ = 1, ‖W_Q‖ = a, R = 1, scale 1
        X = torch.randn(32, t, d, generator=g, dtype=F64)
        Y = X + 0.01 * torch.randn(32, t, d, generator=g, dtype=F64)
        X, Y = X.requires_grad_(True), Y.requires_grad_(True)
        opt = torch.optim.Adam([X, Y], lr=0.03)
        for _ in range(120):
            xb, yb = (token_ball(Z, 1.0) for Z in (X, Y))
            fx, fy = prog(real_call, xb), prog(real_call, yb)
            ratio = (fx - fy).norm(dim=-1).amax(-1) / (xb - yb).norm(dim=-1).amax(-1).clamp_min(
                1e-9)
            opt.zero_grad()
            (-ratio.sum()).backward()
            opt.step()
        best = float(ratio.detach().max())
        assert best <= float(out.lip_tok) * (1 + 1e-9)
        worst_paper = max(worst_paper, best / paper)
    assert worst_paper <= 1.0, f"the paper's multi-head form is violated: {worst_paper}"


def test_unsupported_op_message() -> None:
    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return torch.cumsum(self.lin(x), dim=-1)

    from lipcert.bounds import Propagator

    prop = Propagator.from_model(Odd(), torch.rand(2, 3))
    with pytest.raises(UnsupportedOpError) as err:
        prop.run((0.0, 1.0), sample_shape=(3,))
    msg = str(err.value)
    assert "aten.cumsum" in msg
    assert "@lipcert.bounds.rule(torch.ops.aten.cumsum)" in msg
    assert "lipcert/bounds/rules/arithmetic.py" in msg
    assert "graph node 'cumsum'" in msg


def test_unsupported_message_names_module() -> None:
    class Inner(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.special.erfinv(x * 0.5)

    class Outer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Inner()

        def forward(self, x: Tensor) -> Tensor:
            return self.block(x)

    from lipcert.bounds import Propagator

    prop = Propagator.from_model(Outer(), torch.rand(2, 3))
    with pytest.raises(UnsupportedOpError, match=r"module 'block' \(.*Inner\)"):
        prop.run((0.0, 1.0), sample_shape=(3,))


def test_batch_mixing_raises() -> None:
    ctx = Ctx(2)
    box = torch.ones(2, 3, dtype=F64)
    x = input_bound(ctx, BoxDomain(-1, 1), (2, 3), box=(-box, box))
    call = BoundCall(ctx)
    with pytest.raises(BatchMixingError):
        call(aten.mean.dim, x, [0])
    with pytest.raises(BatchMixingError):
        call(aten.linear.default, call(aten.t.default, x), torch.ones(2, 2, dtype=F64))
    with pytest.raises(BatchMixingError):
        call(aten.batch_norm.default, x, None, None, None, None, True, 0.1, 1e-5, False)
    # moving the batch around without mixing it is fine
    y = call(aten.t.default, x)
    z = call(aten.t.default, y)
    out = call(aten.linear.default, z, torch.eye(3, dtype=F64))
    assert out.lip.shape == (2,)


def test_per_sample_bounds_with_batch_merged_into_heads() -> None:
    """nn.MultiheadAttention merges the batch with the heads (view [T, B·H, dh]); bounds stay
    per sample and match a one-sample run."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    model = torch.nn.Sequential(layer).eval()
    from lipcert.bounds import Propagator

    prop = Propagator.from_model(model, torch.rand(2, 3, 8))
    x = torch.rand(3, 3, 8)
    r = torch.tensor([0.01, 0.02, 0.05], dtype=F64)
    res = prop.run((0.0, 1.0), center=x, radius=r)
    for i in range(3):
        one = prop.run((0.0, 1.0), center=x[i : i + 1], radius=r[i : i + 1])
        assert torch.allclose(res.output.lip[i], one.output.lip[0], rtol=1e-9)


def test_embedding_of_the_certified_input_is_refused() -> None:
    ctx = Ctx(1)
    box = torch.ones(1, 3, dtype=F64)
    x = input_bound(ctx, BoxDomain(0, 5), (1, 3), box=(0 * box, 4 * box))
    with pytest.raises(UnsupportedOpError, match="embedding space"):
        BoundCall(ctx)(aten.embedding.default, torch.randn(6, 2, dtype=F64), x)
