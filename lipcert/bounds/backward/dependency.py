"""Which units of a source node each later element can depend on, and a colouring of the
units that lets one forward-mode tangent carry several of them (derivation:
docs/local-margin.md, "Cost").

A *unit* is a block of consecutive per-sample coordinates of the source (a row of its last
dimension, or one coordinate). ``dep[u, 0, ...]`` (bool, one sample's layout) is set
wherever the element may depend on unit u: it over-approximates the structural sparsity of
the Jacobian ∂node/∂source of one sample, op by op:

* ops that only move or copy elements (reshape, permute, slice, cat, …) are applied to the
  dependency tensors themselves, so each element keeps exactly its source element's units;
* sums and means (non-negative linear maps) are applied to them as 0/1 numbers: an output
  element depends on a unit if any summand does;
* pointwise ops (``torch.Tag.pointwise``): the union over the broadcast inputs;
* ``linear``, a matrix product with one input-dependent factor, ``layer_norm``,
  ``softmax`` and lipcert's row-wise ops (``token_ball``, ``group_sort2``): the union over
  the contracted or normalised dimensions;
* every other op: every output element depends on every unit any input element depends on.

Samples never mix (as everywhere in the Jacobian code), so one sample's layout stands for
all; the dependency is found on a batch of one sample, or, for a program exported with a
fixed batch size, on a whole batch with only the first sample's units seeded, and that
sample's slice is kept.

Colouring: units that share a dependent element at some node conflict; units of one
colour can share a tangent at every node where no element depends on two of them
(:func:`conflict_free`), since a tangent is a linear combination of the units' columns
and each element then receives at most one of them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

import lipcert.models.ops  # noqa: F401  (registers the torch.ops.lipcert operators)
from lipcert.bounds.backward.evaluation import evaluable, is_runtime_check
from lipcert.bounds.rules.shape import of_arguments

aten = torch.ops.aten
MAX_ELEMENTS = 2**26  # the largest dependency tensor (units × elements of one sample)

MOVES = {
    aten.reshape, aten.view, aten._unsafe_view, aten.permute, aten.transpose, aten.t,
    aten.expand, aten.slice, aten.select, aten.squeeze, aten.unsqueeze, aten.flatten,
    aten.unflatten, aten.clone, aten.contiguous, aten.alias, aten.split,
    aten.split_with_sizes, aten.unbind, aten.chunk, aten.narrow, aten.cat, aten.stack,
    aten.movedim,
}
SUMS = {aten.sum, aten.mean}
PRODUCTS = {aten.mm, aten.bmm, aten.matmul}
SOFTMAX = {aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax}
ROWWISE = {torch.ops.lipcert.token_ball, torch.ops.lipcert.group_sort2}  # each last-dim row

Dep = Any  # Tensor (units, 1, ...) bool, a list of them, or None (every element: all units)


def packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", target)


def is_pointwise(target: Any) -> bool:
    return torch.Tag.pointwise in getattr(target, "tags", ())


def source_dependency(units: int, shape: torch.Size) -> Tensor:
    """The source itself: each element of the first sample depends on its own unit
    (per-sample coordinates in order, ``units`` equal blocks); (units, *shape)."""
    per = shape[1:].numel()
    unit_of = torch.arange(per) // (per // units)
    own = (unit_of[None, :] == torch.arange(units)[:, None]).reshape(units, 1, *shape[1:])
    return torch.cat([own, own.new_zeros(units, shape[0] - 1, *shape[1:])], 1)


def dependencies(nodes: list[torch.fx.Node], vals1: dict[str, Any], source: str,
                 units: int, sample_major: Callable[[str], bool] | None = None
                 ) -> dict[str, Dep]:
    """``{node: dep}`` for the source and every later node that depends on it, from
    ``vals1`` (every node's value on a batch of one sample, or on a whole batch: then the
    first sample's dependencies, (units, 1, ...), at the nodes whose dim 0 is the sample
    (``sample_major``), and None, every unit, at the others)."""
    src = vals1[source]
    deps: dict[str, Dep] = {source: source_dependency(units, src.shape)
                            if units * src.numel() <= MAX_ELEMENTS else None}
    for node in nodes:
        if node.op != "call_function" or is_runtime_check(node.target):
            continue
        if not any(a.name in deps for a in node.all_input_nodes):
            continue
        if not any(isinstance(t, Tensor) for t in tree_flatten(vals1[node.name])[0]):
            continue  # a size: it does not depend on the values
        deps[node.name] = _node_dependency(node, deps, vals1, units)
    if src.shape[0] == 1:
        return deps
    major = sample_major or (lambda name: False)
    return {name: tree_map(lambda t: t[:, :1] if isinstance(t, Tensor) else t, dep)
            if major(name) else None for name, dep in deps.items()}


def _node_dependency(node: torch.fx.Node, deps: dict[str, Dep], vals1: dict[str, Any],
                     units: int) -> Dep:
    if node.target is operator.getitem:
        parent = deps[node.args[0].name]
        return None if parent is None else parent[node.args[1]]
    inputs = [deps[a.name] for a in node.all_input_nodes if a.name in deps]
    if any(d is None or isinstance(d, list | tuple) for d in inputs):
        return None
    out = vals1[node.name]
    big = sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, Tensor))
    if units * big > MAX_ELEMENTS:
        return None
    op = packet(node.target)
    rule = None
    if op in MOVES or op in SUMS:
        rule = _linear_map(node, deps, vals1, as_numbers=op in SUMS)
    elif isinstance(out, Tensor) and is_pointwise(node.target):
        rule = _pointwise(node, deps, out, units)
    elif isinstance(out, Tensor):
        rule = _contraction(node, deps, vals1, out)
    if rule is not None:
        return rule
    union = torch.stack([d.flatten(1).any(1) for d in inputs]).any(0)
    return tree_map(lambda t: union.reshape(units, *([1] * t.dim())).expand(units, *t.shape)
                    if isinstance(t, Tensor) else None, out)


def _linear_map(node: torch.fx.Node, deps: dict[str, Dep], vals1: dict[str, Any],
                as_numbers: bool) -> Dep:
    """A move (or a sum) applied to the dependency tensors, constants as zeros."""
    flat, spec = tree_flatten((tuple(node.args), dict(node.kwargs)))
    live = [i for i, a in enumerate(flat) if isinstance(a, torch.fx.Node) and a.name in deps]
    kind = torch.float64 if as_numbers else torch.bool
    values = [vals1[a.name] if isinstance(a, torch.fx.Node) else a for a in flat]
    values = [torch.zeros(v.shape, dtype=kind) if isinstance(v, Tensor) and i not in live
              else v for i, v in enumerate(values)]
    f = of_arguments(evaluable(node.target), values, spec, live)
    out = torch.vmap(f)(*(deps[flat[i].name].to(kind) for i in live))
    if as_numbers:
        out = tree_map(lambda t: t > 0 if isinstance(t, Tensor) else t, out)
    return list(out) if isinstance(out, tuple) else out


def _pointwise(node: torch.fx.Node, deps: dict[str, Dep], out: Tensor, units: int) -> Dep:
    result = torch.zeros(units, *out.shape, dtype=torch.bool)
    for a in node.all_input_nodes:
        d = deps.get(a.name)
        if d is None:
            continue
        if d.dim() - 1 > out.dim():
            return None
        d = d.reshape(units, *([1] * (out.dim() + 1 - d.dim())), *d.shape[1:])
        result = result | d
    return result


def _contraction(node: torch.fx.Node, deps: dict[str, Dep], vals1: dict[str, Any],
                 out: Tensor) -> Dep:
    """linear / matmul with one dependent factor, layer_norm, softmax: the union over the
    contracted (normalised) dimensions; None where the op is none of these."""
    op = packet(node.target)
    args = node.args
    dep_args = [i for i, a in enumerate(args) if isinstance(a, torch.fx.Node) and a.name in deps]
    units = deps[args[dep_args[0]].name].shape[0] if dep_args else 0
    if op is aten.linear and dep_args == [0]:
        d = deps[args[0].name]
        dims = [-1]
    elif op in PRODUCTS and len(dep_args) == 1 and all(
            isinstance(vals1[a.name], Tensor) and vals1[a.name].dim() >= 2 for a in args[:2]):
        d = deps[args[dep_args[0]].name]
        dims = [-1] if dep_args == [0] else [-2]
    elif op is aten.layer_norm and dep_args == [0]:
        d = deps[args[0].name]
        dims = list(range(-len(args[1]), 0))
    elif op in ROWWISE and dep_args == [0]:
        d = deps[args[0].name]
        dims = [-1]
    elif op in SOFTMAX and dep_args == [0]:
        d = deps[args[0].name]
        dims = [int(args[1])]
    else:
        return None
    if d.dim() - 1 != out.dim():
        return None
    dims = [k % out.dim() + 1 for k in dims]
    return d.any(dim=dims, keepdim=True).expand(units, *out.shape)


def _flat(dep: Dep) -> list[Tensor]:
    return [d for d in (dep if isinstance(dep, list | tuple) else [dep]) if d is not None]


def colouring(deps: dict[str, Dep], units: int, share: float = 0.25) -> Tensor:
    """A colour per unit (0 … colours − 1), greedy over the conflicts of the nodes where no
    element depends on more than ``share`` of the units (beyond that a node mixes too many
    units to share tangents at all, and taking it into account would only split the
    colours of the others)."""
    adjacent = torch.zeros(units, units, dtype=torch.bool)
    limit = max(1, int(share * units))
    for dep in deps.values():
        if dep is None:
            continue
        for d in _flat(dep):
            cols = d.reshape(units, -1)
            count = cols.sum(0)
            if not count.numel() or int(count.max()) > limit:  # empty: batch norm's stats
                continue
            shared = cols[:, count > 1]
            if shared.shape[1]:
                patterns = torch.unique(shared.T, dim=0).double()
                adjacent |= (patterns.T @ patterns) > 0
    colour = torch.full((units,), -1, dtype=torch.long)
    for u in range(units):
        taken = colour[adjacent[u]]
        free = torch.ones(units + 1, dtype=torch.bool)
        free[taken[taken >= 0]] = False
        colour[u] = int(free.nonzero()[0])
    return colour


def conflict_free(dep: Dep, colour: Tensor, colours: int) -> bool:
    """Whether no element depends on two units of one colour (None: unknown, so no)."""
    if dep is None:
        return False
    for d in _flat(dep) if isinstance(dep, list | tuple) else [dep]:
        cols = d.reshape(d.shape[0], -1).double()
        per_colour = torch.zeros(colours, cols.shape[1], dtype=torch.float64)
        per_colour.index_add_(0, colour, cols)
        if bool((per_colour > 1).any()):
            return False
    return True
