"""The per-layer table: the Lipschitz bound of each module alone.

A module's group is the graph nodes that came from it (``nn_module_stack``). Its bound is
propagated through the group only, with lip = lip_tok = 1 on every Bound that enters the
group from outside and the model pass's own activation bounds (intervals and norms, valid on
the model pass's input set), so the rules' Lipschitz bounds hold for the module on the set of
inputs it actually receives. The group's bound is the largest ``lip`` among its outputs
(members used outside the group, or not at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.node import map_arg
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from lipcert.bounds.propagate import Propagation, Propagator, apply_op, node_errors
from lipcert.bounds.state import F64, Bound, Const
from lipcert.threads import one_thread


@dataclass
class LayerBound:
    """One row of the per-layer table: the Lipschitz bound (``kind`` "upper": certified) of
    the module at ``name`` (class ``kind_of_layer``, ``params`` parameters) alone."""

    name: str
    kind_of_layer: str
    upper: float
    kind: str = "upper"
    params: int = 0


def layer_table(propagator: Propagator, prop: Propagation) -> list[LayerBound]:
    """Each top-level block (depth 1 and 2 below the model) and each module that owns
    weights, in graph order, with the bound of that module alone (module docstring), from
    the model pass ``prop`` of ``propagator``."""
    members_of: dict[str, list[Any]] = {}  # module path -> its nodes, in graph order
    order: dict[str, str] = {}
    param_names = propagator.param_names
    param_owner = {t.rsplit(".", 1)[0] if "." in t else "" for t in param_names.values()}
    for node in propagator.graph.nodes:
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
    sd = propagator.program.state_dict
    rows = []
    for path, cname in order.items():
        with one_thread():
            upper = group_bound(propagator, prop, members_of[path])
        params = sum(
            int(sd[t].numel()) for t in param_names.values()
            if t.startswith(path + ".") and t in sd
        )
        rows.append(LayerBound(path, cname, upper, "upper", params))
    return rows


def group_bound(propagator: Propagator, prop: Propagation, members: list[Any]) -> float:
    """The Lipschitz bound of the group of graph nodes ``members`` (module docstring)."""
    names = {n.name for n in members}
    ctx = propagator.context(prop.ctx.n, None, ibp=False)
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

    def get(a: torch.fx.Node) -> Any:
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
        args = map_arg(node.args, get)
        kwargs = map_arg(dict(node.kwargs), get)
        ctx.node = node
        with node_errors(node):
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
