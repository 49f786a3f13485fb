"""Row norms of the exact Jacobian at the centre input, for the first-order part of the
forward intervals.

For every input-dependent node y and each of its elements, ‖∂y_e/∂x‖₂ at the centre x (the
derivative with respect to the element's own sample; samples never mix), by forward-mode
differentiation in float64: the graph is run once per chunk of input coordinates, each op's
tangents pushed through ``torch.func.jvp`` (vectorised over the chunk with ``torch.vmap``),
and the squares accumulated; a node's tangents are freed after its last use. Attention
nodes also give the norms of their scores and probabilities (``<node>.scores``,
``<node>.probs``), computed from the same decomposition the rules use.

The result is a float64 evaluation; it is raised by the factor 1 + 1e-9 and by 1e-12 of the
node's largest norm, which covers its rounding (relative errors of order 1e-15 per op)
under the same float model as the centre values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.fx.node import map_arg
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

SDPA = torch.ops.aten.scaled_dot_product_attention.default
REL = 1e-9
# Runtime checks of an exported program (dtype and shape asserts): no value, and a float64
# evaluation would fail their dtype checks, so the evaluators here skip them.
RUNTIME_CHECKS = (
    torch.ops.aten._assert_tensor_metadata, torch.ops.aten._assert_scalar,
    torch.ops.aten.sym_constrain_range_for_size, torch.ops.aten._assert_async,
    torch.ops.aten.sym_constrain_range,
)


def is_runtime_check(target: Any) -> bool:
    return getattr(target, "overloadpacket", target) in RUNTIME_CHECKS


def evaluable(target: Any) -> Any:
    """The op to evaluate for ``target`` here: attention written out (the fused CPU kernel
    has no forward-mode derivative), and view as reshape (the written-out attention's
    output strides differ from the fused kernel's, which a later view may rely on)."""
    if target is SDPA:
        return attention_parts_exact
    if target is torch.ops.aten.view.default:
        return torch.ops.aten.reshape.default
    return target


def attention_parts_exact(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                          dropout_p: float = 0.0, is_causal: bool = False, *,
                          scale: float | None = None, enable_gqa: bool = False
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, S, P) of scaled_dot_product_attention written out: S = c·QKᵀ (+ mask),
    P = softmax(S), Y = P V."""
    c = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = c * (q @ k.transpose(-1, -2))
    L, S = q.shape[-2], k.shape[-2]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, -math.inf)
        else:
            s = s + attn_mask.to(s.dtype)
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -math.inf)
    p = torch.softmax(s, dim=-1)
    return p @ v, s, p


def as_f64(tree: Any) -> Any:
    """Every floating tensor in ``tree`` as float64: constants the program creates itself
    (an empty cache, a float32 buffer) meet float64 values in ops such as cat."""
    return tree_map(lambda t: t.to(torch.float64) if isinstance(t, Tensor)
                    and t.is_floating_point() and t.dtype != torch.float64 else t, tree)


def node_values(graph: torch.fx.Graph, consts: dict[str, Any], input_name: str, x: Tensor,
                parts: list[Tensor] | None = None) -> dict[str, Any]:
    """Every node's value at ``x`` in float64 (an attention node: its output; runtime checks:
    None), differentiable if ``x`` requires grad; ``parts`` collects every tensor each op
    returns, attention's scores and probabilities included (to size the chunks)."""
    vals: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            vals[node.name] = x if node.name == input_name else consts[node.name]
        elif node.op == "call_function" and is_runtime_check(node.target):
            vals[node.name] = None
        elif node.op == "call_function":
            args, kwargs = as_f64((map_arg(node.args, lambda a: vals[a.name]),
                                   map_arg(dict(node.kwargs), lambda a: vals[a.name])))
            res = evaluable(node.target)(*args, **kwargs)
            vals[node.name] = res[0] if node.target is SDPA else res
            if parts is not None:
                parts += [t for t in tree_flatten(res)[0] if isinstance(t, Tensor)]
    return vals


def _last_uses(graph: torch.fx.Graph) -> dict[str, int]:
    last: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for a in node.all_input_nodes:
            last[a.name] = i
    return last


