"""Sound bound propagation over ``torch.export`` graphs.

Layout (a newcomer should find one op's rule within a minute):

* ``state.py``      what a node carries (:class:`Bound`, :class:`Const`), input domains, and
                    per-sample bookkeeping;
* ``registry.py``   the rule table and the ``@rule`` decorator;
* ``rules/``        one small function per ATen op, grouped: ``linear``, ``activation``,
                    ``norm``, ``attention``, ``shape``, ``arithmetic``, ``pool``, ``custom``;
* ``propagate.py``  walks the graph (:class:`Propagator`), constant-folds what does not depend
                    on the input, builds the per-layer table.

Adding a rule::

    import torch
    from lipcert.bounds import Bound, rule

    @rule(torch.ops.aten.softplus)
    def softplus(ctx, x, beta=1, threshold=20):
        \"\"\"softplus: increasing, slope σ(βx) ≤ 1, |softplus(x)| ... \"\"\"
        ...
"""

from lipcert.bounds.errors import BatchMixingError, UnsupportedOpError
from lipcert.bounds.propagate import (
    LayerRow,
    Propagation,
    Propagator,
    apply_op,
    as_program,
    finalize,
    input_bound,
    propagate,
)
from lipcert.bounds.registry import RULES, lookup, rule
from lipcert.bounds.state import Bound, BoxDomain, Const, Ctx, EmbeddingDomain, as_domain

__all__ = [
    "RULES",
    "BatchMixingError",
    "Bound",
    "BoxDomain",
    "Const",
    "Ctx",
    "EmbeddingDomain",
    "LayerRow",
    "Propagation",
    "Propagator",
    "UnsupportedOpError",
    "apply_op",
    "as_domain",
    "as_program",
    "finalize",
    "input_bound",
    "lookup",
    "propagate",
    "rule",
]
