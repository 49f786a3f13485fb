"""The scalar polynomials behind the approximate constraints, and their algebra.

A matrix polynomial ``X ↦ X·q(XᵀX)`` acts on every singular value σ of ``X`` as the scalar
map ``σ ↦ σ·q(σ²)`` and keeps the singular vectors, so each method below is analysed on the
scalar map alone:

* the paper's hard cap: four odd quintics whose composition approximates ``min(σ, 1)``;
* the paper's soft cap ``f(σ) = τ(1 + ατ²)``, ``τ = σ(1 − ασ²)``, and the ``α`` that maps
  a given ``k`` to exactly 1 (the lr coupling);
* Muon's quintic Newton–Schulz map, whose largest value on ``[0, 1]`` bounds the singular
  values of an orthogonalised update.
"""

from __future__ import annotations

import functools

import numpy as np

#: The paper's hard cap polynomials (credited there to F. Cesista): four odd quintics
#: ``p(σ) = aσ + bσ³ + cσ⁵`` whose composition approximates ``min(σ, 1)`` on ``[0, ~3.5]``.
HARD_CAP_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)
#: The hard cap is accurate for singular values (in units of the limit) up to this; larger
#: matrices are first scaled into range.
HARD_CAP_INPUT_RANGE = 3.5

#: Soft cap coupling is exact for k < 81/62: there f is increasing on [0, k] (see below).
SOFT_CAP_K_MAX = 81.0 / 62.0
SOFT_CAP_ALPHA_MAX = 3844.0 / 19683.0  # α at k = 81/62, where αk² = 1/3


@functools.lru_cache(maxsize=4096)
def soft_cap_alpha(k: float) -> float:
    """The smallest ``α ≥ 0`` with ``f(k) = 1`` for the soft cap's scalar map
    ``f(σ) = σ − 3α²σ⁵ + 3α³σ⁷ − α⁴σ⁹``, i.e. the smallest non-negative root of::

        −k⁹α⁴ + 3k⁷α³ − 3k⁵α² + (k − 1) = 0

    so that the soft cap maps every singular value in ``[0, k]`` into ``[0, 1]``: for
    ``k < 81/62`` (:data:`SOFT_CAP_K_MAX`), ``αk² < 1/3`` and ``f`` is increasing on
    ``[0, k]``. For larger ``k`` the root would put an interior maximum above 1, so ``α``
    is held at ``3844/19683`` (where ``max_σ f(σ) = 1``, reached at ``σ = 81/62``); a single
    soft cap then no longer guarantees the bound. Returns 0 when ``k ≤ 1``.
    """
    if k <= 1.0:
        return 0.0
    if k >= SOFT_CAP_K_MAX:
        return SOFT_CAP_ALPHA_MAX
    roots = np.roots([-(k**9), 3 * k**7, -3 * k**5, 0.0, k - 1.0])
    real = [r.real for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r)) and r.real >= 0]
    return float(min(real)) if real else SOFT_CAP_ALPHA_MAX


@functools.lru_cache(maxsize=64)
def newton_schulz_gain(coefficients: tuple[float, float, float], steps: int) -> float:
    """max over x in [0, 1] of the scalar Newton–Schulz map ``x ↦ ax + bx³ + cx⁵`` iterated
    ``steps`` times (on a grid of 200,001 points).

    Muon divides the momentum by its Frobenius norm first, so its singular values start in
    [0, 1]; this is the largest singular value its orthogonalised update can have (about
    1.2024 for torch's default ``(3.4445, −4.775, 2.0315)`` × 5).
    """
    a, b, c = coefficients
    x = np.linspace(0.0, 1.0, 200_001)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return float(np.abs(x).max())
