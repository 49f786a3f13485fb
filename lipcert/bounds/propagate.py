"""Walk an ``ExportedProgram``'s ATen graph node by node and apply the rule table.

``Propagator(program)`` prepares a program once: it normalises the graph (``normalize.py``:
in-place operators functionalised, operators without a rule decomposed, selections pushed
towards the input), lists the nodes that still have no rule, and holds the parameters,
constants and the caches for weight norms and shape analyses. ``run(domain, ...)``
propagates bounds for one input set and returns a :class:`Propagation` with the bounds of
the output and of every node; it first refuses a graph with nodes that have no rule, naming
all of them in one :class:`UnsupportedOpError`.

Nodes that do not depend on the model input are evaluated exactly ("constant folding": a
GPT's normalised embedding table, masks, ...). Every other node goes to its rule
(:func:`apply_op`); an unexpected exception there becomes a one-line :class:`RuleError`
naming the node. After each rule, :func:`finalize` applies the relations that hold for
every node: lip_tok ≤ lip ≤ lip_tok·√(rows), tok_norm ≤ norm ≤ tok_norm·√(rows), the norms
implied by the intervals, and in local mode (ball of radius r) the bounds around the centre
value: |Δy_e| ≤ ‖Δ row‖ ≤ lip_tok·r, ‖y‖ ≤ ‖y₀‖ + lip·r, ‖y_row‖ ≤ max‖y₀_row‖ + lip_tok·r.
Intervals are widened outwards by 1e-12 relative to each element and 1e-13 relative to its
row's largest magnitude after every node, which covers the float64 rounding of the rules'
elementwise formulas and of the centre values (dot products are widened in their rules).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.node import map_aggregate, map_arg
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import lipcert.bounds.rules  # noqa: F401  (registers the rules)
from lipcert.bounds.errors import (
    RuleError,
    UnsupportedOpError,
    op_names,
    rule_failure_message,
    unsupported_message,
)
from lipcert.bounds.normalize import (
    as_program,
    copy_graph,
    normalize_program,
    push_selections,
    unsupported_nodes,
)
from lipcert.bounds.registry import GRAPH_REWRITES, Exact, lookup
from lipcert.bounds.state import (
    F64,
    Bound,
    BoxDomain,
    Const,
    Ctx,
    Domain,
    EmbeddingDomain,
    Opaque,
    as_domain,
    interval_norms,
    norms_from_sq,
    per_elem,
    row_counts,
    row_sid,
    value_norms,
)
from lipcert.errors import LipcertError
from lipcert.threads import one_thread

# --------------------------------------------------------------------------- one node


def _fold(ctx: Ctx, target: Any, args: Any, kwargs: Any) -> Any:
    """Evaluate a node that does not depend on the input."""
    a, k = tree_map(lambda x: x.t if isinstance(x, Const) else x, (args, kwargs))
    out = target(*a, **k)
    base = getattr(ctx.node, "name", None)
    flat, spec = tree_flatten(out)
    wrapped = [
        Const(t, base if len(flat) == 1 else (None if base is None else f"{base}[{i}]"))
        if isinstance(t, Tensor)
        else t
        for i, t in enumerate(flat)
    ]
    return tree_unflatten(wrapped, spec)


def _to_value(x: Any) -> Any:
    if isinstance(x, Bound):
        return x.value
    if isinstance(x, Const):
        return x.t.to(F64) if x.t.is_floating_point() else x.t
    return x


_VIEWS = (torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.view_copy)


def _fill_values(ctx: Ctx, target: Any, args: Any, kwargs: Any, out: Any) -> None:
    """Centre values of a rule's outputs (local mode): the op itself on the inputs' values."""
    outs = [o for o in tree_flatten(out)[0] if isinstance(o, Bound)]
    if not outs or all(o.value is not None for o in outs):
        return
    a, k = tree_map(_to_value, (args, kwargs))
    if getattr(target, "overloadpacket", None) in _VIEWS:
        target = torch.ops.aten.reshape.default
    with torch.no_grad():
        vals = target(*a, **k)
    flat_out, _ = tree_flatten(out)
    flat_val, _ = tree_flatten(vals)
    if len(flat_val) != len(flat_out):
        flat_val = [vals] if isinstance(vals, Tensor) else flat_val
    for o, v in zip(flat_out, flat_val, strict=False):
        if isinstance(o, Bound) and o.value is None and isinstance(v, Tensor):
            o.value = v.to(F64)



def _clean(t: Tensor, nan: float) -> Tensor:
    t = t.to(F64)
    return torch.nan_to_num(t, nan=nan, posinf=math.inf, neginf=-math.inf) if bool(
        torch.isnan(t).any()
    ) else t


def finalize(ctx: Ctx, b: Bound, exact: bool = False) -> Bound:
    """The relations that hold for every node (module docstring), applied after each rule.
    ``exact``: the rule only moved or copied elements (its intervals are exact images of
    already finalised ones), so the interval work is skipped."""
    n = ctx.n
    lip = _clean(b.lip, math.inf).expand(n)
    lip_tok = torch.minimum(_clean(b.lip_tok, math.inf).expand(n), lip)
    norm = _clean(b.norm, math.inf).expand(n)
    tok = _clean(b.tok_norm, math.inf).expand(n)
    lo, hi = b.lo, b.hi
    value = None if b.value is None else b.value.to(F64)
    rows_of = None if b.sid is None else row_sid(b.sid.expand(lo.shape))
    if not (exact or ctx.lip_only):
        lo, hi = lo.to(F64), hi.to(F64)
        mag = torch.maximum(lo.abs(), hi.abs())
        if bool(torch.isnan(mag).any()):
            lo, hi = _clean(lo, -math.inf), _clean(hi, math.inf)
            mag = torch.maximum(lo.abs(), hi.abs())
        fin = torch.nan_to_num(mag, posinf=0.0)
        row = fin.amax(-1, keepdim=True) if fin.dim() and fin.shape[-1] else fin
        pad = fin.mul_(1e-12).add_(row * 1e-13 + 1e-300)
        lo, hi = lo - pad, hi + pad
        mag2 = None
        if value is not None:
            lo, hi = torch.minimum(lo, value), torch.maximum(hi, value)
            if ctx.local:
                assert ctx.radius is not None
                d = per_elem(lip_tok * ctx.radius, b.sid, value.shape)
                lo = torch.maximum(lo, value - d - pad)
                hi = torch.minimum(hi, value + d + pad)
        else:
            mag2 = (mag + pad).square()  # = max(lo², hi²) of the widened interval
        if mag2 is None:
            in_n, in_t = interval_norms(lo, hi, b.sid, n, rows_of)
        else:
            in_n, in_t = norms_from_sq(mag2, b.sid, n, rows_of)
        norm = torch.minimum(norm, in_n)
        tok = torch.minimum(tok, in_t)
    if value is not None and ctx.local:
        assert ctx.radius is not None
        vn, vt = value_norms(value, b.sid, n, rows_of)
        norm = torch.minimum(norm, vn + lip * ctx.radius)
        tok = torch.minimum(tok, vt + lip_tok * ctx.radius)
    own, constant = row_counts(lo.shape, b.sid, n, rows_of)
    lip = torch.minimum(lip, lip_tok * own.sqrt())
    norm = torch.minimum(norm, tok * (own + constant).sqrt())
    tok = torch.minimum(tok, norm)
    tok_l1 = b.tok_l1
    last = lo.shape[-1] if lo.dim() else 1
    l1_cap = math.sqrt(last) * tok
    tok_l1 = l1_cap if tok_l1 is None else torch.minimum(_clean(tok_l1, math.inf), l1_cap)
    return Bound(lo, hi, lip.clone(), lip_tok.clone(), norm.clone(), tok.clone(),
                 sid=b.sid, value=value, tok_l1=tok_l1)


def apply_op(ctx: Ctx, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
             ) -> Any:
    """Bounds of ``target(*args, **kwargs)`` where the arguments are Bounds, Consts or
    Python values: constant folding, or the op's rule followed by :func:`finalize`."""
    kwargs = kwargs or {}
    if target is operator.getitem and isinstance(args[0], list | tuple):
        return args[0][args[1]]
    leaves: list[Any] = []
    map_aggregate((args, kwargs), leaves.append)
    for leaf in leaves:
        if isinstance(leaf, Opaque):
            raise UnsupportedOpError(
                f"{op_names(target)[0]} uses {leaf.reason}, which has no bounds "
                f"(graph node '{getattr(ctx.node, 'name', '?')}')"
            )
    if not any(isinstance(leaf, Bound) for leaf in leaves):
        return _fold(ctx, target, args, kwargs)
    fn = lookup(target)
    if fn is None:
        raise UnsupportedOpError(unsupported_message([(target, ctx.node)]))
    out = fn(ctx, *args, **kwargs)
    exact = isinstance(out, Exact)
    if exact:
        out = out.out
    if ctx.local:
        _fill_values(ctx, target, args, kwargs, out)
    return map_aggregate(out, lambda o: finalize(ctx, o, exact) if isinstance(o, Bound) else o)


