"""The rule table: one function per operator, registered with ``@rule(torch.ops.aten.<op>)``.

A rule is called as ``fn(ctx, *args, **kwargs)`` with the node's own arguments, where every
tensor argument that depends on the model input is a :class:`~lipcert.bounds.state.Bound`,
every input-independent tensor is a :class:`~lipcert.bounds.state.Const` and everything else
(ints, floats, lists of ints, dtypes) is passed as in the graph. It returns a ``Bound`` (or a
tuple of them for operators with several outputs). Nodes with no ``Bound`` argument never
reach a rule: they are evaluated exactly ("constant folding").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RuleFn = Callable[..., Any]
RULES: dict[Any, RuleFn] = {}


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
