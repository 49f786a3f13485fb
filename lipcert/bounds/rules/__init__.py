"""The rule table, one module per group of operators. Importing this package registers
every rule; to add one, write a function with ``@lipcert.bounds.rule(torch.ops.aten.<op>)``
in the module of its group (derivation in the docstring) and nothing else."""

from lipcert.bounds.rules import (  # noqa: F401
    activation,
    arithmetic,
    attention,
    custom,
    linear,
    norm,
    order,
    pool,
    shape,
    thirdparty,
)
