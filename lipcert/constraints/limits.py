"""Spectral limits of constrained weights, and the checks every projection starts with.

A weight ``W`` has shape ``(fan_out, fan_in)``, as in ``nn.Linear``. The paper measures it
in the RMS→RMS operator norm::

    ‖W‖_RMS = σ_max(W) · √(fan_in / fan_out)

and a bound ``w_max`` is declared in that norm. The plain spectral (L2→L2) bound that L2
certificates use is therefore::

    σ_max(W) ≤ s,    s = spectral_limit(shape, w_max) = w_max · √(fan_out / fan_in)

(``rms_to_spectral_scale(shape) = √(fan_out / fan_in)``). With ``norm="spectral"``,
:class:`~lipcert.constraints.WeightConstraint` takes ``w_max`` as ``s`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lipcert.errors import LipcertError, TrainingError


def matrix_shape(shape: Iterable[int]) -> tuple[int, int]:
    """``(fan_out, fan_in)`` of a constrained weight; refuses anything but a non-empty matrix."""
    dims = tuple(int(d) for d in shape)
    if len(dims) != 2 or min(dims) < 1:
        raise LipcertError(f"a constrained weight must be a non-empty 2-D matrix, got shape {dims}")
    return dims[0], dims[1]


def rms_to_spectral_scale(shape: Iterable[int]) -> float:
    """``√(fan_out / fan_in)``: a bound ``w_max`` in the RMS→RMS norm is ``w_max`` times this
    as a bound on ``σ_max``, for a weight of shape ``(fan_out, fan_in)``."""
    fan_out, fan_in = matrix_shape(shape)
    return math.sqrt(fan_out / fan_in)


def spectral_limit(shape: Iterable[int], w_max: float) -> float:
    """The plain spectral limit ``s = w_max · √(fan_out / fan_in)`` for an RMS→RMS bound."""
    w = float(w_max)
    if not (math.isfinite(w) and w > 0):
        raise LipcertError(f"w_max must be a finite positive number, got {w_max!r}")
    return w * rms_to_spectral_scale(shape)


def check_weight(weight: torch.Tensor) -> None:
    """Refuse a weight that is not a matrix, or has a NaN or infinite entry (training
    diverged): :class:`~lipcert.errors.TrainingError`."""
    matrix_shape(weight.shape)
    if not bool(torch.isfinite(weight).all()):
        raise TrainingError(
            "a constrained weight has non-finite entries (training diverged); "
            "lower the learning rate or check the loss"
        )


def rounding_safe(limit: float, dtype: torch.dtype) -> float:
    """``limit`` lowered by two units of ``dtype``'s precision (2.4e-7 relative for float32),
    so that rounding a projected weight to its dtype does not push σ_max past the limit."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return limit * (1.0 - 2.0 * eps)
