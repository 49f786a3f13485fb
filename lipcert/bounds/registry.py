"""The rule table: one function per operator, registered with ``@rule(torch.ops.aten.<op>)``.

A rule is called as ``fn(ctx, *args, **kwargs)`` with the node's own arguments, where every
tensor argument that depends on the model input is a :class:`~lipcert.bounds.state.Bound`,
every input-independent tensor is a :class:`~lipcert.bounds.state.Const` and everything else
(ints, floats, lists of ints, dtypes) is passed as in the graph. Nodes with no ``Bound``
argument never reach a rule: they are evaluated exactly ("constant folding").

A rule returns a ``Bound``, or a tuple or list of them (and of other values) for operators
with several outputs. After the rule, ``finalize`` (``propagate.py``) tightens every output
``Bound`` with the relations that hold for all nodes, including interval work on its
elements. A rule whose outputs only move or copy elements of its inputs (reshapes, copies,
eval-mode dropout) returns them wrapped as ``Exact(out)``: their intervals are exact images
of intervals that were already finalised, so that interval work is skipped. A rule whose
result does not depend on the input's values (``zeros_like`` and other shape-only
operators) returns a ``Const`` and is annotated ``-> Const``: the scan for nodes without a
rule (``normalize.py``) reads the annotation to know that the nodes after it are evaluated
exactly and need no rule.

Some functions are certified more tightly as a pattern of several nodes than node by node
(deel-torchlip's GroupSort2 exports as the min and the max of the same pairs, concatenated:
a permutation, 1-Lipschitz, where two separate rules give √2). A module that recognises such
a pattern registers a graph rewrite with ``@graph_rewrite``: a function that rewrites the
propagator's copy of the graph in place into nodes whose rules certify the pattern, and
returns how many rewrites it made. Every program's graph goes through all of them once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RuleFn = Callable[..., Any]
RULES: dict[Any, RuleFn] = {}
GraphRewrite = Callable[[Any], int]
GRAPH_REWRITES: list[GraphRewrite] = []


@dataclass(frozen=True)
class Exact:
    """A rule's outputs (``out``: a Bound or a tuple/list of values) that only move or copy
    already finalised elements, so their intervals need no finalisation (module docstring)."""

    out: Any


def rule(*ops: Any) -> Callable[[RuleFn], RuleFn]:
    """Register the decorated function as the bound rule of each of ``ops``.

    An op is an overload packet (``torch.ops.aten.linear``: every overload) or one overload
    (``torch.ops.aten.div.Tensor``), or a Python callable that appears as a graph target
    (``operator.getitem``). An overload's own entry wins over its packet's.
    """

    def register(fn: RuleFn) -> RuleFn:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def lookup(target: Any) -> RuleFn | None:
    """The rule for a graph node's target, or ``None``."""
    fn = RULES.get(target)
    if fn is None and hasattr(target, "overloadpacket"):
        fn = RULES.get(target.overloadpacket)
    return fn


def graph_rewrite(fn: GraphRewrite) -> GraphRewrite:
    """Register ``fn(graph) -> number of rewrites`` as a pattern rewrite (module docstring)."""
    GRAPH_REWRITES.append(fn)
    return fn
