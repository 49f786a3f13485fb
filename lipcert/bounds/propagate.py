"""Walk an ``ExportedProgram``'s ATen graph node by node and apply the rule table.

``Propagator(program_or_module, example)`` prepares a graph once (parameters, constants,
caches for weight norms and shape analyses); ``run(domain, ...)`` propagates bounds for one
input set and returns a :class:`Propagation` with the bounds of the output and of every node.

Nodes that do not depend on the model input are evaluated exactly ("constant folding": a
GPT's normalised embedding table, masks, ...). Every other node goes to its rule; a missing
rule raises :class:`UnsupportedOpError` naming the op, the module and how to add a rule.
After each rule, :func:`finalize` applies the relations that hold for every node:
lip_tok ≤ lip ≤ lip_tok·√(rows), tok_norm ≤ norm ≤ tok_norm·√(rows), the norms implied by the
intervals, and in local mode (ball of radius r) the bounds around the centre value:
|Δy_e| ≤ ‖Δ row‖ ≤ lip_tok·r, ‖y‖ ≤ ‖y₀‖ + lip·r, ‖y_row‖ ≤ max‖y₀_row‖ + lip_tok·r.
Intervals are widened outwards by 1e-12 relative to each element and 1e-13 relative to its
row's largest magnitude after every node, which covers the float64 rounding of the rules'
elementwise formulas and of the centre values (dot products are widened in their rules).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import lipcert.bounds.rules  # noqa: F401  (registers the rules)
from lipcert.bounds.errors import UnsupportedOpError
from lipcert.bounds.registry import lookup
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


def _op_names(target: Any) -> tuple[str, str]:
    """(display name, Python expression for registering a rule) of a graph target."""
    if hasattr(target, "overloadpacket"):
        ns = getattr(target, "namespace", "aten")
        packet = target.overloadpacket.__name__
        return str(target), f"torch.ops.{ns}.{packet}"
    name = getattr(target, "__name__", repr(target))
    mod = getattr(target, "__module__", "")
    return f"{mod}.{name}" if mod else name, f"{mod}.{name}" if mod else name


def _rule_file(target: Any) -> str:
    if hasattr(target, "overloadpacket") and getattr(target, "namespace", "aten") != "aten":
        return "custom.py"
    name = getattr(getattr(target, "overloadpacket", target), "__name__", str(target)).lower()
    groups = [
        ("norm.py", ("norm",)),
        ("pool.py", ("pool",)),
        ("attention.py", ("attention",)),
        ("linear.py", ("conv", "mm", "linear", "matmul", "einsum", "bilinear")),
        ("shape.py", ("view", "reshape", "permute", "index", "gather", "scatter", "pad",
                      "roll", "flip", "select", "slice", "cat", "stack", "split", "squeeze",
                      "expand", "repeat", "transpose", "unfold", "narrow", "chunk")),
        ("arithmetic.py", ("add", "sub", "mul", "div", "sum", "mean", "prod", "max", "min",
                           "cumsum", "where", "fill")),
    ]
    for file, keys in groups:
        if any(k in name for k in keys):
            return file
    return "activation.py"


def module_of(node: Any) -> tuple[str, str]:
    """(path, class) of the innermost module a node came from; ('', '') if unknown."""
    stack = getattr(node, "meta", {}).get("nn_module_stack") or {}
    entries = [v for v in stack.values() if isinstance(v, tuple) and len(v) == 2]
    if not entries:
        return "", ""
    path, cls = entries[-1]
    return str(path), cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))


def unsupported_message(target: Any, node: Any) -> str:
    shown, expr = _op_names(target)
    path, cls = module_of(node)
    where = f"module '{path}' ({cls})" if path else "the model's top level"
    node_name = getattr(node, "name", "?")
    packet = expr.rsplit(".", 1)[-1]
    return (
        f"no bound rule for operator {shown} (graph node '{node_name}', from {where}). "
        f"Add one in lipcert/bounds/rules/{_rule_file(target)}:\n"
        f"    @lipcert.bounds.rule({expr})\n"
        f"    def {packet}(ctx, x, *args):\n"
        f'        """<the derivation of the bound>"""\n'
        f"        return Bound(...)\n"
        "(see lipcert/bounds/state.py for what a Bound holds)."
    )


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


def map_args(fn: Any, a: Any) -> Any:
    """``tree_map`` for graph-node arguments and rule outputs (nested lists, tuples and
    dicts): the same result, without pytree's per-call cost, which was a sixth of a small
    model's certification time."""
    if isinstance(a, list | tuple):
        return type(a)(map_args(fn, x) for x in a)
    if isinstance(a, dict):
        return {k: map_args(fn, v) for k, v in a.items()}
    return fn(a)