@contextmanager
def node_errors(node: Any) -> Iterator[None]:
    """Turn an unexpected exception while evaluating ``node`` into a one-line
    :class:`RuleError` naming it (``LipcertError``s pass unchanged)."""
    try:
        yield
    except LipcertError:
        raise
    except Exception as err:
        raise RuleError(rule_failure_message(node, err)) from err


# --------------------------------------------------------------------------- the input


def input_bound(
    ctx: Ctx,
    domain: Domain,
    shape: tuple[int, ...],
    center: Tensor | None = None,
    box: tuple[Tensor, Tensor] | None = None,
) -> Bound:
    """Bounds of the model input (lip = lip_tok = 1) over the input set: the domain (and the
    elementwise ``box`` if given), intersected in local mode with the balls of radius
    ``ctx.radius`` around the rows of ``center``."""
    n = shape[0]
    if isinstance(domain, BoxDomain):
        dlo, dhi = domain.lo, domain.hi
    else:
        dlo, dhi = -domain.max_norm, domain.max_norm
    lo = torch.full(shape, float(dlo), dtype=F64)
    hi = torch.full(shape, float(dhi), dtype=F64)
    if box is not None:
        lo = torch.maximum(lo, box[0].to(F64))
        hi = torch.minimum(hi, box[1].to(F64))
    value = None
    if center is not None:
        value = center.detach().to(F64)
        assert ctx.radius is not None
        r = ctx.radius.reshape(n, *([1] * (len(shape) - 1)))
        lo = torch.maximum(lo, value - r)
        hi = torch.minimum(hi, value + r)
    sid = None
    if n > 1:
        sid = torch.arange(n).reshape(n, *([1] * (len(shape) - 1))).expand(shape)
    norm, tok = interval_norms(lo, hi, sid, n)
    if isinstance(domain, EmbeddingDomain):
        tok = torch.clamp(tok, max=domain.max_norm)
    one = torch.ones(n, dtype=F64)
    return finalize(ctx, Bound(lo, hi, one, one.clone(), norm, tok, sid=sid, value=value))


