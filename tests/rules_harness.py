"""The property-test harness of the bound rules (tests/test_bounds_rules*.py).

Each case is a tiny random program over a random input set (a box per sample, and in local
cases a ball around a centre inside it). The program is recorded as a torch.fx graph (so the
rules that recognise patterns see real graph nodes), rewritten by the registered
``graph_rewrite`` patterns as the engine rewrites exported graphs, run through the rules
(bounds), and run on float64 tensors (truth) at many points of the set. Checked, with
tolerances at the level of float64 rounding only:

* every output lies in [lo, hi]; its norm and largest row norm are ≤ norm and tok_norm;
* ‖f(x) − f(y)‖/‖x − y‖ ≤ lip and max_row ‖Δrow‖/‖x − y‖ ≤ lip_tok for random pairs and for
  pairs found by gradient ascent on that ratio;
* the exact local Jacobian's spectral norm (and per-row block norms) ≤ lip (lip_tok);
* in local mode the propagated centre value equals the program's output at the centre.

A program is ``prog(call, z)``: it calls ``call(aten_op, *args)`` for every operation, so the
same code runs through the rules and on real tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lipcert.bounds import RULES, Bound, BoxDomain, Const, Ctx, apply_op, input_bound
from lipcert.bounds.registry import GRAPH_REWRITES

aten = torch.ops.aten
F64 = torch.float64
CASES = 200  # random cases per rule
SEARCHED = 8  # of which this many also get a gradient-ascent search and exact Jacobians
POINTS = 24  # random points per case and sample

Program = Callable[[Callable[..., Any], Any], Any]


@dataclass
class Case:
    prog: Program
    shape: tuple[int, ...]  # per sample
    pos: bool = False  # inputs must be positive
    width: float = 1.0
    offset: float = 1.0


# ops that return their input's values but cut (or lack) its gradient: the truth side runs
# them as ``alias``, the same function, so that gradient searches and Jacobians see through
_GRADIENT_CUTS = (aten.detach.default, aten.detach_copy.default)


def real_call(target: Any, *args: Any, **kwargs: Any) -> Any:
    """``call`` on real tensors: the op itself (``_GRADIENT_CUTS`` as ``alias``)."""
    if target in _GRADIENT_CUTS:
        return aten.alias.default(*args, **kwargs)
    return target(*args, **kwargs)


# --------------------------------------------------------------------------- graphs


class _Nodes:
    """Values ↔ graph nodes while a program is recorded: a value produced by a call maps to
    its node; any other tensor becomes a constant placeholder."""

    def __init__(self) -> None:
        self.graph = torch.fx.Graph()
        self.of: dict[int, torch.fx.Node] = {}
        self.consts: dict[str, Const] = {}
        self.keep: list[Any] = []  # keeps ids unique while recording

    def bind(self, value: Any, node: torch.fx.Node) -> None:
        self.of[id(value)] = node
        self.keep.append(value)

    def arg(self, a: Any) -> Any:
        if id(a) in self.of:
            return self.of[id(a)]
        if type(a) in (list, tuple):
            return type(a)(self.arg(x) for x in a)
        if isinstance(a, dict):
            return {k: self.arg(v) for k, v in a.items()}
        if isinstance(a, Tensor | Const):
            node = self.graph.placeholder(f"c{len(self.consts)}")
            t = a.t if isinstance(a, Const) else a
            self.consts[node.name] = Const(t.detach(), node.name)
            node.meta["val"] = t
            self.bind(a, node)
            return node
        return a


class Tracer(_Nodes):
    """``call`` for a program on real tensors that records its calls as a graph."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.input = self.graph.placeholder("x")
        self.input.meta["val"] = x
        self.bind(x, self.input)

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        node = self.graph.call_function(target, self.arg(args), self.arg(kwargs))
        out = target(*args, **kwargs)
        node.meta["val"] = out
        if isinstance(out, Tensor | tuple | list):  # not sizes: small ints share ids
            self.bind(out, node)
        return out


def run_graph(ctx: Ctx, graph: torch.fx.Graph, consts: dict[str, Const], inputs: dict[str, Any]
              ) -> Any:
    """The bounds of the graph's output: every call node through ``apply_op`` with
    ``ctx.node`` set to the node (as the engine runs an exported graph)."""
    env: dict[torch.fx.Node, Any] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = inputs[node.name] if node.name in inputs else consts[node.name]
        elif node.op == "call_function":
            args = torch.fx.node.map_arg(node.args, env.__getitem__)
            kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
            ctx.node = node
            env[node] = apply_op(ctx, node.target, args, kwargs)
            ctx.node = None
        elif node.op == "output":
            return env[node.args[0]]
    raise AssertionError("graph without output")


def bound_program(prog: Program, ctx: Ctx, z: Bound, x: Tensor) -> tuple[Bound, Tensor]:
    """(bounds of ``prog`` for the input bounds ``z``, ``prog`` at the point ``x``): the
    program is recorded on x, its graph rewritten by the registered pattern rewrites as the
    engine does, and run through the rules."""
    tracer = Tracer(x)
    y = prog(tracer, x)
    tracer.graph.output(tracer.of[id(y)])
    for rewrite in GRAPH_REWRITES:
        rewrite(tracer.graph)
    return run_graph(ctx, tracer.graph, tracer.consts, {"x": z}), y