def _leaves(a: Any) -> Iterable[Any]:
    """The leaves of nested lists, tuples and dicts, in order."""
    if isinstance(a, list | tuple):
        for x in a:
            yield from _leaves(x)
    elif isinstance(a, dict):
        for v in a.values():
            yield from _leaves(v)
    else:
        yield a


def apply_op(ctx: Ctx, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None
             ) -> Any:
    """Bounds of ``target(*args, **kwargs)`` where the arguments are Bounds, Consts or
    Python values: constant folding, or the op's rule followed by :func:`finalize`."""
    kwargs = kwargs or {}
    if target is operator.getitem and isinstance(args[0], list | tuple):
        return args[0][args[1]]
    leaves = list(_leaves((args, kwargs)))
    for leaf in leaves:
        if isinstance(leaf, Opaque):
            raise UnsupportedOpError(
                f"{_op_names(target)[0]} uses {leaf.reason}, which has no bounds "
                f"(graph node '{getattr(ctx.node, 'name', '?')}')"
            )
    if not any(isinstance(leaf, Bound) for leaf in leaves):
        return _fold(ctx, target, args, kwargs)
    fn = lookup(target)
    if fn is None:
        raise UnsupportedOpError(unsupported_message(target, ctx.node))
    ctx.notes = {}
    out = fn(ctx, *args, **kwargs)
    if ctx.local:
        _fill_values(ctx, target, args, kwargs, out)
    exact = bool(ctx.notes.get("exact", False))
    return map_args(lambda o: finalize(ctx, o, exact) if isinstance(o, Bound) else o, out)


# --------------------------------------------------------------------------- programs


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




def as_program(model: nn.Module | ExportedProgram, example: Tensor) -> ExportedProgram:
    """``torch.export`` a module (in eval mode, batch dimension dynamic where possible)."""
    if isinstance(model, ExportedProgram):
        return model
    if not isinstance(model, nn.Module):
        raise LipcertError(f"expected an nn.Module or ExportedProgram, got {type(model).__name__}")
    ex = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:]).clone()
    training = model.training
    model.eval()
    try:
        try:
            return torch.export.export(
                model, (ex,), dynamic_shapes=({0: torch.export.Dim.AUTO},)
            )
        except Exception:
            return torch.export.export(model, (ex,))
    finally:
        model.train(training)


_ROWWISE_SCALAR = (torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor)


def _rowwise(node: Any, dim: int, rank: int) -> bool:
    """Maps that commute with selecting index i of dimension ``dim`` (not the last): maps
    acting on each row alone and the same for all rows (linear layers, scalings), and slices
    along an earlier dimension."""
    if node.op != "call_function" or not node.args:
        return False
    if node.target is torch.ops.aten.linear.default:
        return True
    if node.target is torch.ops.aten.slice.Tensor:
        d = node.args[1] if len(node.args) > 1 else 0
        return isinstance(d, int) and 0 <= d < dim  # a negative dim would shift
    return node.target in _ROWWISE_SCALAR and isinstance(node.args[1], int | float)


def push_selections(graph: torch.fx.Graph) -> torch.fx.Graph:
    """Rewrite ``select(f(x), d, i)`` as ``f(select(x, d, i))`` for chains f of row-wise maps
    (linear layers, scalings) and d not the last dimension: the same function, but the
    rows that are thrown away (a GPT's logits at every position but the certified one) are
    never bounded. Works on a copy of the program's graph; nn_module_stack is kept."""
    select = torch.ops.aten.select.int
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not select:
            continue
        src, dim, index = node.args[0], node.args[1], node.args[2]
        val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
        if not isinstance(val, Tensor) or not isinstance(dim, int):
            continue
        rank = val.dim()
        dim = dim % rank
        if dim == rank - 1:
            continue
        chain = []
        cur = src
        while (isinstance(cur, torch.fx.Node) and len(cur.users) == 1
               and _rowwise(cur, dim, rank)):
            chain.append(cur)
            cur = cur.args[0]
        if not any(c.target is torch.ops.aten.linear.default for c in chain):
            continue
        if not isinstance(cur, torch.fx.Node):
            continue
        first = chain[-1]
        with graph.inserting_before(first):
            moved = graph.call_function(select, (cur, dim, index))
        moved.meta = dict(node.meta)
        first.args = (moved, *first.args[1:])
        node.replace_all_uses_with(src)
        graph.erase_node(node)
    graph.lint()
    return graph


