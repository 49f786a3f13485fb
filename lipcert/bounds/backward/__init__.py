"""Local certificates from interval enclosures of the margins' gradients
(derivations: docs/local-margin.md).

Layout:

* ``interval.py``  centre–radius enclosures (:class:`Grad`), forward intervals (:class:`Box`)
                   and their products with rounding slack;
* ``registry.py``  the rule tables and the ``@backward_rule`` / ``@forward_rule`` decorators;
* ``rules/``       per op, a forward-interval rule and a backward rule, grouped like the
                   engine's rules (linear, pointwise, arithmetic, norm, attention, shape,
                   custom) and for pooling, order statistics (sort, max) and batch norm;
* ``evaluation.py`` float64 evaluation of the graph at the centre (every node's value);
* ``tangents.py``  one op's forward-mode derivative applied to a stack of tangents;
* ``dependency.py`` which source rows each element can depend on, and the colouring that
                   lets one tangent carry several of them;
* ``jacobian.py``  row norms of the exact Jacobian at the centre (forward-mode AD, with
                   compressed passes), and the gains of every op's output rows at later
                   nodes;
* ``forward.py``   forward intervals (Taylor models) of every node over the ball ∩ domain;
* ``symbolic.py``  symbolic remainders: the ops' own second-order terms weighted by exact
                   centre sensitivities instead of wrapped op by op;
* ``walk.py``      the reverse walk over the exported graph;
* ``margins.py``   margin bounds and certified radii (:func:`margin_radii`);
* ``search.py``    the search for the largest certified radius of the bisection grid.

Adding an op: one ``@forward_rule`` (the op's interval and Taylor remainder given its
inputs' :class:`Box`, and the op's own remainder unless it is affine) and one
``@backward_rule`` (the gradient enclosures of its inputs given its output's), each with its
derivation, and a case in ``tests/test_backward_rules.py``.
"""

from lipcert.bounds.backward.forward import Intervals, check_rules
from lipcert.bounds.backward.interval import Box, Grad
from lipcert.bounds.backward.margins import (
    MarginBounds,
    MarginCertifier,
    MarginRadii,
    margin_radii,
)
from lipcert.bounds.backward.registry import (
    BACKWARD_RULES,
    FORWARD_RULES,
    backward_rule,
    forward_rule,
    lookup_backward,
    lookup_forward,
)

__all__ = [
    "BACKWARD_RULES",
    "FORWARD_RULES",
    "Box",
    "Grad",
    "Intervals",
    "MarginBounds",
    "MarginCertifier",
    "MarginRadii",
    "backward_rule",
    "check_rules",
    "forward_rule",
    "lookup_backward",
    "lookup_forward",
    "margin_radii",
]