class BoundCall(_Nodes):
    """``call`` that runs a program through the rules as it goes (arguments: Bounds,
    tensors, numbers), recording the graph so that ``ctx.node`` is a real node."""

    def __init__(self, ctx: Ctx) -> None:
        super().__init__()
        self.ctx = ctx

    def arg(self, a: Any) -> Any:
        if isinstance(a, Bound) and id(a) not in self.of:
            node = self.graph.placeholder(f"b{len(self.keep)}")
            node.meta["val"] = a.lo
            self.bind(a, node)
            return node
        return super().arg(a)

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> Any:
        node = self.graph.call_function(target, self.arg(args), self.arg(kwargs))
        self.ctx.node = node
        out = apply_op(self.ctx, target, self.values(args), self.values(kwargs))
        self.ctx.node = None
        node.meta["val"] = out.lo if isinstance(out, Bound) else out
        if isinstance(out, Bound | tuple | list):
            self.bind(out, node)
        return out

    def values(self, a: Any) -> Any:
        """Arguments for the rules: recorded tensors as their Consts."""
        if isinstance(a, Tensor):
            return self.consts[self.of[id(a)].name]
        if type(a) in (list, tuple):
            return type(a)(self.values(x) for x in a)
        if isinstance(a, dict):
            return {k: self.values(v) for k, v in a.items()}
        return a


# --------------------------------------------------------------------------- sets and points


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


def project(x: Tensor, lo: Tensor, hi: Tensor, c: Tensor | None, r: Tensor | None) -> Tensor:
    """Points x (P, n, ...) onto box ∩ ball of each sample (box, then towards the centre:
    stays in the box since c is in it)."""
    x = torch.maximum(torch.minimum(x, hi), lo)
    if c is None:
        return x
    d = x - c
    nrm = d.flatten(2).norm(dim=2).clamp_min(1e-300)
    f = torch.clamp(r / nrm, max=1.0).reshape(*nrm.shape, *([1] * (x.dim() - 2)))
    return torch.maximum(torch.minimum(c + d * f, hi), lo)


def _sample(g, lo, hi, c, r, k):
    """k points of the set of each sample, shape (k, n, ...)."""
    n = lo.shape[0]
    ones = [1] * (lo.dim() - 1)
    u = torch.rand((k, *lo.shape), generator=g, dtype=F64)
    corner = torch.rand((k, 1, *ones), generator=g) < 0.3
    u = torch.where(corner, (u > 0.5).to(F64), u)
    x = lo + u * (hi - lo)
    if c is None:
        return x
    d = torch.randn((k, *lo.shape), generator=g, dtype=F64)
    d = d / d.flatten(2).norm(dim=2).reshape(k, n, *ones).clamp_min(1e-300)
    rho = r.reshape(1, n, *ones) * torch.rand((k, n, *ones), generator=g, dtype=F64) ** (1 / 3)
    return project(c + d * rho, lo, hi, c, r)


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


def _flat(y: Tensor) -> Tensor:
    return y.reshape(y.shape[0], y.shape[1], -1)


# --------------------------------------------------------------------------- checks


def _check_points(out: Bound, ys: Tensor, what: str) -> None:
    tol_box = 1e-9 * (1 + torch.maximum(out.lo.abs(), out.hi.abs()))
    lo, hi = out.lo.unsqueeze(0), out.hi.unsqueeze(0)
    bad = (ys < lo - tol_box) | (ys > hi + tol_box)
    assert not bool(bad.any()), f"{what}: output outside [lo, hi]"
    norms = _flat(ys).norm(dim=2)
    assert bool((norms <= out.norm * (1 + 1e-9) + 1e-9).all()), f"{what}: norm bound"
    tok = _row_norms(ys)
    assert bool((tok <= out.tok_norm * (1 + 1e-9) + 1e-9).all()), f"{what}: tok_norm bound"


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


def _ascent(prog, lo, hi, c, r, x0, y0, steps=25):
    """Gradient ascent on ‖f(x) − f(y)‖/‖x − y‖ and on the max row version (both points of
    each pair in one program run)."""
    xa, xb = x0.clone(), y0.clone()
    P = xa.shape[0]
    for step in range(steps):
        xa.requires_grad_(True)
        xb.requires_grad_(True)
        ys = _run(prog, torch.cat([xa, xb]))
        ya, yb = ys[:P], ys[P:]
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
            xa = project(xa.detach(), lo, hi, c, r)
            xb = project(xb.detach(), lo, hi, c, r)
    return xa.detach(), xb.detach()


