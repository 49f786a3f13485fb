"""The rule tables: per operator, a backward rule (``@backward_rule(torch.ops.aten.<op>)``)
and a forward-interval rule (``@forward_rule(...)``).

A rule is called as ``fn(ctx, g, *args, **kwargs)`` with ``g`` the enclosure
(:class:`~lipcert.bounds.backward.interval.Grad`) of the margins' gradient with respect to
the node's output (a list of them, ``None`` where unused, for an operator with several
outputs), and the node's own arguments, where every tensor that depends on the model input
is a :class:`~lipcert.bounds.backward.interval.Box` (its forward intervals over the input
set), every other tensor is a float64 constant and everything else is passed as in the
graph. It returns the enclosures of the gradients with respect to its positional arguments,
one entry per argument (``None`` for constants; a list for a list of tensors).

A forward rule is called as ``fn(ctx, *args, **kwargs)`` with the same arguments and returns
the node's :class:`~lipcert.bounds.backward.interval.Box` (its value at the centre input and
an enclosure over the input set), or a tuple of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lipcert.bounds.backward.interval import Box

BackwardFn = Callable[..., tuple[Any, ...]]
ForwardFn = Callable[..., Any]
BACKWARD_RULES: dict[Any, BackwardFn] = {}
FORWARD_RULES: dict[Any, ForwardFn] = {}


def backward_rule(*ops: Any) -> Callable[[BackwardFn], BackwardFn]:
    """Register the decorated function as the backward rule of each of ``ops`` (overload
    packets or single overloads; an overload's own entry wins over its packet's)."""

    def register(fn: BackwardFn) -> BackwardFn:
        for op in ops:
            BACKWARD_RULES[op] = fn
        return fn

    return register


def forward_rule(*ops: Any) -> Callable[[ForwardFn], ForwardFn]:
    """Register the decorated function as the forward-interval rule of each of ``ops``."""

    def register(fn: ForwardFn) -> ForwardFn:
        for op in ops:
            FORWARD_RULES[op] = fn
        return fn

    return register


def _lookup(table: dict[Any, Any], target: Any) -> Any:
    fn = table.get(target)
    if fn is None and hasattr(target, "overloadpacket"):
        fn = table.get(target.overloadpacket)
    return fn


def lookup_backward(target: Any) -> BackwardFn | None:
    """The backward rule of a graph node's target, or ``None``."""
    return _lookup(BACKWARD_RULES, target)


def lookup_forward(target: Any) -> ForwardFn | None:
    """The forward-interval rule of a graph node's target, or ``None``."""
    return _lookup(FORWARD_RULES, target)


@dataclass
class BackCtx:
    """What a backward rule may read besides its arguments: the graph node and the forward
    intervals of its output (``out``)."""

    node: Any = None
    out: Box | Any = None

    @property
    def target(self) -> Any:
        return getattr(self.node, "target", None)


@dataclass
class FwdCtx:
    """What a forward rule may read besides its arguments: the node, the number of samples
    (dim 0 of the model input), a cache of weight-derived tensors (|W|, row norms, spectral
    norms) keyed by the weight tensor, and the first-order parts of the Taylor models of
    internal quantities (attention scores and probabilities) by name, and the symbolic
    remainders' narrowing of an internal quantity's remainder (attention scores and
    probabilities), and for attention the radii, its score rows' Gram matrices and the
    input units its queries', keys' and values' rows read and their Gram matrices."""

    node: Any = None
    n: int = 1
    cache: dict[Any, Any] = field(default_factory=dict)
    first_order: dict[str, Any] | None = None  # node name → r·‖A_row‖ (forward walk)
    # (name, Box) → the Box with a narrower remainder (symbolic remainders), or None
    tighten: Callable[[str, Box], Box] | None = None
    radius: Tensor | None = None  # (n,) the input set's ℓ2 radius per sample (forward walk)
    # ``<attention>.scores`` → Gram matrices of its score rows' Jacobians at the centre,
    # (n, …, L, S, S) with dim 0 the sample (``jacobian.py``)
    grams: dict[str, Tensor] = field(default_factory=dict)
    # node name → (input units, …, T) bool: the units row t's centre Jacobian may read, where
    # the node's Box has ``lin_rows`` (``jacobian.py``, ``row_units``)
    units: dict[str, Tensor] = field(default_factory=dict)
    # node name → (n, …, T, w, w) Gram matrices A_rowA_rowᵀ of its rows' centre Jacobians,
    # where ``units`` has the node
    row_grams: dict[str, Tensor] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)  # centre-only values, per batch

    @property
    def target(self) -> Any:
        return getattr(self.node, "target", None)

    def cached(self, w: Any, what: str, make: Callable[[], Any]) -> Any:
        key = (id(w), what)
        if key not in self.cache:
            self.cache[key] = (w, make())
        return self.cache[key][1]
