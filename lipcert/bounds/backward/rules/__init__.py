"""Backward rules, grouped like the forward ones (importing this package registers them)."""

from lipcert.bounds.backward.rules import (  # noqa: F401
    arithmetic,
    attention,
    batch_norm,
    custom,
    linear,
    norm,
    order,
    pointwise,
    pooling,
    shape,
)
