"""Soundness of every forward-interval and backward rule of ``lipcert.bounds.backward``.

Each case is a small random program (a few ATen ops around the op under test) over a random
input set: per sample, the L2 ball of a random radius around a random centre, intersected
with a box domain. The program is built as a torch.fx graph and run three ways: through the
forward rules (Boxes with Taylor remainders, or plain intervals), through the backward rules
(enclosures of the gradient of random linear functionals of the output), and on float64
tensors (truth) at random points of the set and at points found by gradient ascent. Checked,
with tolerances at the level of float64 rounding only:

* every node's value lies in its interval;
* value − value(centre) − A·δ (A the exact Jacobian at the centre, by forward-mode AD) lies
  in the node's remainder enclosure, and the op's own remainder y − y₀ − J₀(x − x₀) (J₀ the
  op's Jacobian at its centre inputs) in the op's own enclosure;
* with symbolic remainders (every third Taylor draw), the narrowed intervals and remainders
  pass the same checks;
* the gradient of each functional with respect to every node lies in that node's enclosure,
  and its norm at the input is at most ‖ |G_c| + G_r ‖.

DRAWS weight draws × N samples = 200 random cases per rule.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

import lipcert.models.ops  # noqa: F401  (the lipcert custom ops)
from lipcert.bounds import BoxDomain
from lipcert.bounds.backward import Box, Grad
from lipcert.bounds.backward.evaluation import SDPA, attention_parts_exact
from lipcert.bounds.backward.forward import forward_node, input_box
from lipcert.bounds.backward.jacobian import centre_jacobian_norms
from lipcert.bounds.backward.registry import FwdCtx
from lipcert.bounds.backward.symbolic import SymbolicRemainders
from lipcert.bounds.backward.walk import walk

aten = torch.ops.aten
F64 = torch.float64
DRAWS = 25  # weight draws per rule
N = 8  # centres (samples) per draw: DRAWS × N = 200 cases per rule
POINTS = 10  # random points per sample
SEARCHED = 2  # draws per rule that also get gradient-ascent searches
STEPS = 8  # ascent steps per search
M = 2  # random functionals of the output (the margin axis)


# --------------------------------------------------------------------------- programs


class Recorder:
    """Records ``prog(call, x)`` as a torch.fx graph; tensor arguments become constants."""

    def __init__(self) -> None:
        self.graph = torch.fx.Graph()
        self.consts: dict[str, Tensor] = {}
        self.input = self.graph.placeholder("x")

    def _const(self, t: Tensor) -> torch.fx.Node:
        name = f"c{len(self.consts)}"
        node = self.graph.placeholder(name)
        self.consts[name] = t.to(F64) if t.is_floating_point() else t
        return node

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        args, kwargs = tree_map(lambda a: self._const(a) if isinstance(a, Tensor) else a,
                                (args, kwargs))
        return self.graph.call_function(target, args, kwargs)


@dataclass
class Case:
    prog: Callable[[Any, Any], Any]
    shape: tuple[int, ...]  # per sample
    domain: tuple[float, float] = (-8.0, 8.0)
    scale: float = 1.0  # centres ~ N(0, scale²)
    radius: float = 0.3  # radii ~ U(0, radius)


def build(case: Case) -> tuple[torch.fx.Graph, dict[str, Tensor], str]:
    rec = Recorder()
    out = case.prog(rec, rec.input)
    rec.graph.output(out)
    return rec.graph, rec.consts, out.name


def run(graph: torch.fx.Graph, consts: dict[str, Tensor], x: Tensor) -> dict[str, Any]:
    """Every node's value on real tensors (attention written out, as the rules see it,
    since the fused CPU kernel has no forward-mode derivative)."""
    env: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node.name] = x if node.name == "x" else consts[node.name]
        elif node.op == "call_function":
            args = torch.fx.node.map_arg(node.args, lambda a: env[a.name])
            kwargs = torch.fx.node.map_arg(dict(node.kwargs), lambda a: env[a.name])
            target = node.target
            if target is SDPA:
                env[node.name] = attention_parts_exact(*args, **kwargs)[0]
            else:
                env[node.name] = target(*args, **kwargs)
    return env


def tensors(env: dict[str, Any], names: list[str]) -> list[Tensor]:
    return [env[n] for n in names]


# --------------------------------------------------------------------------- the harness


def _sample_set(g: torch.Generator, case: Case) -> tuple[Tensor, Tensor, BoxDomain]:
    lo, hi = case.domain
    c = torch.randn((N, *case.shape), generator=g, dtype=F64) * case.scale
    c = c.clamp(lo + 1e-3, hi - 1e-3)
    if torch.rand((), generator=g) < 0.3:  # some coordinates exactly at the domain's ends
        at = torch.rand(c.shape, generator=g) < 0.3
        c = torch.where(at, torch.where(torch.rand(c.shape, generator=g) < 0.5,
                                        torch.tensor(lo, dtype=F64), torch.tensor(hi, dtype=F64)),
                        c)
    r = torch.rand(N, generator=g, dtype=F64) * case.radius
    r[0] = 0.0
    return c, r, BoxDomain(lo, hi)


def _project(x: Tensor, c: Tensor, r: Tensor, dom: BoxDomain) -> Tensor:
    """Onto box ∩ ball (box first, then towards the centre, which is in the box)."""
    x = x.clamp(dom.lo, dom.hi)
    d = x - c
    nrm = d.flatten(1).norm(dim=1).clamp_min(1e-300)
    f = torch.clamp(r / nrm, max=1.0).reshape(-1, *([1] * (x.dim() - 1)))
    return (c + d * f).clamp(dom.lo, dom.hi)


def _points(g: torch.Generator, c: Tensor, r: Tensor, dom: BoxDomain) -> list[Tensor]:
    pts = [c]
    for _ in range(POINTS):
        d = torch.randn(c.shape, generator=g, dtype=F64)
        d = d / d.flatten(1).norm(dim=1).reshape(-1, *([1] * (c.dim() - 1))).clamp_min(1e-300)
        u = torch.rand((c.shape[0], *([1] * (c.dim() - 1))), generator=g, dtype=F64) ** 0.3
        pts.append(_project(c + d * r.reshape(-1, *([1] * (c.dim() - 1))) * u, c, r, dom))
    return pts


class Bounds:
    """Forward and backward enclosures of one program over one input set."""

    def __init__(self, graph: torch.fx.Graph, consts: dict[str, Tensor], out: str, c: Tensor,
                 r: Tensor, dom: BoxDomain, taylor: bool, w: Tensor, symbolic: bool = False
                 ) -> None:
        norms = centre_jacobian_norms(graph, consts, "x", c) if taylor else {}

        def first_order(name: str, shape: torch.Size) -> Tensor | None:
            jn = norms.get(name)
            if jn is None or jn.shape != shape:
                return None
            return jn * r.reshape(-1, *([1] * (len(shape) - 1)))

        def forward(tighten: Any = None) -> dict[str, Any]:
            env: dict[str, Any] = {"x": input_box(dom, c, r), **consts}
            ctx = FwdCtx(n=c.shape[0], cache={})
            hook = None if tighten is None else (lambda name, box: tighten(name, box, env))
            for node in graph.nodes:
                if node.op == "call_function":
                    env[node.name] = forward_node(ctx, node, env,
                                                  first_order if taylor else None, hook)
            return env

        self.env = forward()
        self.symbolic = False
        if symbolic:
            sym = SymbolicRemainders(graph, consts, "x", out)
            major = _batch_major(graph, consts, c)
            if sym.prepare(c, None, self.env, lambda name: name in major):
                self.env = forward(sym.tighten)
                self.symbolic = bool(sym.before)
        self.graph, self.out, self.w = graph, out, w
        self.grads: dict[str, Any] = {}
        self.grads["x"] = walk(graph, self.env, {out: Grad(w, torch.zeros_like(w))}, "x",
                               record=self.grads)

    def box_names(self) -> list[str]:
        return [k for k, v in self.env.items() if isinstance(v, Box) and k != "x"]


def _batch_major(graph: torch.fx.Graph, consts: dict[str, Tensor], c: Tensor) -> set[str]:
    """The nodes whose dim 0 is the sample: poisoning one sample's input with NaN reaches
    exactly the elements with that index in dim 0."""
    names: set[str] | None = None
    for i in range(c.shape[0]):
        x = c.clone()
        x[i] = math.nan
        with torch.no_grad():
            env = run(graph, consts, x)
        ok = set()
        for name, v in env.items():
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == c.shape[0]:
                mine = (torch.arange(c.shape[0]) == i).reshape(-1, *([1] * (v.dim() - 1)))
                if bool((v.isnan() == mine.expand(v.shape)).all()):
                    ok.add(name)
        names = ok if names is None else names & ok
    return names or set()


def _own_remainders(b: Bounds, consts: dict[str, Tensor], env: dict[str, Any],
                    centre_vals: dict[str, Any], p: int, what: str) -> None:
    """y − y₀ − J₀(x − x₀) of every op with an own remainder, J₀ its Jacobian at the centre
    values of its arguments (forward-mode AD), inside [own_lo, own_hi]."""
    for node in b.graph.nodes:
        bx = b.env.get(node.name)
        if node.op != "call_function" or not isinstance(bx, Box) or not bx.has_own:
            continue
        # the values of an op with several outputs (sort) carry that op's own remainder
        op, index = node, None
        if node.target is operator.getitem:
            op, index = node.args[0], node.args[1]
        live = [a for a in op.all_input_nodes if isinstance(b.env.get(a.name), Box)]
        target = op.target
        centre_all = {**consts, **{k: _rep(v, p) for k, v in centre_vals.items()
                                   if isinstance(v, Tensor) and k not in consts}}

        def f(*ts: Tensor, op: torch.fx.Node = op, live: list = live, index: Any = index,
              target: Any = target, centre_all: dict = centre_all) -> Tensor:
            sub = dict(zip([a.name for a in live], ts, strict=True))
            vals = {**centre_all, **sub}
            args = torch.fx.node.map_arg(op.args, lambda a: vals[a.name])
            kwargs = torch.fx.node.map_arg(dict(op.kwargs), lambda a: vals[a.name])
            if target is SDPA:
                return attention_parts_exact(*args, **kwargs)[0]
            out = target(*args, **kwargs)
            return out if index is None else out[index]

        primals = tuple(centre_all[a.name] for a in live)
        tangents = tuple((env[a.name] - centre_all[a.name]).detach() for a in live)
        y0, lin = torch.func.jvp(f, primals, tangents)
        v = env[node.name].detach()
        rem = v - y0 - lin
        lo, hi = _rep(bx.own_lo, p), _rep(bx.own_hi, p)
        tol = _tol(v) + 1e-11 * lin.abs()
        assert bool((rem >= lo - tol).all() and (rem <= hi + tol).all()), (
            f"{what}: node {node.name}'s own remainder leaves its enclosure by "
            f"{float(torch.maximum(lo - rem, rem - hi).max()):.3g}")
        if bx.own_rows is not None:
            rows = rem.norm(dim=-1)
            bound = _rep(bx.own_rows, p) + tol.norm(dim=-1)
            assert bool((rows <= bound).all()), (
                f"{what}: node {node.name}'s own remainder's row norm exceeds its bound by "
                f"{float((rows - bound).max()):.3g}")


def _tol(t: Tensor) -> Tensor:
    return 1e-11 * (1 + t.abs())


def _rep(t: Tensor, p: int) -> Tensor:
    """A per-sample tensor repeated for p points per sample (points are the outer index)."""
    return t.unsqueeze(0).expand(p, *t.shape).reshape(p * t.shape[0], *t.shape[1:])


def _check_points(b: Bounds, consts: dict[str, Tensor], c: Tensor, xs: Tensor,
                  centre_vals: dict[str, Any], what: str) -> None:
    """Check points xs (P, N, ...) in one batched run (samples never mix)."""
    p = xs.shape[0]
    names = b.box_names()
    x = xs.reshape(p * N, *xs.shape[2:])
    xg = x.clone().requires_grad_(True)
    env = run(b.graph, consts, xg)
    for name in names:
        bx, v = b.env[name], env[name].detach()
        lo, hi = _rep(bx.lo, p), _rep(bx.hi, p)
        assert bool((v >= lo - _tol(v)).all() and (v <= hi + _tol(v)).all()), (
            f"{what}: node {name} leaves its interval by "
            f"{float(torch.maximum(lo - v, v - hi).max()):.3g}")
    # deviations from the centre: per row (rdev) and per sample (l2)
    for name in names:
        bx, v = b.env[name], env[name].detach()
        dev = v - _rep(centre_vals[name], p)
        tol = 1e-10 * (1 + v.abs().amax())
        if bx.rdev is not None and v.dim() >= 2:
            assert bool((dev.norm(dim=-1) <= _rep(bx.rdev, p) + tol).all()), (
                f"{what}: node {name}'s rows move more than rdev")
        if bx.l2 is not None and v.dim() >= 1 and bx.l2.shape == (c.shape[0],):
            per_sample = dev.reshape(dev.shape[0], -1).norm(dim=1)
            assert bool((per_sample <= _rep(bx.l2, p) + tol).all()), (
                f"{what}: node {name} moves more than l2")
    # Taylor remainders: value − value₀ − A·δ ∈ e
    cr = _rep(c, p)
    _, lin = torch.func.jvp(lambda t: tuple(tensors(run(b.graph, consts, t), names)),
                            (cr,), ((x - cr).detach(),))
    for name, lin_v in zip(names, lin, strict=True):
        bx = b.env[name]
        if not bx.has_e:
            continue
        v = env[name].detach()
        rem = v - _rep(centre_vals[name], p) - lin_v
        e_lo, e_hi = _rep(bx.e_lo, p), _rep(bx.e_hi, p)
        tol = _tol(v) + 1e-11 * lin_v.abs()
        assert bool((rem >= e_lo - tol).all() and (rem <= e_hi + tol).all()), (
            f"{what}: node {name}'s Taylor remainder leaves its enclosure by "
            f"{float(torch.maximum(e_lo - rem, rem - e_hi).max()):.3g}")
    with torch.no_grad():
        _own_remainders(b, consts, env, centre_vals, p, what)
    # gradients of the functionals at every node
    vals = [env[n] for n in names]
    for m in range(M):
        phi = (_rep(b.w[m], p) * env[b.out]).sum()
        grads = torch.autograd.grad(phi, [xg, *vals], retain_graph=True, allow_unused=True)
        for name, gr in zip(["x", *names], grads, strict=True):
            enc = b.grads.get(name)
            if gr is None or enc is None:
                continue
            lo, hi = _rep(enc.c[m] - enc.r[m], p), _rep(enc.c[m] + enc.r[m], p)
            assert bool((gr >= lo - _tol(gr)).all() and (gr <= hi + _tol(gr)).all()), (
                f"{what}: the gradient at node {name} leaves its enclosure by "
                f"{float(torch.maximum(lo - gr, gr - hi).max()):.3g}")
        enc = b.grads["x"]
        if enc is not None:
            bound = _rep((enc.c[m].abs() + enc.r[m]).flatten(1).norm(dim=1), p)
            norm = grads[0].flatten(1).norm(dim=1)
            assert bool((norm <= bound * (1 + 1e-10) + 1e-12).all()), f"{what}: ‖∇‖ > L"


def _ascent(b: Bounds, consts: dict[str, Tensor], c: Tensor, r: Tensor, dom: BoxDomain,
            g: torch.Generator, centre_vals: dict[str, Any], what: str) -> None:
    """Projected gradient ascent on ‖∇φ‖² and on a random functional of a random node,
    checking every iterate."""
    names = b.box_names()
    target = names[int(torch.randint(len(names), (), generator=g))]
    v = torch.randn(b.env[target].shape, generator=g, dtype=F64)
    shape = (-1, *([1] * (c.dim() - 1)))
    for objective in ("grad", "value"):
        x = _points(g, c, r, dom)[1]
        for _ in range(STEPS):
            xg = x.clone().requires_grad_(True)
            env = run(b.graph, consts, xg)
            if objective == "grad":
                (gx,) = torch.autograd.grad((b.w[0] * env[b.out]).sum(), xg, create_graph=True)
                if not gx.requires_grad:  # piecewise linear: no curvature to climb
                    break
                obj = gx.square().sum()
            else:
                obj = (v * env[target]).sum()
            (step,) = torch.autograd.grad(obj, xg, allow_unused=True)
            if step is None:
                break
            nrm = step.flatten(1).norm(dim=1).clamp_min(1e-300)
            x = _project(x + step / nrm.reshape(shape) * r.reshape(shape) * 0.3, c, r,
                         dom).detach()
            _check_points(b, consts, c, x.unsqueeze(0), centre_vals,
                          f"{what} ({objective} ascent)")


def check_rule(make: Callable[[torch.Generator], Case], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for draw in range(DRAWS):
        case = make(g)
        graph, consts, out = build(case)
        c, r, dom = _sample_set(g, case)
        with torch.no_grad():
            out_shape = run(graph, consts, c)[out].shape
        w = torch.randn((M, *out_shape), generator=g, dtype=F64)
        taylor = draw % 3 != 2
        b = Bounds(graph, consts, out, c, r, dom, taylor, w, symbolic=draw % 3 == 1)
        with torch.no_grad():
            centre_vals = {k: v for k, v in run(graph, consts, c).items() if k in b.env}
        what = f"draw {draw} (taylor={taylor}, symbolic={b.symbolic})"
        _check_points(b, consts, c, torch.stack(_points(g, c, r, dom)), centre_vals, what)
        if draw < SEARCHED:
            _ascent(b, consts, c, r, dom, g, centre_vals, what)


# --------------------------------------------------------------------------- cases


def _w(g: torch.Generator, o: int, i: int, scale: float = 1.0) -> Tensor:
    return torch.randn(o, i, generator=g, dtype=F64) * scale / math.sqrt(i)


def _b(g: torch.Generator, o: int) -> Tensor:
    return torch.randn(o, generator=g, dtype=F64) * 0.3


def _mix(call: Any, x: Any, g: torch.Generator, o: int, i: int, scale: float = 1.0) -> Any:
    return call(aten.linear.default, x, _w(g, o, i, scale), _b(g, o))


def case_linear(g: torch.Generator) -> Case:
    w, b = _w(g, 5, 4), _b(g, 5)
    return Case(lambda call, x: call(aten.linear.default, x, w, b), (3, 4))


def case_matmul_const(g: torch.Generator) -> Case:
    a, w = _w(g, 2, 3), _w(g, 4, 5)

    def prog(call: Any, x: Any) -> Any:
        y = call(aten.matmul.default, x, w)  # (3, 5) @ ... x: (3, 4) @ (4, 5)
        return call(aten.matmul.default, a, y)

    return Case(prog, (3, 4))


def case_matmul_two(g: torch.Generator) -> Case:
    w1, w2 = _w(g, 4, 4), _w(g, 4, 4)

    def prog(call: Any, x: Any) -> Any:
        a = call(aten.linear.default, x, w1)
        b = call(aten.transpose.int, call(aten.linear.default, x, w2), 1, 2)
        return call(aten.bmm.default, a, b)

    return Case(prog, (3, 4), radius=0.2)


def case_arith(g: torch.Generator) -> Case:
    c1 = torch.randn(1, 4, generator=g, dtype=F64)
    c2 = torch.rand(4, generator=g, dtype=F64) + 0.5
    alpha = float(torch.randn((), generator=g))
    w = _w(g, 4, 4)

    def prog(call: Any, x: Any) -> Any:
        y = call(aten.linear.default, x, w)
        s = call(aten.add.Tensor, x, y, alpha=alpha)
        s = call(aten.sub.Tensor, s, c1)
        s = call(aten.rsub.Scalar, s, 0.5)
        s = call(aten.mul.Tensor, s, c2)
        s = call(aten.div.Tensor, s, c2 + 1)
        s = call(aten.neg.default, s)
        p = call(aten.mul.Tensor, s, y)
        q = call(aten.div.Tensor, p, call(aten.add.Tensor, call(aten.exp.default, x), 1.0))
        return call(aten.sub.Tensor, q, p, alpha=0.5)

    return Case(prog, (3, 4), domain=(-2.0, 2.0), radius=0.2)


def make_pointwise(name: str) -> Callable[[torch.Generator], Case]:
    fns: dict[str, tuple[Callable[[Any, Any], Any], bool]] = {
        "gelu": (lambda call, t: call(aten.gelu.default, t), False),
        "gelu_tanh": (lambda call, t: call(aten.gelu.default, t, approximate="tanh"), False),
        "silu": (lambda call, t: call(aten.silu.default, t), False),
        "tanh": (lambda call, t: call(aten.tanh.default, t), False),
        "sigmoid": (lambda call, t: call(aten.sigmoid.default, t), False),
        "relu": (lambda call, t: call(aten.relu.default, t), False),
        "leaky_relu": (lambda call, t: call(aten.leaky_relu.default, t, 0.1), False),
        "hardtanh": (lambda call, t: call(aten.hardtanh.default, t, -0.5, 0.7), False),
        "clamp": (lambda call, t: call(aten.clamp.default, t, -0.3, 0.6), False),
        "abs": (lambda call, t: call(aten.abs.default, t), False),
        "exp": (lambda call, t: call(aten.exp.default, t), False),
        "sqrt": (lambda call, t: call(aten.sqrt.default, t), True),
        "rsqrt": (lambda call, t: call(aten.rsqrt.default, t), True),
        "reciprocal": (lambda call, t: call(aten.reciprocal.default, t), True),
        "pow2": (lambda call, t: call(aten.pow.Tensor_Scalar, t, 2), False),
        "pow3": (lambda call, t: call(aten.pow.Tensor_Scalar, t, 3), False),
        "pow_half": (lambda call, t: call(aten.pow.Tensor_Scalar, t, 0.5), True),
    }
    fn, positive = fns[name]

    def make(g: torch.Generator) -> Case:
        w1, b1, w2 = _w(g, 6, 4, 1.5), _b(g, 6), _w(g, 3, 6)

        def prog(call: Any, x: Any) -> Any:
            h = x if positive else call(aten.linear.default, x, w1, b1)
            return call(aten.linear.default, fn(call, h), w2 if not positive else _w(g, 3, 4))

        if positive:
            return Case(prog, (2, 4), domain=(0.3, 4.0), scale=2.0, radius=0.3)
        return Case(prog, (2, 4), radius=0.5)

    return make


def case_layer_norm(g: torch.Generator) -> Case:
    k = int(torch.randint(1, 3, (), generator=g))
    shape = (3, 5) if k == 1 else (2, 3, 4)
    norm_shape = list(shape[-k:])
    weight = torch.randn(norm_shape, generator=g, dtype=F64)
    bias = torch.randn(norm_shape, generator=g, dtype=F64) * 0.3
    eps = float(10 ** torch.empty(()).uniform_(-5, -1, generator=g))
    w = _w(g, shape[-1], shape[-1], 2.0)

    def prog(call: Any, x: Any) -> Any:
        h = call(aten.linear.default, x, w)
        return call(aten.layer_norm.default, h, norm_shape, weight, bias, eps)

    return Case(prog, shape, radius=0.4)


def case_rms_norm(g: torch.Generator) -> Case:
    weight = torch.randn(5, generator=g, dtype=F64)
    w = _w(g, 5, 5, 2.0)

    def prog(call: Any, x: Any) -> Any:
        return call(aten.rms_norm.default, call(aten.linear.default, x, w), [5], weight, 1e-3)

    return Case(prog, (3, 5), radius=0.4)


def case_softmax(g: torch.Generator) -> Case:
    dim = int(torch.randint(1, 3, (), generator=g))
    w = _w(g, 5, 5, 3.0)

    def prog(call: Any, x: Any) -> Any:
        return call(aten._softmax.default, call(aten.linear.default, x, w), dim, False)

    return Case(prog, (4, 5), radius=0.5)


def case_sdpa(g: torch.Generator) -> Case:
    T, d, H = 4, 6, 2
    wq, wk, wv = (_w(g, d, d, 2.0) for _ in range(3))
    kind = int(torch.randint(4, (), generator=g))
    mask = torch.rand(T, T, generator=g) < 0.7
    mask[:, 0] = True
    add = torch.randn(T, T, generator=g, dtype=F64)

    def heads(call: Any, t: Any) -> Any:
        return call(aten.transpose.int, call(aten.view.default, t, [-1, T, H, d // H]), 1, 2)

    def prog(call: Any, x: Any) -> Any:
        q, k, v = (heads(call, call(aten.linear.default, x, w)) for w in (wq, wk, wv))
        if kind == 0:
            y = call(aten.scaled_dot_product_attention.default, q, k, v)
        elif kind == 1:
            y = call(aten.scaled_dot_product_attention.default, q, k, v, is_causal=True,
                     scale=0.7)
        elif kind == 2:
            y = call(aten.scaled_dot_product_attention.default, q, k, v, mask)
        else:
            y = call(aten.scaled_dot_product_attention.default, q, k, v, add)
        return call(aten.reshape.default, call(aten.transpose.int, y, 1, 2), [-1, T, d])

    return Case(prog, (T, d), radius=0.3)


def case_reduce(g: torch.Generator) -> Case:
    dims = [[1], [2], [1, 2]][int(torch.randint(3, (), generator=g))]
    keep = bool(torch.rand((), generator=g) < 0.5)
    w = _w(g, 4, 4)

    def prog(call: Any, x: Any) -> Any:
        h = call(aten.tanh.default, call(aten.linear.default, x, w))
        a = call(aten.mean.dim, h, dims, keep)
        b = call(aten.sum.dim_IntList, h, dims, keep)
        return call(aten.mul.Tensor, call(aten.add.Tensor, a, b), 0.5)

    return Case(prog, (3, 4))


def case_shape(g: torch.Generator) -> Case:
    k = int(torch.randint(9, (), generator=g))
    idx = torch.tensor([2, 0, 2])
    w = _w(g, 4, 4)

    def prog(call: Any, x: Any) -> Any:
        h = call(aten.gelu.default, call(aten.linear.default, x, w))  # (N, 3, 4)
        if k == 0:
            h = call(aten.reshape.default, call(aten.permute.default, h, [0, 2, 1]), [-1, 12])
        elif k == 1:
            h = call(aten.cat.default, [h, call(aten.full_like.default, h, 0.5), h], 1)
        elif k == 2:
            h = call(aten.select.int, call(aten.unsqueeze.default, h, 2), 1, 1)
        elif k == 3:
            h = call(aten.slice.Tensor, call(aten.flip.default, h, [2]), 2, 1, 4)
        elif k == 4:
            h = call(aten.expand.default, call(aten.unsqueeze.default, h, 1), [-1, 2, 3, 4])
        elif k == 5:
            parts = call(aten.split.Tensor, h, 2, 2)
            h = call(aten.mul.Tensor, call(operator.getitem, parts, 0),
                     call(operator.getitem, parts, 1))
        elif k == 6:
            h = call(aten.index_select.default, h, 1, idx)
        elif k == 7:
            h = call(aten.constant_pad_nd.default, call(aten.roll.default, h, [1], [2]),
                     [1, 2], 0.5)
        else:
            h = call(aten.flatten.using_ints, call(aten.repeat.default, h, [1, 2, 1]), 1)
        return call(aten.tanh.default, h)

    return Case(prog, (3, 4))


def case_token_ball(g: torch.Generator) -> Case:
    rho = float(torch.empty(()).uniform_(0.5, 2.5, generator=g))
    w = _w(g, 4, 4, 1.5)

    def prog(call: Any, x: Any) -> Any:
        return call(torch.ops.lipcert.token_ball.default, call(aten.linear.default, x, w), rho)

    return Case(prog, (3, 4), radius=0.5)


def case_group_sort2(g: torch.Generator) -> Case:
    w = _w(g, 6, 4)

    def prog(call: Any, x: Any) -> Any:
        return call(torch.ops.lipcert.group_sort2.default, call(aten.linear.default, x, w))

    return Case(prog, (3, 4), radius=0.5)


def case_conv(g: torch.Generator) -> Case:
    kernel = torch.randn(3, 2, 2, 2, generator=g, dtype=F64) * 0.5
    bias = _b(g, 3)

    def prog(call: Any, x: Any) -> Any:
        y = call(aten.conv2d.default, x, kernel, bias, [1, 1], [1, 1])
        return call(aten.tanh.default, y)

    return Case(prog, (2, 4, 4))


def case_max_pool(g: torch.Generator) -> Case:
    """Max pooling after a ReLU (exact ties at 0 in many windows), ResNet's 3/2/1 among
    random kernels, strides, paddings, dilations, ceil mode, 1-D and with indices."""
    kind = int(torch.randint(4, (), generator=g))
    w, b = _w(g, 5, 5, 1.5), _b(g, 5)
    relu = bool(torch.rand((), generator=g) < 0.6)

    def prog(call: Any, x: Any) -> Any:
        h = call(aten.linear.default, x, w, b)  # (N, 2, 5, 5)
        if relu:
            h = call(aten.relu.default, h)
        if kind == 0:
            y = call(aten.max_pool2d.default, h, [3, 3], [2, 2], [1, 1])
        elif kind == 1:
            y = call(aten.max_pool2d.default, h, [2, 3], [2, 1], [1, 0], [2, 1], True)
        elif kind == 2:
            flat = call(aten.reshape.default, h, [-1, 2, 25])
            y = call(aten.max_pool1d.default, flat, [4], [3], [2], [1], True)
        else:
            y = call(operator.getitem,
                     call(aten.max_pool2d_with_indices.default, h, [2, 2], [1, 1]), 0)
        return call(aten.tanh.default, y)

    return Case(prog, (2, 5, 5), radius=0.4)


def case_avg_pool(g: torch.Generator) -> Case:
    """Average pooling (padding with and without counting it, ceil mode, a divisor) and
    adaptive average pooling (1-D as Swin pools its tokens, 2-D as a ResNet's head)."""
    kind = int(torch.randint(4, (), generator=g))
    w, b = _w(g, 5, 5, 1.5), _b(g, 5)

    def prog(call: Any, x: Any) -> Any:
        h = call(aten.gelu.default, call(aten.linear.default, x, w, b))  # (N, 2, 5, 5)
        if kind == 0:
            y = call(aten.avg_pool2d.default, h, [3, 3], [2, 2], [1, 1], True, False)
        elif kind == 1:
            y = call(aten.avg_pool2d.default, h, [2, 2], [1, 2], [1, 0], False, True, 3)
        elif kind == 2:
            y = call(aten.adaptive_avg_pool2d.default, h, [2, 3])
        else:
            flat = call(aten.reshape.default, h, [-1, 10, 5])
            y = call(aten.adaptive_avg_pool1d.default, flat, [2])
        return call(aten.tanh.default, y)

    return Case(prog, (2, 5, 5), radius=0.4)


def case_sort(g: torch.Generator) -> Case:
    """sort's values along a random dimension (deel-torchlip's GroupSort2 sorts pairs along
    a middle dimension), ascending or descending, groups of 2 to 4, sometimes after a ReLU
    (exact ties)."""
    size = int(torch.randint(2, 5, (), generator=g))
    dim = int(torch.randint(1, 4, (), generator=g))
    descending = bool(torch.rand((), generator=g) < 0.5)
    stable = bool(torch.rand((), generator=g) < 0.2)
    relu = bool(torch.rand((), generator=g) < 0.4)
    w, b = _w(g, 3 * size, 4, 1.5), _b(g, 3 * size)

    def prog(call: Any, x: Any) -> Any:
        h = call(aten.linear.default, x, w, b)  # (N, 2, 3·size)
        if relu:
            h = call(aten.relu.default, h)
        h = call(aten.reshape.default, h, [-1, 2, 3, size] if dim == 3 else [-1, 2, size, 3]
                 if dim == 2 else [-1, size, 2, 3])
        if stable:
            srt = call(aten.sort.stable, h, stable=True, dim=dim, descending=descending)
        else:
            srt = call(aten.sort.default, h, dim, descending)
        y = call(aten.reshape.default, call(operator.getitem, srt, 0), [-1, 2, 3 * size])
        return call(aten.tanh.default, y)

    return Case(prog, (2, 4), radius=0.5)


def case_l2_norm_pool(g: torch.Generator) -> Case:
    """deel-torchlip's L2-norm pooling (the fused op), disjoint and overlapping windows, 1-D
    and 2-D; activations scaled down at random so that some windows may reach 0 on the
    ball."""
    from lipcert.bounds.rules.thirdparty import l2_norm_pool_op

    kind = int(torch.randint(3, (), generator=g))
    w, b = _w(g, 4, 4, 1.5), _b(g, 4)
    small = float(10 ** torch.empty(()).uniform_(-1.5, 0, generator=g))
    scale = float(torch.empty(()).uniform_(0.3, 2.0, generator=g))

    def prog(call: Any, x: Any) -> Any:
        h = call(aten.mul.Tensor, call(aten.linear.default, x, w, b), small)  # (N, 2, 4, 4)
        if kind == 0:
            y = call(l2_norm_pool_op, h, [2, 2], [2, 2], scale)
        elif kind == 1:
            y = call(l2_norm_pool_op, h, [2, 3], [1, 1], scale)
        else:
            y = call(l2_norm_pool_op, call(aten.reshape.default, h, [-1, 2, 16]), [3], [2],
                     scale)
        return call(aten.tanh.default, y)

    return Case(prog, (2, 4, 4), radius=0.3)


def case_batch_norm(g: torch.Generator) -> Case:
    """Eval-mode batch norm after a convolution (``_native_batch_norm_legit_no_training``
    as exports hold it, and ``batch_norm``), with and without affine parameters, and on
    (N, C) features."""
    kind = int(torch.randint(3, (), generator=g))
    kernel = torch.randn(3, 2, 2, 2, generator=g, dtype=F64) * 0.5
    affine = bool(torch.rand((), generator=g) < 0.7)
    weight = torch.randn(3, generator=g, dtype=F64) * 2 if affine else None
    bias = torch.randn(3, generator=g, dtype=F64) if affine else None
    mean = torch.randn(3, generator=g, dtype=F64)
    var = torch.rand(3, generator=g, dtype=F64) * 2 + 0.05
    w = _w(g, 3, 32, 2.0)

    def prog(call: Any, x: Any) -> Any:
        if kind == 2:
            h = call(aten.linear.default, call(aten.flatten.using_ints, x, 1), w)  # (N, 3)
            y = call(aten.batch_norm.default, h, weight, bias, mean, var, False, 0.1, 1e-5,
                     False)
            return call(aten.tanh.default, y)
        h = call(aten.conv2d.default, x, kernel, None, [1, 1], [1, 1])
        if kind == 0:
            y = call(operator.getitem, call(aten._native_batch_norm_legit_no_training.default,
                                            h, weight, bias, mean, var, 0.1, 1e-5), 0)
        else:
            y = call(aten.batch_norm.default, h, weight, bias, mean, var, False, 0.1, 1e-3,
                     False)
        return call(aten.tanh.default, y)

    return Case(prog, (2, 4, 4))


POINTWISE = ["gelu", "gelu_tanh", "silu", "tanh", "sigmoid", "relu", "leaky_relu", "hardtanh",
             "clamp", "abs", "exp", "sqrt", "rsqrt", "reciprocal", "pow2", "pow3", "pow_half"]
CASES: dict[str, Callable[[torch.Generator], Case]] = {
    "linear": case_linear,
    "matmul_const": case_matmul_const,
    "matmul_two": case_matmul_two,
    "arith": case_arith,
    "layer_norm": case_layer_norm,
    "rms_norm": case_rms_norm,
    "softmax": case_softmax,
    "sdpa": case_sdpa,
    "reduce": case_reduce,
    "shape": case_shape,
    "token_ball": case_token_ball,
    "group_sort2": case_group_sort2,
    "conv": case_conv,
    "max_pool": case_max_pool,
    "avg_pool": case_avg_pool,
    "sort": case_sort,
    "l2_norm_pool": case_l2_norm_pool,
    "batch_norm": case_batch_norm,
    **{name: make_pointwise(name) for name in POINTWISE},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_soundness(name: str) -> None:
    torch.set_num_threads(1)
    check_rule(CASES[name], seed=sorted(CASES).index(name))


def test_gelu_derivative_range_contains_the_extremes() -> None:
    """The enclosure of GELU′ over an interval around √2 contains its maximum 1.1289…"""
    from lipcert.bounds.backward.rules.pointwise import GELU

    x = Box(torch.tensor([1.0]), torch.tensor([1.0], dtype=F64), torch.tensor([2.0], dtype=F64))
    d_lo, d_hi = GELU.slope(x)
    t = torch.linspace(1.0, 2.0, 10001, dtype=F64).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.gelu(t).sum(), t)
    assert float(d_hi) >= float(grad.max()) > 1.1289
    assert float(d_lo) <= float(grad.min())
