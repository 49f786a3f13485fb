"""Weight constraints for Lipschitz training, and the optimizer hook that applies them.

Reference: L. Newhouse, R. P. Hess, F. Cesista, A. Zahorodnii, J. Bernstein, P. Isola,
"Training Transformers with Enforced Lipschitz Bounds", arXiv:2507.13338 (2025), and its
public code (``lipschitz-transformers``: ``modula/atom.py`` and ``nanogpt/train_*.py``).
The formulas are re-derived and implemented here in torch; each docstring says which
method of the paper it is. One module per job:

* :mod:`~lipcert.constraints.limits`: the declared bound ``w_max`` (RMS→RMS norm) as a
  spectral limit ``s`` on σ_max, and the checks every projection starts with;
* :mod:`~lipcert.constraints.polynomials`: the scalar maps behind the approximate methods
  (hard cap, soft cap and its ``α``, Muon's Newton–Schulz gain);
* :mod:`~lipcert.constraints.projections`: one projection per method, and the registry;
* :mod:`~lipcert.constraints.coupling`: the soft cap's coupling to lr and optimizer;
* :mod:`~lipcert.constraints.hook`: :class:`WeightConstraint`, attached to optimizers with
  ``Optimizer.register_step_post_hook``, and its exact ``finalize``.
"""

from lipcert.constraints.coupling import soft_cap_coupling
from lipcert.constraints.hook import WeightConstraint
from lipcert.constraints.limits import rms_to_spectral_scale, spectral_limit
from lipcert.constraints.polynomials import (
    HARD_CAP_COEFFICIENTS,
    HARD_CAP_INPUT_RANGE,
    SOFT_CAP_K_MAX,
)
from lipcert.constraints.projections import (
    APPROXIMATE_METHODS,
    CONSTRAINT_METHODS,
    EXACT_METHODS,
    get_method,
    hard_cap,
    none,
    soft_cap,
    spectral_cap,
    spectral_hammer,
    spectral_normalize,
    weight_decay,
)

__all__ = [
    "APPROXIMATE_METHODS",
    "CONSTRAINT_METHODS",
    "EXACT_METHODS",
    "HARD_CAP_COEFFICIENTS",
    "HARD_CAP_INPUT_RANGE",
    "SOFT_CAP_K_MAX",
    "WeightConstraint",
    "get_method",
    "hard_cap",
    "none",
    "rms_to_spectral_scale",
    "soft_cap",
    "soft_cap_coupling",
    "spectral_cap",
    "spectral_hammer",
    "spectral_limit",
    "spectral_normalize",
    "weight_decay",
]
