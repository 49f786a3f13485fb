"""The reverse walk: enclosures of the margins' gradient, from the logits back to the input.

Given the forward intervals of every node over the input set (``env``: a
:class:`~lipcert.bounds.backward.interval.Box` per input-dependent node, float64 tensors for
constants, plain values for the rest), the walk visits the graph's nodes in reverse order.
A node whose output gradient is known hands it to its backward rule, which returns the
enclosures of the gradients with respect to its arguments; a node used by several others
gets the sum of their contributions (the chain rule, each term enclosed, so the sum is).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx.node import map_arg
from torch.utils._pytree import tree_flatten

import lipcert.bounds.backward.rules  # noqa: F401  (registers the rules)
from lipcert.bounds.backward.interval import Box, Grad
from lipcert.bounds.backward.registry import BackCtx, lookup_backward
from lipcert.errors import LipcertError


def _active(x: Any) -> bool:
    return any(isinstance(leaf, Box) for leaf in tree_flatten(x)[0])


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, list):
        return [_add(x, y) for x, y in zip(a, b, strict=True)]
    return a + b


def walk(graph: torch.fx.Graph, env: dict[str, Any], seeds: dict[str, Grad],
         stop: str, record: dict[str, Any] | None = None) -> Grad | None:
    """Enclosure of the gradient at node ``stop`` (the model input, or any node: the walk
    ends there), starting from ``seeds`` (gradient enclosures at output nodes); ``None`` if
    the outputs do not depend on it. ``record``: filled with every visited node's
    enclosure."""
    grads: dict[str, Any] = dict(seeds)
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function":
            continue
        g = grads.pop(node.name, None)
        if g is None:
            continue
        if record is not None:
            record[node.name] = g
        if node.name == stop:
            return g
        if node.target is operator.getitem:
            parent, index = node.args[0], node.args[1]
            width = len(env[parent.name])
            slot: list[Any] = [None] * width
            slot[index] = g
            grads[parent.name] = _add(grads.get(parent.name), slot)
            continue
        fn = lookup_backward(node.target)
        if fn is None:
            raise LipcertError(f"no backward rule for {node.target} (node '{node.name}')")
        args = map_arg(node.args, lambda a: env[a.name])
        kwargs = map_arg(dict(node.kwargs), lambda a: env[a.name])
        if _active(kwargs):
            raise LipcertError(f"{node.target}: an input-dependent keyword argument")
        res = fn(BackCtx(node=node, out=env[node.name]), g, *args, **kwargs)
        for a, ga in zip(node.args, res, strict=False):
            _accumulate(grads, a, ga, env)
    return grads.get(stop)


def _accumulate(grads: dict[str, Any], a: Any, ga: Any, env: dict[str, Any]) -> None:
    if ga is None:
        return
    if isinstance(a, torch.fx.Node):
        if isinstance(env[a.name], Box | list | tuple):
            grads[a.name] = _add(grads.get(a.name), ga)
        return
    if isinstance(a, list | tuple):
        for x, gx in zip(a, ga, strict=True):
            _accumulate(grads, x, gx, env)
