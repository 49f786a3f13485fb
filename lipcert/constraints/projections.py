"""The weight projections, one function per constraint method, and their registry.

Uniform call: ``fn(weight, limit, **options)``, in place and under ``torch.no_grad``; each
takes the options it needs (``lr``, ``decay``, ``alpha``, ``state``, ``power_iters``) and
ignores the rest. ``limit`` is the spectral limit ``s`` (:mod:`lipcert.constraints.limits`):
each method works on ``X = W / s``, so it is written for limit 1, and writes ``s·X'`` back.
Embedding tables are not constrained here; the caller passes only the matrices it wants
constrained.

Exactness
---------
``spectral_normalize`` and ``spectral_cap`` make ``σ_max(W) ≤ s`` hold after every step:
they aim two units of the weight dtype's precision below the limit (2.4e-7 relative for
float32), so the bound survives rounding the weight back to its dtype. ``hard_cap``,
``soft_cap``, ``spectral_hammer`` and ``weight_decay`` only keep the weights near the bound,
which is how the paper uses them; :meth:`WeightConstraint.finalize
<lipcert.constraints.WeightConstraint.finalize>` caps exactly at the end of training.

Numerics
--------
σ_max itself always comes from :func:`lipcert.spectral.exact` (a verified upper value).
``torch.linalg.svd`` can fail to converge on Muon-updated matrices, whose singular values
are nearly all equal, so ``spectral_cap`` clips through the eigendecomposition of the small
float64 Gram matrix (``WᵀW`` or ``WWᵀ``, whichever is smaller); on a linalg failure it falls
back to a float64 SVD (LAPACK ``gesvd``) and finally to a Frobenius-norm rescaling, which
still guarantees the bound. None of them crashes on a finite matrix; a non-finite weight
raises :class:`~lipcert.errors.TrainingError`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lipcert import spectral
from lipcert.constraints.limits import check_weight, rounding_safe
from lipcert.constraints.polynomials import HARD_CAP_COEFFICIENTS, HARD_CAP_INPUT_RANGE
from lipcert.errors import LipcertError


def none(weight: torch.Tensor, limit: float, **_: Any) -> None:
    """No constraint: ``W`` is left as it is (there is no declared bound)."""


@torch.no_grad()
def spectral_normalize(weight: torch.Tensor, limit: float, **_: Any) -> None:
    """Spectral normalisation, one of the paper's constraint methods:

        W ← W / max(1, σ̄ / s)

    with σ̄ ≥ σ_max(W) the verified upper value of :func:`lipcert.spectral.exact` (within
    about 1e-8 of σ_max; the paper's code uses power iteration). The target is ``s`` lowered
    by two units of the dtype's precision (:func:`~lipcert.constraints.limits.rounding_safe`),
    so that after rounding ``W`` to its dtype ``σ_max(W) ≤ s`` still holds.
    """
    check_weight(weight)
    sigma = spectral.exact(weight).value
    if sigma > limit:
        weight.mul_(rounding_safe(limit, weight.dtype) / sigma)


@torch.no_grad()
def spectral_cap(weight: torch.Tensor, limit: float, **_: Any) -> None:
    """Spectral cap by exact clipping: every singular value ``σ_i ← min(σ_i, s)``.

    With ``X = W/s = U Σ Vᵀ`` and the eigendecomposition ``XᵀX = V Λ Vᵀ`` (float64, smaller
    side), ``σ_i = √λ_i`` and::

        X ← X · V diag(min(1, 1/σ_i)) Vᵀ = X − X V_c diag(1 − 1/σ_c) V_cᵀ

    where ``c`` are the directions with ``σ > 1`` (for a wide ``X`` the same is done from the
    left with ``XXᵀ``). Only the excess directions are touched, so singular values below the
    limit are unchanged. The clip level is ``s`` lowered by two units of the weight dtype's
    precision (:func:`~lipcert.constraints.limits.rounding_safe`), so the rounded result
    still satisfies ``σ_max ≤ s``. The top eigenvector of the Gram matrix is a top singular
    vector of the capped weight too (clipping keeps singular vectors): it is recorded with
    :func:`lipcert.spectral.remember_top_vector`. On a linalg failure: float64 ``gesvd`` SVD
    clipping, then (last resort, with a warning) ``X ← X / max(1, ‖X‖_F)``, which still
    guarantees ``σ_max ≤ 1``.
    """
    check_weight(weight)
    safe = rounding_safe(limit, weight.dtype)
    x = weight.detach().to(torch.float64) / safe
    new, top = _cap_unit64(x)
    if new is not None:
        weight.copy_((new * safe).to(weight.dtype))
    if top is not None:
        spectral.remember_top_vector(weight, top)


def _gram64(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The smaller Gram matrix of ``x`` in float64, and whether it is ``xᵀx`` (tall ``x``)."""
    x = x.to(torch.float64)
    tall = x.shape[0] >= x.shape[1]
    return (x.mT @ x if tall else x @ x.mT), tall


def _svd64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Thin float64 SVD with the robust ``gesvd`` driver; ``None`` if every attempt fails."""
    x = x.to(torch.float64)
    if x.is_cuda:
        try:
            u, s, vh = torch.linalg.svd(x, full_matrices=False, driver="gesvd")
            return u, s, vh
        except (RuntimeError, torch.linalg.LinAlgError):
            pass
    try:
        import scipy.linalg

        u_np, s_np, vh_np = scipy.linalg.svd(
            x.detach().cpu().numpy(), full_matrices=False, lapack_driver="gesvd"
        )
        to = functools.partial(torch.as_tensor, device=x.device, dtype=torch.float64)
        return to(u_np), to(s_np), to(vh_np)
    except (ImportError, ValueError, np.linalg.LinAlgError):
        pass
    try:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u, s, vh
    except (RuntimeError, torch.linalg.LinAlgError):
        return None


def _cap_unit64(x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Clip the singular values of float64 ``x`` at 1: the clipped matrix (``None`` when
    nothing exceeds 1) and the top eigenvector of the Gram matrix it used (``None`` when the
    eigendecomposition failed and the SVD fallback ran)."""
    try:
        gram, tall = _gram64(x)
        lam, vecs = torch.linalg.eigh(gram)
        top = vecs[:, -1]
        sigma = lam.clamp_min(0.0).sqrt()
        over = sigma > 1.0
        if not bool(over.any()):
            return None, top
        vc = vecs[:, over]
        shrink = 1.0 - 1.0 / sigma[over]
        if tall:
            return x - ((x @ vc) * shrink) @ vc.mT, top
        return x - (vc * shrink) @ (vc.mT @ x), top
    except (RuntimeError, torch.linalg.LinAlgError):
        pass
    svd = _svd64(x)
    if svd is not None:
        u, s, vh = svd
        over = s > 1.0
        if not bool(over.any()):
            return None, None
        return x - (u[:, over] * (s[over] - 1.0)) @ vh[over], None
    warnings.warn(
        "spectral_cap: eigendecomposition and SVD both failed; rescaling by the Frobenius "
        "norm instead (the bound still holds)",
        RuntimeWarning,
        stacklevel=3,
    )
    fro = float(torch.linalg.matrix_norm(x))
    return (x / fro if fro > 1.0 else None), None


def _rescale_into_range(x: torch.Tensor, a_mat: torch.Tensor, level: float) -> float:
    """Factor ``f ≤ 1`` such that ``σ_max(f·x) ≤ level``, for tall ``x`` with ``a_mat = xᵀx``.

    Cheap first, on the ``a_mat`` the caller has already formed: the Gram-iteration bounds
    ``σ_max² ≤ ‖A‖_F``, ``‖A²‖_F^{1/2}``, ``‖A⁴‖_F^{1/4}`` (Delattre et al., ICML 2023,
    evaluated in ``x``'s dtype: a gate, not a certificate); only if all three exceed
    ``level²`` is σ_max measured (:func:`lipcert.spectral.exact`, a verified upper value),
    so a matrix inside the range is never touched.
    """
    level_sq = level * level
    if float(torch.linalg.matrix_norm(a_mat)) <= level_sq:
        return 1.0
    a2 = a_mat @ a_mat
    if float(torch.linalg.matrix_norm(a2)) <= level_sq**2:
        return 1.0
    if float(torch.linalg.matrix_norm(a2 @ a2)) <= level_sq**4:
        return 1.0
    sigma = spectral.exact(x).value
    return 1.0 if sigma <= level else level / sigma


def _tall_scaled(weight: torch.Tensor, limit: float) -> tuple[torch.Tensor, bool]:
    """X = W / limit in the working precision (float64 for float64 weights, else float32),
    transposed if needed so that XᵀX is the smaller Gram matrix; and whether W was tall."""
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    x = weight.detach().to(work) / limit
    tall = x.shape[0] >= x.shape[1]
    return (x if tall else x.mT), tall


def _write_back(weight: torch.Tensor, x: torch.Tensor, tall: bool, limit: float) -> None:
    """W ← limit·X, undoing :func:`_tall_scaled`'s transpose."""
    weight.copy_(((x if tall else x.mT) * limit).to(weight.dtype))


@torch.no_grad()
def hard_cap(weight: torch.Tensor, limit: float, **_: Any) -> None:
    """The paper's fast polynomial hard cap: ``σ_i ← p₄∘p₃∘p₂∘p₁(σ_i) ≈ min(σ_i, 1)``.

    Each ``p_j(σ) = a_jσ + b_jσ³ + c_jσ⁵`` (:data:`HARD_CAP_COEFFICIENTS
    <lipcert.constraints.polynomials.HARD_CAP_COEFFICIENTS>`) acts on all singular values at
    once as ``X ← X (a I + b A + c A²)``, ``A = XᵀX`` (for a wide ``X``: ``(a I + b A + c A²)
    X`` with ``A = XXᵀ``): matrix products only, no SVD.

    Measured on the scalar map (and checked on matrices by the tests): σ in [0, 1] moves by
    at most 4.9% (0.1 → 0.095, 0.7 → 0.712, 1 → 0.966); σ in [1.1, 3.5] comes out in
    [0.998, 1.011]. The polynomial breaks down above about 3.55, so a matrix with
    ``σ_max > 3.5`` (``HARD_CAP_INPUT_RANGE``) is first scaled down to ``σ_max = 3.5``
    (only far from the limit, e.g. at initialisation; a cheap Gram-iteration bound decides
    when the σ_max measurement is needed). The result is approximate: ``σ_max`` may exceed
    the limit by about 1.1%; ``finalize`` caps exactly.
    """
    check_weight(weight)
    x, tall = _tall_scaled(weight, limit)
    a_mat = x.mT @ x
    f = _rescale_into_range(x, a_mat, HARD_CAP_INPUT_RANGE)
    if f < 1.0:
        x, a_mat = x * f, a_mat * f**2
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    for j, (a, b, c) in enumerate(HARD_CAP_COEFFICIENTS):
        if j:
            a_mat = x.mT @ x
        x = x @ (a * eye + b * a_mat + c * (a_mat @ a_mat))
    _write_back(weight, x, tall, limit)


@torch.no_grad()
def soft_cap(weight: torch.Tensor, limit: float, *, alpha: float = 0.0, **_: Any) -> None:
    """The paper's spectral soft cap with strength ``alpha`` (on ``X = W/s``)::

        X ← X (I − α XᵀX),  then  X ← X (I + α XᵀX)

    i.e. ``σ ↦ τ = σ(1 − ασ²) ↦ τ(1 + ατ²)``, which expands to
    ``f(σ) = σ − 3α²σ⁵ + 3α³σ⁷ − α⁴σ⁹``: it shrinks large singular values and leaves small
    ones almost unchanged (``f(σ) = σ + O(α²σ⁵)``). The paper couples ``alpha`` to the
    learning rate and ``w_max`` so that the largest singular value one optimizer step can
    reach is mapped back to the limit: see :func:`lipcert.constraints.soft_cap_coupling`.
    ``alpha = 0`` is the identity.

    ``f`` is only meant for ``ασ² ≤ 1`` (there ``0 ≤ f(σ) < σ``); far beyond, it changes sign
    and grows like ``α⁴σ⁹``. A matrix with ``σ_max > 1/√α`` (possible at initialisation or with
    a fixed ``alpha``) is therefore first divided by its σ_max (a verified upper value, so
    ``σ_max ≤ 1`` after); a cheap Gram-iteration bound decides when that measurement is
    needed.
    """
    check_weight(weight)
    if alpha == 0.0:
        return
    x, tall = _tall_scaled(weight, limit)
    a_mat = x.mT @ x
    if _rescale_into_range(x, a_mat, 1.0 / math.sqrt(alpha)) < 1.0:
        x = x / spectral.exact(x).value
        a_mat = x.mT @ x
    x = x - alpha * (x @ a_mat)
    x = x + alpha * (x @ (x.mT @ x))
    _write_back(weight, x, tall, limit)


@torch.no_grad()
def spectral_hammer(
    weight: torch.Tensor,
    limit: float,
    *,
    state: dict[str, torch.Tensor] | None = None,
    power_iters: int = 4,
    **_: Any,
) -> None:
    """The paper's spectral hammer: set the top singular value to the limit.

    Power iteration (:func:`lipcert.spectral.power_iteration`) on ``X = W/s`` estimates the
    top singular triple ``(σ, u, v)``, then::

        X ← X + (1 − σ) u vᵀ

    (paper code: ``M + (w_max − σ_max) u vᵀ``, applied whether σ is above or below the limit).
    ``state["v"]`` keeps the right singular vector between calls, so ``power_iters`` iterations
    per step suffice once warm (the paper restarts 16 iterations from a random vector; a cold
    start here also runs at least 16). Only the top direction is touched, so other singular
    values above the limit survive until later steps; a matrix with ``σ ≈ 0`` (e.g.
    zero-initialised) is left alone.
    """
    check_weight(weight)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    x = weight.detach().to(work) / limit
    st: dict[str, torch.Tensor] = {} if state is None else state
    v = st.get("v")
    iters = max(1, int(power_iters))
    if v is None or v.shape != (x.shape[1],) or not bool(torch.isfinite(v).all()):
        gen = torch.Generator().manual_seed(x.shape[0] * 1_000_003 + x.shape[1])
        v = torch.randn(x.shape[1], generator=gen, dtype=work).to(x.device)
        iters = max(iters, 16)  # cold start: as many iterations as the paper uses
    sigma, u, v = spectral.power_iteration(x, v.to(device=x.device, dtype=work), iters)
    st["v"] = v.detach().clone()
    if sigma <= 1e-12:
        return
    weight.add_(((1.0 - sigma) * limit * torch.outer(u, v)).to(weight.dtype))


@torch.no_grad()
def weight_decay(
    weight: torch.Tensor, limit: float, *, lr: float = 0.0, decay: float = 0.0, **_: Any
) -> None:
    """Decoupled weight decay, the paper's baseline constraint: ``W ← (1 − lr·λ) W``.

    It bounds nothing by itself (``limit`` is unused); the declared bound is enforced by
    :meth:`WeightConstraint.finalize <lipcert.constraints.WeightConstraint.finalize>`.
    """
    check_weight(weight)
    factor = 1.0 - float(lr) * float(decay)
    if factor != 1.0:
        weight.mul_(factor)


CONSTRAINT_METHODS: dict[str, Callable[..., None]] = {
    "none": none,
    "spectral_normalize": spectral_normalize,
    "spectral_cap": spectral_cap,
    "hard_cap": hard_cap,
    "soft_cap": soft_cap,
    "spectral_hammer": spectral_hammer,
    "weight_decay": weight_decay,
}

#: Methods whose bound holds exactly after every step.
EXACT_METHODS = frozenset({"spectral_normalize", "spectral_cap"})
#: Methods that only approximately enforce the bound; finalize() caps exactly.
APPROXIMATE_METHODS = frozenset({"hard_cap", "soft_cap", "spectral_hammer", "weight_decay"})


def get_method(name: str) -> Callable[..., None]:
    """The projection function registered under ``name``; unknown names list the choices."""
    try:
        return CONSTRAINT_METHODS[name]
    except (KeyError, TypeError):
        raise LipcertError(
            f"unknown constraint method {name!r}; choose one of: {', '.join(CONSTRAINT_METHODS)}"
        ) from None