def jacobian(prog: Program, x: Tensor) -> tuple[Tensor, Tensor]:
    """(J, y): the exact Jacobian of every sample's output w.r.t. its input at points x
    (P, n, ...), shape (P, n, out, in), by one batched reverse pass (samples are
    independent, so the gradient of an output summed over the batch is each sample's row)."""
    P, n = x.shape[:2]
    flat = x.reshape(P * n, *x.shape[2:]).clone().requires_grad_(True)
    y = prog(real_call, flat)
    ysum = y.sum(0).reshape(-1)
    m = ysum.numel()
    try:
        (g,) = torch.autograd.grad(ysum, flat, torch.eye(m, dtype=ysum.dtype),
                                   is_grads_batched=True, retain_graph=True,
                                   materialize_grads=True)
    except RuntimeError:  # a backward without a batching rule: one output at a time
        g = torch.stack([torch.autograd.grad(ysum[i], flat, retain_graph=True,
                                             materialize_grads=True)[0] for i in range(m)])
    return g.reshape(m, P, n, -1).permute(1, 2, 0, 3), y


def _jacobian_check(prog, out: Bound, x: Tensor, what: str) -> None:
    """Exact Jacobians at points x (P, n, ...): spectral norm ≤ lip, row blocks ≤ lip_tok."""
    J, y = jacobian(prog, x)
    P, n = x.shape[:2]
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


@contextmanager
def dispatched_rules() -> Iterator[set[Any]]:
    """The set of rule-table keys (``RULES``) through which ops are dispatched inside the
    block (each entry is wrapped by a recorder for its duration)."""
    seen: set[Any] = set()
    saved = dict(RULES)

    def recorder(key: Any, fn: Callable[..., Any]) -> Callable[..., Any]:
        def rule_fn(*args: Any, **kwargs: Any) -> Any:
            seen.add(key)
            return fn(*args, **kwargs)

        return rule_fn

    RULES.update({key: recorder(key, fn) for key, fn in saved.items()})
    try:
        yield seen
    finally:
        RULES.clear()
        RULES.update(saved)


# (table, case name) → the RULES keys its property cases dispatched, for the coverage test
COVERAGE: dict[tuple[str, str], frozenset[Any]] = {}


def check_rule(make: Callable[[torch.Generator], Case], seed: int, cases: int = CASES,
               record: tuple[str, str] | None = None) -> None:
    """``cases`` random cases from ``make`` (the first SEARCHED also searched), every check of
    the module docstring; the largest measured ratio must not exceed the bound. ``record``:
    store the rule-table keys the cases used in ``COVERAGE[record]`` once they all passed."""
    with dispatched_rules() as seen:
        _check_cases(make, seed, cases)
    if record is not None:
        COVERAGE[record] = frozenset(seen)


def _check_cases(make: Callable[[torch.Generator], Case], seed: int, cases: int) -> None:
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for i in range(cases):
        case = make(g)
        n = 1 if torch.rand((), generator=g) < 0.6 else 2
        local = bool(torch.rand((), generator=g) < 0.5)
        lo, hi, c, r = _rand_set(g, case, n, local)
        ctx = Ctx(n, radius=r)
        zb = input_bound(ctx, BoxDomain(-math.inf, math.inf), lo.shape, c, box=(lo, hi))
        out, yc = bound_program(case.prog, ctx, zb, lo if c is None else c)
        assert isinstance(out, Bound)
        what = f"seed {seed} case {i} ({'local' if local else 'global'}, n={n})"
        if local:
            assert torch.allclose(out.value, yc, rtol=1e-9, atol=1e-9), f"{what}: value"
        xs = _sample(g, lo, hi, c, r, POINTS)
        half = POINTS // 2
        near = project(xs[:half] + 1e-3 * torch.randn(xs[:half].shape, generator=g, dtype=F64),
                       lo, hi, c, r)
        ys_all = _run(case.prog, torch.cat([xs, near]))
        ys = ys_all[:POINTS]
        assert ys.shape[1:] == out.shape, f"{what}: shape {ys.shape} vs {out.shape}"
        _check_points(out, ys, what)
        # pairs: random against random, and each of the first half against a near point
        first = torch.cat([xs[:half], xs[:half]])
        y_first = torch.cat([ys[:half], ys[:half]])
        worst = max(worst, _check_pairs(out, first, torch.cat([xs[half:], near]), y_first,
                                        torch.cat([ys[half:], ys_all[POINTS:]]), what))
        if i < SEARCHED:
            xa, xb = _ascent(case.prog, lo, hi, c, r, xs[:6], xs[6:12])
            ys2 = _run(case.prog, torch.cat([xa, xb]))
            ya, yb = ys2[:6], ys2[6:]
            _check_points(out, ya, what + " ascent")
            worst = max(worst, _check_pairs(out, xa, xb, ya, yb, what + " ascent"))
            _jacobian_check(case.prog, out, torch.cat([xs[:4], xa[:2]]), what)
    assert worst <= 1 + 1e-6


# --------------------------------------------------------------------------- program helpers


def ri(g: torch.Generator, lo: int, hi: int) -> int:
    """A random integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def weight(g: torch.Generator, o: int, i: int, scale: float = 1.0) -> Tensor:
    """A random (o, i) matrix of spectral norm about ``scale``."""
    return torch.randn(o, i, generator=g, dtype=F64) * scale / math.sqrt(i)


def maybe(g: torch.Generator, p: float = 0.5) -> bool:
    return bool(torch.rand((), generator=g) < p)
