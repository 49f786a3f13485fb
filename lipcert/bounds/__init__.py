"""Sound bound propagation over ``torch.export`` graphs.

Layout (a newcomer should find one op's rule within a minute):

* ``state.py``      what a node carries (:class:`Bound`, :class:`Const`), input domains, and
                    per-sample bookkeeping;
* ``registry.py``   the rule table, the ``@rule`` decorator and what a rule returns;
* ``rules/``        one small function per ATen op, grouped: ``linear``, ``activation``,
                    ``norm``, ``attention``, ``shape``, ``arithmetic``, ``pool``, ``custom``;
* ``normalize.py``  export, functionalisation and decomposition of ops without a rule, the
                    scan for nodes without a rule, and graph rewrites;
* ``propagate.py``  walks the graph (:class:`Propagator`), constant-folds what does not depend
                    on the input, applies each rule and finalises its bounds;
* ``layers.py``     the per-layer table (each module's bound alone);
* ``errors.py``     the engine's errors and their messages.

Adding a rule::

    import torch
    from lipcert.bounds import Bound, rule

    @rule(torch.ops.aten.softplus)
    def softplus(ctx, x, beta=1, threshold=20):
        \"\"\"softplus: increasing, slope σ(βx) ≤ 1, |softplus(x)| ... \"\"\"
        ...
"""

from lipcert.bounds.errors import BatchMixingError, RuleError, UnsupportedOpError
from lipcert.bounds.layers import LayerBound, layer_table
from lipcert.bounds.normalize import as_program
from lipcert.bounds.propagate import Propagation, Propagator, apply_op, finalize, input_bound
from lipcert.bounds.registry import RULES, Exact, lookup, rule
from lipcert.bounds.state import Bound, BoxDomain, Const, Ctx, EmbeddingDomain, as_domain

__all__ = [
    "RULES",
    "BatchMixingError",
    "Bound",
    "BoxDomain",
    "Const",
    "Ctx",
    "EmbeddingDomain",
    "Exact",
    "LayerBound",
    "Propagation",
    "Propagator",
    "RuleError",
    "UnsupportedOpError",
    "apply_op",
    "as_domain",
    "as_program",
    "finalize",
    "input_bound",
    "layer_table",
    "lookup",
    "rule",
]
