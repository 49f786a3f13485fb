"""The soft cap's coupling to the learning rate and the optimizer (the paper's lr/w_max
coupling).

With one step's update of spectral norm at most ``u = lr · update_scale`` and the
optimizer's own decoupled decay ``lr·λ_opt``, a weight that started the step at the limit
``s`` ends it at most at ``k = (1 − lr·λ_opt) + u/s`` in units of the limit, and ``alpha``
is chosen so that the soft cap maps ``k`` back to exactly 1
(:func:`~lipcert.constraints.polynomials.soft_cap_alpha`). ``update_scale`` is, for
``torch.optim.Muon`` (and :class:`lipcert.muon.Muon`), its shape-dependent lr adjustment
times the largest gain of its Newton–Schulz polynomial, and for any other optimizer the
heuristic ``√fan_out + √fan_in`` (the spectral norm of a random sign-like AdamW update of
unit entries); both ×1.05, the margin of the paper's nanogpt code.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lipcert.constraints.polynomials import newton_schulz_gain, soft_cap_alpha
from lipcert.errors import LipcertError
from lipcert.muon import adjusted_lr

UPDATE_MARGIN = 1.05  # safety margin on the update norm, as in the paper's nanogpt code


def soft_cap_coupling(
    max_update_norm: float, w_max: float = 1.0, weight_decay: float = 0.0
) -> float:
    """The paper's lr/w_max coupling for the soft cap; returns ``alpha`` for limit 1.

    A weight at the limit ``w_max`` before a step, decayed by ``1 − weight_decay``
    (``weight_decay`` is the per-step factor ``lr·λ``) and moved by an update of norm at most
    ``max_update_norm`` (same norm as ``w_max``), ends the step with norm at most
    ``k = (1 − weight_decay) + max_update_norm / w_max`` in units of the limit; ``alpha``
    is :func:`~lipcert.constraints.polynomials.soft_cap_alpha` of ``k``, so the soft cap maps
    every singular value in ``[0, k]`` into ``[0, 1]`` (for ``k < 81/62``).

    The paper's code solves the same quartic with the limit at ``w_max`` instead of 1; its
    alpha is this one divided by ``w_max²``.
    """
    if w_max <= 0 or not math.isfinite(max_update_norm):
        raise LipcertError("soft_cap_coupling needs w_max > 0 and a finite update norm")
    k = (1.0 - max(float(weight_decay), 0.0)) + max(float(max_update_norm), 0.0) / float(w_max)
    return soft_cap_alpha(k)


def muon_update_scale(group: dict[str, Any], shape: tuple[int, int]) -> float:
    """Largest spectral norm of one Muon update per unit lr, for a weight of ``shape`` in a
    param ``group`` of ``torch.optim.Muon`` (which holds every key read here): the
    lr adjustment times the Newton–Schulz gain (its update's singular values are the
    iterated scalar map of values in [0, 1])."""
    ratio = adjusted_lr(1.0, group["adjust_lr_fn"], torch.Size(shape))
    a, b, c = (float(x) for x in group["ns_coefficients"])
    return ratio * newton_schulz_gain((a, b, c), int(group["ns_steps"]))


def default_update_scale(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], shape: tuple[int, int]
) -> float:
    """The update norm per unit lr that the coupling assumes for ``optimizer`` (module
    docstring), with the 1.05 margin."""
    if isinstance(optimizer, torch.optim.Muon):
        return muon_update_scale(group, shape) * UPDATE_MARGIN
    fan_out, fan_in = shape
    return (math.sqrt(fan_out) + math.sqrt(fan_in)) * UPDATE_MARGIN