# --------------------------------------------------------------------------- programs


@dataclass
class Propagation:
    """The result of one run: bounds of the output and of every node (by node name)."""

    output: Any
    env: dict[str, Any]
    ctx: Ctx
    program: ExportedProgram
    graph: Any = None

    @property
    def lip(self) -> Tensor:
        """Per-sample Lipschitz bound of the (first) output in L2 → L2."""
        out = self.output
        while isinstance(out, list | tuple):
            out = out[0]
        if isinstance(out, Const):
            return self.ctx.full(0.0)
        return out.lip


@dataclass
class Propagator:
    """Bound propagation over one exported program (see the module docstring). ``program``
    is the normalised program, ``graph`` the rewritten copy of its graph that is walked."""

    program: ExportedProgram
    method: str = "exact"
    norm_cache: dict[Any, Any] = field(default_factory=dict)
    shape_cache: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("exact", "gram"):
            raise LipcertError(f"unknown norm method {self.method!r}; use 'exact' or 'gram'")
        self.program = ep = normalize_program(self.program)
        graph, rename = copy_graph(ep.graph)
        self.graph = push_selections(graph)
        for rewrite in GRAPH_REWRITES:
            rewrite(self.graph)
        self.consts: dict[str, Const] = {}
        users = []
        for spec in ep.graph_signature.input_specs:
            name = rename[spec.arg.name]
            if spec.kind == InputKind.USER_INPUT:
                users.append(name)
                continue
            if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER,
                                 InputKind.CONSTANT_TENSOR):
                raise UnsupportedOpError(f"graph input {name} of kind {spec.kind} is unsupported")
            t = ep.state_dict.get(spec.target)
            if t is None:
                t = ep.constants.get(spec.target)
            if not isinstance(t, Tensor):
                raise LipcertError(f"no value for graph input {name} ({spec.target})")
            self.consts[name] = Const(t.detach(), name)
        if len(users) != 1:
            raise LipcertError(
                f"lipcert certifies models with exactly one tensor input; this one has {users}"
            )
        self.input_name = users[0]
        self.unsupported = unsupported_nodes(self.graph, users)
        node = next(n for n in self.graph.nodes if n.name == self.input_name)
        val = node.meta.get("val")
        self.input_shape = tuple(val.shape) if isinstance(val, Tensor) else None
        b0 = None if self.input_shape is None else self.input_shape[0]
        self.static_batch: int | None = b0 if isinstance(b0, int) else None
        self.param_names = dict(ep.graph_signature.inputs_to_parameters)

    @classmethod
    def from_model(
        cls, model: nn.Module | ExportedProgram, example: Tensor, method: str = "exact"
    ) -> Propagator:
        return cls(as_program(model, example), method=method)

    # ------------------------------------------------------------------ running

    def context(self, n: int, radius: Tensor | None, ibp: bool = True) -> Ctx:
        return Ctx(n, radius=radius, method=self.method, ibp=ibp,
                   norm_cache=self.norm_cache, shape_cache=self.shape_cache)

    def run(
        self,
        domain: Any = (0.0, 1.0),
        *,
        sample_shape: Iterable[int] | None = None,
        center: Tensor | None = None,
        radius: Tensor | float | None = None,
        ibp: bool = True,
    ) -> Propagation:
        """Propagate bounds for the input set: the whole domain (``center`` None: global
        mode, one sample per graph batch entry) or balls of ``radius`` around each row of
        ``center`` intersected with the domain (local mode)."""
        if self.unsupported:
            raise UnsupportedOpError(unsupported_message(
                [(node.target, node) for node in self.unsupported]))
        dom = as_domain(domain)
        if center is not None:
            n = center.shape[0]
            if radius is None:
                raise LipcertError("local mode needs a radius")
            r = torch.as_tensor(radius, dtype=F64).expand(n).clone()
            if bool((r < 0).any()):
                raise LipcertError("radii must be ≥ 0")
            shape = tuple(center.shape)
        else:
            r = None
            n = self.static_batch or 1
            if sample_shape is None:
                if self.input_shape is None or not all(
                    isinstance(s, int) for s in self.input_shape[1:]
                ):
                    raise LipcertError("give sample_shape: the program's input shape is dynamic")
                sample_shape = self.input_shape[1:]
            shape = (n, *tuple(sample_shape))
        if self.static_batch is not None and n != self.static_batch:
            raise LipcertError(
                f"this program was exported with a fixed batch of {self.static_batch}; "
                f"got {n} samples"
            )
        with one_thread():
            return self._run(dom, shape, center, n, r, ibp)

    def _run(self, dom: Domain, shape: tuple[int, ...], center: Tensor | None, n: int,
             r: Tensor | None, ibp: bool) -> Propagation:
        ctx = self.context(n, r, ibp)
        env: dict[str, Any] = {}
        output = None
        for node in self.graph.nodes:
            if node.op == "placeholder":
                if node.name == self.input_name:
                    env[node.name] = input_bound(ctx, dom, shape, center)
                else:
                    env[node.name] = self.consts[node.name]
            elif node.op == "call_function":
                env[node.name] = apply_node(ctx, node, env)
            elif node.op == "output":
                output = map_arg(node.args[0], lambda a: env[a.name])
            else:
                raise UnsupportedOpError(f"graph node {node.name} of kind {node.op}")
        if isinstance(output, list | tuple) and len(output) == 1:
            output = output[0]
        return Propagation(output, env, ctx, self.program, self.graph)


def apply_node(ctx: Ctx, node: torch.fx.Node, env: dict[str, Any]) -> Any:
    """:func:`apply_op` on a graph node whose arguments' bounds are in ``env`` (by node
    name); an unexpected exception becomes a :class:`RuleError` naming the node."""
    args = map_arg(node.args, lambda a: env[a.name])
    kwargs = map_arg(dict(node.kwargs), lambda a: env[a.name])
    ctx.node = node
    try:
        with node_errors(node):
            return apply_op(ctx, node.target, args, kwargs)
    finally:
        ctx.node = None