def _copy_graph(graph: torch.fx.Graph) -> tuple[torch.fx.Graph, dict[str, str]]:
    """A copy of ``graph`` (metadata kept) and the map from old to new node names (a copy
    may rename nodes whose names shadow Python builtins, such as ``input``)."""
    new = torch.fx.Graph()
    val_map: dict[Any, Any] = {}
    out = new.graph_copy(graph, val_map)
    new.output(out)
    return new, {old.name: nn_.name for old, nn_ in val_map.items()}


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

    def records(self) -> list[dict[str, Any]]:
        """One row per node with bounds: name, op, module, and the largest bounds."""
        rows = []
        for node in (self.graph or self.program.graph).nodes:
            b = self.env.get(node.name)
            if isinstance(b, Bound):
                rows.append({
                    "node": node.name,
                    "op": str(node.target),
                    "module": module_of(node)[0],
                    "lip": float(b.lip.max()),
                    "lip_tok": float(b.lip_tok.max()),
                    "norm": float(b.norm.max()),
                    "tok_norm": float(b.tok_norm.max()),
                })
        return rows


@dataclass
class LayerRow:
    name: str
    kind_of_layer: str
    upper: float
    kind: str = "upper"
    params: int = 0


@dataclass
class Propagator:
    """Bound propagation over one exported program (see the module docstring)."""

    program: ExportedProgram
    method: str = "exact"
    norm_cache: dict[Any, Any] = field(default_factory=dict)
    shape_cache: dict[Any, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("exact", "gram"):
            raise LipcertError(f"unknown norm method {self.method!r}; use 'exact' or 'gram'")
        ep = self.program
        graph, rename = _copy_graph(ep.graph)
        self.graph = push_selections(graph)
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

    def input_bound(
        self, ctx: Ctx, domain: Domain, shape: tuple[int, ...], center: Tensor | None
    ) -> Bound:
        return input_bound(ctx, domain, shape, center)

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
                    env[node.name] = self.input_bound(ctx, dom, shape, center)
                else:
                    env[node.name] = self.consts[node.name]
            elif node.op == "call_function":
                env[node.name] = self._apply(ctx, node, env)
            elif node.op == "output":
                output = tree_map(
                    lambda a: env[a.name] if isinstance(a, torch.fx.Node) else a, node.args[0]
                )
            else:
                raise UnsupportedOpError(f"graph node {node.name} of kind {node.op}")
        if isinstance(output, list | tuple) and len(output) == 1:
            output = output[0]
        return Propagation(output, env, ctx, self.program, self.graph)

    def _apply(self, ctx: Ctx, node: Any, env: dict[str, Any]) -> Any:
        def get(a: Any) -> Any:
            return env[a.name] if isinstance(a, torch.fx.Node) else a

        args = map_args(get, node.args)
        kwargs = map_args(get, dict(node.kwargs))
        ctx.node = node
        try:
            return apply_op(ctx, node.target, args, kwargs)
        finally:
            ctx.node = None

    # ------------------------------------------------------------------ per-layer table

    def layer_table(self, prop: Propagation) -> list[LayerRow]:
        """Each top-level block (depth 1 and 2 below the model) and each module that owns
        weights: the Lipschitz bound of that module alone, propagated with lip = 1 at its
        inputs and the model's own activation bounds (from ``prop``)."""
        members_of: dict[str, list[Any]] = {}  # module path -> its nodes, in graph order
        order: dict[str, str] = {}
        param_owner = {
            t.rsplit(".", 1)[0] if "." in t else "" for t in self.param_names.values()
        }
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            stack = node.meta.get("nn_module_stack") or {}
            entries = [v for v in stack.values() if isinstance(v, tuple) and len(v) == 2]
            for p in dict.fromkeys(p for p, _ in entries):
                members_of.setdefault(p, []).append(node)
            for depth, (path, cls) in enumerate(entries):
                if not path:
                    continue
                cname = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                if (depth in (1, 2) or path in param_owner) and path not in order:
                    order[path] = cname.rsplit(".", 1)[-1]
        sd = self.program.state_dict
        rows = []
        for path, cname in order.items():
            upper = self._group_bound(prop, members_of[path])
            params = sum(
                int(sd[t].numel()) for t in self.param_names.values()
                if t.startswith(path + ".") and t in sd
            )
            rows.append(LayerRow(path, cname, upper, "upper", params))
        return rows

    def _group_bound(self, prop: Propagation, members: list[Any]) -> float:
        with one_thread():
            return self._group_bound_1(prop, members)

    def _group_bound_1(self, prop: Propagation, members: list[Any]) -> float:
        names = {n.name for n in members}
        ctx = self.context(prop.ctx.n, None, ibp=False)
        ctx.lip_only = True
        if len(members) == 1 and members[0].target is torch.ops.aten.linear.default:
            w = members[0].args[1]
            weight = prop.env.get(w.name) if isinstance(w, torch.fx.Node) else None
            if isinstance(weight, Const):
                return ctx.opnorm(weight)
        if _model_pass_is_group_pass(prop, members, names):
            return _external_lip(members, names, prop.env)
        sub: dict[str, Any] = {}
        one = torch.ones(ctx.n, dtype=F64)

        def get(a: Any) -> Any:
            if not isinstance(a, torch.fx.Node):
                return a
            if a.name in sub:
                return sub[a.name]
            v = prop.env[a.name]
            if a.name not in names:
                v = tree_map(
                    lambda b: b.replace(lip=one, lip_tok=one) if isinstance(b, Bound) else b, v
                )
                sub[a.name] = v
            return v

        for node in members:
            args = map_args(get, node.args)
            kwargs = map_args(get, dict(node.kwargs))
            ctx.node = node
            out = apply_op(ctx, node.target, args, kwargs)
            sub[node.name] = _restore(out, prop.env[node.name])
        return _external_lip(members, names, sub)


def _external_lip(members: list[Any], names: set[str], env: dict[str, Any]) -> float:
    """The largest ``lip`` among the group's outputs (members used outside it, or not at
    all), read from ``env``."""
    best = 0.0
    for node in members:
        if any(u.name not in names for u in node.users) or not node.users:
            for b in tree_flatten(env[node.name])[0]:
                if isinstance(b, Bound):
                    best = max(best, float(b.lip.max()))
    return best


def _model_pass_is_group_pass(prop: Propagation, members: list[Any], names: set[str]) -> bool:
    """Whether a group pass would only repeat the model pass: a global model pass (no
    centre values, no radius; the group pass has neither) in which every Bound that enters
    the group from outside has lip = lip_tok = 1 (the model input, typically), and every
    member has lip_tok ≤ lip (so :func:`_restore` changes nothing).

    Then, member by member in graph order, the group pass hands each rule exactly the model
    pass's inputs: the outside ones get lip = lip_tok = 1, which they already have, and the
    inside ones are the stored bounds with the group's Lipschitz bounds, which by induction
    are the stored ones. Rules compute Lipschitz bounds from their inputs alone (``ibp``
    and ``lip_only``, the only other settings that differ, change intervals and norms,
    never ``lip``), so the group's bounds are the model pass's, bit for bit.
    """
    if prop.ctx.local:
        return False
    for node in members:
        for a in node.all_input_nodes:
            if a.name in names:
                continue
            for b in tree_flatten(prop.env[a.name])[0]:
                if isinstance(b, Bound) and not (bool((b.lip == 1).all())
                                                 and bool((b.lip_tok == 1).all())):
                    return False
        for b in tree_flatten(prop.env[node.name])[0]:
            if isinstance(b, Bound) and not bool((b.lip_tok <= b.lip).all()):
                return False
    return True


def _restore(out: Any, stored: Any) -> Any:
    """Keep a group pass's Lipschitz bounds but the model pass's activation bounds."""
    fo, spec = tree_flatten(out)
    fs, _ = tree_flatten(stored)
    if len(fo) != len(fs):
        return out
    merged = [
        s.replace(lip=o.lip, lip_tok=torch.minimum(o.lip_tok, o.lip))
        if isinstance(o, Bound) and isinstance(s, Bound)
        else o
        for o, s in zip(fo, fs, strict=True)
    ]
    return tree_unflatten(merged, spec)


def propagate(
    model: nn.Module | ExportedProgram,
    example: Tensor,
    domain: Any = (0.0, 1.0),
    *,
    center: Tensor | None = None,
    radius: Tensor | float | None = None,
    method: str = "exact",
) -> Propagation:
    """One-shot helper: export if needed, then :meth:`Propagator.run`."""
    prop = Propagator.from_model(model, example, method=method)
    return prop.run(domain, sample_shape=tuple(example.shape[1:]), center=center, radius=radius)