def centre_jacobian_norms(graph: torch.fx.Graph, consts: dict[str, Any], input_name: str,
                          x: Tensor, budget: int = 2**23) -> dict[str, Tensor]:
    """``{node name: ‖∂y_e/∂x‖₂ per element}`` at the centre ``x`` (float64) for every node
    that depends on the input (module docstring). ``budget``: the most elements of one
    node's tangents at a time (sets the chunk of input coordinates per pass)."""
    x = x.detach().to(torch.float64)
    n = x.shape[0]
    per = x[0].numel()
    parts: list[Tensor] = []
    with torch.no_grad():
        node_values(graph, consts, input_name, x, parts)
    biggest = max((t.numel() for t in parts), default=1)
    chunk = max(1, min(per, budget // max(biggest, 1)))
    sq: dict[str, Tensor] = {}
    last = _last_uses(graph)
    nodes = list(graph.nodes)
    with torch.no_grad():
        for start in range(0, per, chunk):
            idx = torch.arange(start, min(per, start + chunk))
            t = torch.zeros(len(idx), n, per, dtype=torch.float64)
            t[torch.arange(len(idx)), :, idx] = 1.0
            _run(nodes, consts, input_name, x, t.reshape(len(idx), *x.shape), last, sq)
    out = {}
    for name, s in sq.items():
        norm = s.sqrt()
        top = float(norm.max()) if norm.numel() else 0.0
        out[name] = norm * (1 + REL) + 1e-12 * top + 1e-300
    return out


def _run(nodes: list[torch.fx.Node], consts: dict[str, Any], input_name: str, x: Tensor,
         t_in: Tensor, last: dict[str, int], sq: dict[str, Tensor]) -> None:
    vals: dict[str, Any] = {}
    tans: dict[str, Any] = {}

    def record(name: str, tangent: Tensor) -> None:
        s = tangent.square().sum(0)
        sq[name] = s if name not in sq else sq[name] + s

    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            vals[node.name] = x if node.name == input_name else consts[node.name]
            if node.name == input_name:
                tans[node.name] = t_in
                record(node.name, t_in)
        elif node.op == "call_function":
            _apply(node, vals, tans, record)
        for a in node.all_input_nodes:
            if last.get(a.name) == i:
                tans.pop(a.name, None)


def _apply(node: torch.fx.Node, vals: dict[str, Any], tans: dict[str, Any],
           record: Callable[[str, Tensor], None]) -> None:
    if is_runtime_check(node.target):
        vals[node.name] = None
        return
    args, kwargs = as_f64((map_arg(node.args, lambda a: vals[a.name]),
                           map_arg(dict(node.kwargs), lambda a: vals[a.name])))
    if node.target is operator.getitem and isinstance(args[0], list | tuple):
        vals[node.name] = args[0][args[1]]
        parent = tans.get(node.args[0].name)
        if parent is not None and parent[args[1]] is not None:
            tans[node.name] = parent[args[1]]
            record(node.name, tans[node.name])
        return
    flat_nodes, spec = tree_flatten((tuple(node.args), dict(node.kwargs)))
    flat_vals = tree_flatten((args, kwargs))[0]
    live = [i for i, a in enumerate(flat_nodes)
            if isinstance(a, torch.fx.Node) and tans.get(a.name) is not None]
    target = evaluable(node.target)
    plain = target(*args, **kwargs)
    floating = [t for t in tree_flatten(plain)[0] if isinstance(t, Tensor)]
    if not live or not floating or not all(t.is_floating_point() for t in floating):
        vals[node.name] = plain[0] if node.target is SDPA else plain
        return

    def f(*ts: Tensor) -> Any:
        new = list(flat_vals)
        for i, t in zip(live, ts, strict=True):
            new[i] = t
        a, k = tree_unflatten(new, spec)
        return target(*a, **k)

    primals = tuple(flat_vals[i] for i in live)
    tangents = tuple(tans[flat_nodes[i].name] for i in live)
    out, tan = torch.vmap(lambda *ts: torch.func.jvp(f, primals, ts), out_dims=(None, 0))(
        *tangents)
    if node.target is SDPA:
        vals[node.name] = out[0]
        tans[node.name] = tan[0]
        record(node.name, tan[0])
        record(f"{node.name}.scores", tan[1])
        record(f"{node.name}.probs", tan[2])
        return
    vals[node.name] = out
    if isinstance(out, Tensor):
        if out.is_floating_point():
            tans[node.name] = tan
            record(node.name, tan)
    elif isinstance(out, list | tuple):
        tans[node.name] = list(tan)
        for j, tj in enumerate(tan):
            if isinstance(tj, Tensor):
                record(f"{node.name}[{j}]", tj)


def row_gains(graph: torch.fx.Graph, vals: dict[str, Any], source: str, targets: set[str],
              budget: int = 2**23) -> dict[str, Tensor]:
    """``{target: G}`` with G[t, s, ...] = ‖∂y_e/∂(row t of the source)‖₂ at the centre, for
    every element e of sample s of each target node y after ``source`` (a row: the last
    dimension; the source's dim 0 is the batch and samples never mix). Forward mode from the
    source, one pass per chunk of its per-sample coordinates (``vals``: centre values from
    :func:`node_values`); rounded up like :func:`centre_jacobian_norms`."""
    out = vals[source]
    n, width = out.shape[0], out.shape[-1]
    per = out[0].numel()
    nodes = list(graph.nodes)
    start_at = next(i for i, nd in enumerate(nodes) if nd.name == source) + 1
    stop_at = max((i for i, nd in enumerate(nodes) if nd.name in targets), default=-1) + 1
    nodes = nodes[:stop_at]  # nothing after the last target is needed
    later = [nd for nd in nodes[start_at:] if nd.op == "call_function"]
    sizes = [t.numel() for nd in later for t in tree_flatten(vals[nd.name])[0]
             if isinstance(t, Tensor)]
    chunk = max(1, min(per, budget // max(max(sizes, default=1), 1)))
    sq: dict[str, Tensor] = {}
    rows: Tensor = torch.zeros(0, dtype=torch.long)

    def record(name: str, tangent: Tensor) -> None:
        if name in targets:
            if name not in sq:
                sq[name] = torch.zeros(per // width, *tangent.shape[1:], dtype=torch.float64)
            sq[name].index_add_(0, rows, tangent.square())

    last = _last_uses(graph)
    with torch.no_grad():
        for first in range(0, per, chunk):
            idx = torch.arange(first, min(per, first + chunk))
            rows = idx // width
            t = torch.zeros(len(idx), n, per, dtype=torch.float64)
            t[torch.arange(len(idx)), :, idx] = 1.0
            tans: dict[str, Any] = {source: t.reshape(len(idx), *out.shape)}
            local = dict(vals)
            for i, node in enumerate(nodes[start_at:], start=start_at):
                if node.op == "call_function" and any(
                        tans.get(a.name) is not None for a in node.all_input_nodes):
                    _apply(node, local, tans, record)
                for a in node.all_input_nodes:
                    if last.get(a.name) == i:
                        tans.pop(a.name, None)
    result = {}
    for name, s in sq.items():
        norm = s.sqrt()
        top = float(norm.max()) if norm.numel() else 0.0
        result[name] = norm * (1 + REL) + 1e-12 * top + 1e-300
    return result
