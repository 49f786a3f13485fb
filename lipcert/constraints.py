"""Weight constraints for Lipschitz training, and the optimizer hook that applies them.

Reference: L. Newhouse, R. P. Hess, F. Cesista, A. Zahorodnii, J. Bernstein, P. Isola,
"Training Transformers with Enforced Lipschitz Bounds", arXiv:2507.13338 (2025), and its
public code (``lipschitz-transformers``: ``modula/atom.py`` and ``nanogpt/train_*.py``).
The formulas below are re-derived and implemented here in torch; the docstrings say which
method of the paper each one is.

Norms and limits
----------------
A weight ``W`` has shape ``(fan_out, fan_in)``, as in ``nn.Linear``. The paper measures it
in the RMS→RMS operator norm::

    ‖W‖_RMS = σ_max(W) · √(fan_in / fan_out)

and a bound ``w_max`` is declared in that norm. The plain spectral (L2→L2) bound that L2
certificates use is therefore::

    σ_max(W) ≤ s,    s = spectral_limit(shape, w_max) = w_max · √(fan_out / fan_in)

(``rms_to_spectral_scale(shape) = √(fan_out / fan_in)``). Every projection below takes the
spectral limit ``s``, works on ``X = W / s`` (so each method is written for limit 1) and
writes ``s · X'`` back in place, under ``torch.no_grad``. Embedding tables ``(vocab, d)``
are not constrained here; the caller passes only the matrices it wants constrained.

Exactness
---------
``spectral_normalize`` and ``spectral_cap`` use an exact float64 computation and aim two
units of the weight dtype's precision below the limit (2.4e-7 relative for float32), so the
bound holds after every step even after the weight is rounded back to its dtype.
``hard_cap``, ``soft_cap``, ``spectral_hammer`` and ``weight_decay`` only keep the weights
near the bound, which is how the paper uses them; :meth:`WeightConstraint.finalize`
measures every matrix exactly at the end of training and applies an exact ``spectral_cap``
wherever the declared bound does not hold.

Numerics
--------
``torch.linalg.svd`` can fail to converge on Muon-updated matrices, whose singular values
are nearly all equal. Exact quantities are therefore computed from the eigendecomposition
of the small float64 Gram matrix (``WᵀW`` or ``WWᵀ``, whichever is smaller); on a linalg
failure they fall back to a float64 SVD (LAPACK ``gesvd``), and ``spectral_cap`` finally to
a Frobenius-norm rescaling, which still guarantees the bound. None of them crashes on a
finite matrix; a non-finite weight raises :class:`~lipcert.errors.TrainingError`.

The lr coupling the training loop should use
--------------------------------------------
Attach the constraint to each optimizer (:meth:`WeightConstraint.attach`). The hook reads
every param group's current ``lr`` after each ``optimizer.step()``, so an lr schedule needs
nothing more. ``weight_decay`` shrinks by ``1 − lr·λ``. ``soft_cap`` uses the paper's
coupling (:func:`soft_cap_coupling`): with one step's update of spectral norm at most
``u = lr · update_scale`` and the optimizer's own decoupled decay ``lr·λ_opt``, a weight that
started the step at the limit ends it at most at ``k = (1 − lr·λ_opt) + u/s`` (in units of
the limit), and ``alpha`` is chosen so that the soft cap maps ``k`` back to exactly 1.
``update_scale`` defaults to Muon's shape-dependent lr adjustment times the largest gain of
its Newton–Schulz polynomial (×1.05 margin, as in the paper's nanogpt code) for
``torch.optim.Muon``, and to the heuristic ``√fan_out + √fan_in`` (the spectral norm of a
random sign-like AdamW update of unit entries) for any other optimizer.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from lipcert.errors import LipcertError, TrainingError
from lipcert.muon import adjusted_lr

__all__ = [
    "APPROXIMATE_METHODS",
    "CONSTRAINT_METHODS",
    "EXACT_METHODS",
    "HARD_CAP_COEFFICIENTS",
    "SOFT_CAP_K_MAX",
    "WeightConstraint",
    "cached_top_vector",
    "exact_sigma_max",
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

# ---------------------------------------------------------------------------------------
# Norm conversion


def rms_to_spectral_scale(shape: Iterable[int]) -> float:
    """``√(fan_out / fan_in)``: a bound ``w_max`` in the RMS→RMS norm is ``w_max`` times this
    as a bound on ``σ_max``, for a weight of shape ``(fan_out, fan_in)``."""
    fan_out, fan_in = _matrix_shape(shape)
    return math.sqrt(fan_out / fan_in)


def spectral_limit(shape: Iterable[int], w_max: float) -> float:
    """The plain spectral limit ``s = w_max · √(fan_out / fan_in)`` for an RMS→RMS bound."""
    w = float(w_max)
    if not (math.isfinite(w) and w > 0):
        raise LipcertError(f"w_max must be a finite positive number, got {w_max!r}")
    return w * rms_to_spectral_scale(shape)


def _matrix_shape(shape: Iterable[int]) -> tuple[int, int]:
    dims = tuple(int(d) for d in shape)
    if len(dims) != 2 or min(dims) < 1:
        raise LipcertError(f"a constrained weight must be a non-empty 2-D matrix, got shape {dims}")
    return dims[0], dims[1]


# ---------------------------------------------------------------------------------------
# Exact float64 linear algebra, robust to non-converging SVDs


def _check_matrix(weight: torch.Tensor) -> None:
    _matrix_shape(weight.shape)
    if not bool(torch.isfinite(weight).all()):
        raise TrainingError(
            "a constrained weight has non-finite entries (training diverged); "
            "lower the learning rate or check the loss"
        )


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


def exact_sigma_max(weight: torch.Tensor) -> float:
    """σ_max of a 2-D tensor, computed exactly in float64.

    ``σ_max = √λ_max(G)`` with ``G`` the smaller Gram matrix (``WᵀW`` or ``WWᵀ``); the
    symmetric eigensolver is backward stable, so the relative error is about ``n·2⁻⁵³``.
    Falls back to a float64 ``gesvd`` SVD if the eigensolver fails.
    """
    _check_matrix(weight)
    w = weight.detach()
    try:
        gram, _ = _gram64(w)
        lam = torch.linalg.eigvalsh(gram)
        return math.sqrt(max(float(lam[-1]), 0.0))
    except (RuntimeError, torch.linalg.LinAlgError):
        pass
    svd = _svd64(w)
    if svd is None:
        raise LipcertError(f"could not compute σ_max of a {tuple(w.shape)} matrix in float64")
    return float(svd[1].max())


# ---------------------------------------------------------------------------------------
# The projections (one per method). Uniform call: fn(weight, limit, **options); each takes
# the options it needs and ignores the rest.


def none(weight: torch.Tensor, limit: float, **_: Any) -> None:
    """No constraint: ``W`` is left as it is (there is no declared bound)."""


@torch.no_grad()
def spectral_normalize(weight: torch.Tensor, limit: float, **_: Any) -> None:
    """Spectral normalisation, one of the paper's constraint methods:

        W ← W / max(1, σ_max(W) / s)

    with ``σ_max`` computed exactly in float64 (the paper's code uses power iteration).
    The target is ``s`` lowered by two units of the dtype's precision (:func:`_rounding_safe`),
    so that after rounding ``W`` to its dtype ``σ_max(W) ≤ s`` still holds.
    """
    _check_matrix(weight)
    sigma = exact_sigma_max(weight)
    if sigma > limit:
        weight.mul_(_rounding_safe(limit, weight.dtype) / sigma)


@torch.no_grad()
def spectral_cap(weight: torch.Tensor, limit: float, **_: Any) -> None:
    """Spectral cap by exact clipping: every singular value ``σ_i ← min(σ_i, s)``.

    With ``X = W/s = U Σ Vᵀ`` and the eigendecomposition ``XᵀX = V Λ Vᵀ`` (float64, smaller
    side), ``σ_i = √λ_i`` and::

        X ← X · V diag(min(1, 1/σ_i)) Vᵀ = X − X V_c diag(1 − 1/σ_c) V_cᵀ

    where ``c`` are the directions with ``σ > 1`` (for a wide ``X`` the same is done from the
    left with ``XXᵀ``). Only the excess directions are touched, so singular values below the
    limit are unchanged. The clip level is ``s`` lowered by two units of the weight dtype's
    precision (:func:`_rounding_safe`), so the rounded result still satisfies ``σ_max ≤ s``.
    On a linalg failure: float64 ``gesvd`` SVD clipping, then (last
    resort, with a warning) ``X ← X / max(1, ‖X‖_F)``, which still guarantees ``σ_max ≤ 1``.
    """
    _check_matrix(weight)
    safe = _rounding_safe(limit, weight.dtype)
    x = weight.detach().to(torch.float64) / safe
    new, top = _cap_unit64(x)
    if new is not None:
        weight.copy_((new * safe).to(weight.dtype))
    if top is not None:
        _remember_top_vector(weight, top)


def _remember_top_vector(weight: torch.Tensor, top: torch.Tensor) -> None:
    """Record ``top`` for :func:`cached_top_vector`, stamped with ``weight``'s version."""
    weight._lipcert_top_vector = (weight._version, top)  # type: ignore[attr-defined]


def cached_top_vector(weight: torch.Tensor) -> torch.Tensor | None:
    """The unit top eigenvector (float64) of ``weight``'s smaller Gram matrix (``WᵀW`` for a
    tall weight: its top right singular vector; ``WWᵀ`` for a wide one: its top left
    singular vector), as :func:`spectral_cap` last computed it, or ``None`` if ``weight``
    has been modified in place since (its version counter moved) or was never capped.

    Clipping singular values at the limit keeps the singular vectors, so the vector of the
    eigendecomposition that capped ``W`` is a top singular vector of the capped ``W`` too:
    ``‖W v‖`` (tall) or ``‖vᵀ W‖`` (wide) is then its exact σ_max, without another
    eigendecomposition (the certified family's training bound reads it every step).
    """
    cached = getattr(weight, "_lipcert_top_vector", None)
    if cached is None or cached[0] != weight._version:
        return None
    return cached[1]


def _rounding_safe(limit: float, dtype: torch.dtype) -> float:
    """``limit`` lowered by two units of ``dtype``'s precision (2.4e-7 relative for float32),
    so that rounding the projected weight to its dtype does not push σ_max past the limit."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return limit * (1.0 - 2.0 * eps)


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

    Cheap first: the Gram-iteration bounds ``σ_max² ≤ ‖A‖_F``, ``‖A²‖_F^{1/2}``,
    ``‖A⁴‖_F^{1/4}`` (Delattre et al., ICML 2023); only if all three exceed ``level²`` is the
    exact σ_max computed (float64), so a matrix inside the range is never touched.
    """
    level_sq = level * level
    if float(torch.linalg.matrix_norm(a_mat)) <= level_sq:
        return 1.0
    a2 = a_mat @ a_mat
    if float(torch.linalg.matrix_norm(a2)) <= level_sq**2:
        return 1.0
    if float(torch.linalg.matrix_norm(a2 @ a2)) <= level_sq**4:
        return 1.0
    sigma = exact_sigma_max(x)
    return 1.0 if sigma <= level else level / sigma


#: The paper's hard cap polynomials (credited there to F. Cesista): four odd quintics
#: ``p(σ) = aσ + bσ³ + cσ⁵`` whose composition approximates ``min(σ, 1)`` on ``[0, ~3.5]``.
HARD_CAP_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (0.805032, 0.206361, -0.019763),
    (0.649867, 0.162935, -0.011150),
    (1.810259, -0.200265, 0.008251),
    (1.004384, -0.183490, 0.014413),
)
#: The polynomial is accurate for singular values (in units of the limit) up to this; larger
#: matrices are first scaled into range.
HARD_CAP_INPUT_RANGE = 3.5


@torch.no_grad()
def hard_cap(weight: torch.Tensor, limit: float, **_: Any) -> None:
    """The paper's fast polynomial hard cap: ``σ_i ← p₄∘p₃∘p₂∘p₁(σ_i) ≈ min(σ_i, 1)``.

    Each ``p_j(σ) = a_jσ + b_jσ³ + c_jσ⁵`` (:data:`HARD_CAP_COEFFICIENTS`) acts on all singular
    values at once as ``X ← X (a I + b A + c A²)``, ``A = XᵀX`` (for a wide ``X``:
    ``(a I + b A + c A²) X`` with ``A = XXᵀ``): matrix products only, no SVD.

    Measured on the scalar map (and checked on matrices by this module's tests): σ in [0, 1]
    moves by at most 4.9% (0.1 → 0.095, 0.7 → 0.712, 1 → 0.966); σ in [1.1, 3.5] comes out
    in [0.998, 1.011]. The polynomial breaks down above about 3.55, so a matrix with
    ``σ_max > 3.5`` (:data:`HARD_CAP_INPUT_RANGE`) is first scaled down to ``σ_max = 3.5``
    (only far from the limit, e.g. at initialisation; a cheap Gram-iteration bound decides
    when the exact check is needed). The result is approximate: ``σ_max`` may exceed the limit
    by about 1.1%; ``finalize`` caps exactly.
    """
    _check_matrix(weight)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    x = weight.detach().to(work) / limit
    tall = x.shape[0] >= x.shape[1]
    if not tall:
        x = x.mT
    a_mat = x.mT @ x
    f = _rescale_into_range(x, a_mat, HARD_CAP_INPUT_RANGE)
    if f < 1.0:
        x, a_mat = x * f, a_mat * f**2
    eye = torch.eye(x.shape[1], dtype=work, device=x.device)
    for j, (a, b, c) in enumerate(HARD_CAP_COEFFICIENTS):
        if j:
            a_mat = x.mT @ x
        x = x @ (a * eye + b * a_mat + c * (a_mat @ a_mat))
    if not tall:
        x = x.mT
    weight.copy_((x * limit).to(weight.dtype))


#: Soft cap coupling is exact for k < 81/62: there f is increasing on [0, k] (see below).
SOFT_CAP_K_MAX = 81.0 / 62.0
_SOFT_CAP_ALPHA_MAX = 3844.0 / 19683.0  # α at k = 81/62, where αk² = 1/3


@torch.no_grad()
def soft_cap(weight: torch.Tensor, limit: float, *, alpha: float = 0.0, **_: Any) -> None:
    """The paper's spectral soft cap with strength ``alpha`` (on ``X = W/s``)::

        X ← X (I − α XᵀX),  then  X ← X (I + α XᵀX)

    i.e. ``σ ↦ τ = σ(1 − ασ²) ↦ τ(1 + ατ²)``, which expands to
    ``f(σ) = σ − 3α²σ⁵ + 3α³σ⁷ − α⁴σ⁹``: it shrinks large singular values and leaves small
    ones almost unchanged (``f(σ) = σ + O(α²σ⁵)``). The paper couples ``alpha`` to the
    learning rate and ``w_max`` so that the largest singular value one optimizer step can
    reach is mapped back to the limit: see :func:`soft_cap_coupling`. ``alpha = 0`` is the
    identity.

    ``f`` is only meant for ``ασ² ≤ 1`` (there ``0 ≤ f(σ) < σ``); far beyond, it changes sign
    and grows like ``α⁴σ⁹``. A matrix with ``σ_max > 1/√α`` (possible at initialisation or with
    a fixed ``alpha``) is therefore first scaled down to the limit, ``σ_max = 1``; a cheap
    Gram-iteration bound decides when that exact check is needed.
    """
    _check_matrix(weight)
    if alpha == 0.0:
        return
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    x = weight.detach().to(work) / limit
    tall = x.shape[0] >= x.shape[1]
    if not tall:
        x = x.mT
    a_mat = x.mT @ x
    if _rescale_into_range(x, a_mat, 1.0 / math.sqrt(alpha)) < 1.0:
        x = x / exact_sigma_max(x)
        a_mat = x.mT @ x
    x = x - alpha * (x @ a_mat)
    x = x + alpha * (x @ (x.mT @ x))
    if not tall:
        x = x.mT
    weight.copy_((x * limit).to(weight.dtype))


def soft_cap_coupling(
    max_update_norm: float, w_max: float = 1.0, weight_decay: float = 0.0
) -> float:
    """The paper's lr/w_max coupling for :func:`soft_cap`; returns ``alpha`` for limit 1.

    A weight at the limit ``w_max`` before a step, decayed by ``1 − weight_decay``
    (``weight_decay`` is the per-step factor ``lr·λ``) and moved by an update of norm at most
    ``max_update_norm`` (same norm as ``w_max``), ends the step with norm at most
    ``k = (1 − weight_decay) + max_update_norm / w_max`` in units of the limit. ``alpha`` is
    the smallest non-negative root of ``f(k) = 1``, i.e. of::

        −k⁹α⁴ + 3k⁷α³ − 3k⁵α² + (k − 1) = 0

    so the soft cap maps every singular value in ``[0, k]`` into ``[0, 1]``: for
    ``k < 81/62`` (:data:`SOFT_CAP_K_MAX`), ``αk² < 1/3`` and ``f`` is increasing on
    ``[0, k]``. For larger ``k`` the root would put an interior maximum above 1, so ``alpha``
    is held at ``3844/19683`` (where ``max_σ f(σ) = 1``, reached at ``σ = 81/62``); a single
    soft cap then no longer guarantees the bound. Returns 0 when ``k ≤ 1``.

    The paper's code solves the same quartic with the limit at ``w_max`` instead of 1; its
    alpha is this one divided by ``w_max²``.
    """
    if w_max <= 0 or not math.isfinite(max_update_norm):
        raise LipcertError("soft_cap_coupling needs w_max > 0 and a finite update norm")
    k = (1.0 - max(float(weight_decay), 0.0)) + max(float(max_update_norm), 0.0) / float(w_max)
    return _soft_cap_alpha(k)


@functools.lru_cache(maxsize=4096)
def _soft_cap_alpha(k: float) -> float:
    if k <= 1.0:
        return 0.0
    if k >= SOFT_CAP_K_MAX:
        return _SOFT_CAP_ALPHA_MAX
    roots = np.roots([-(k**9), 3 * k**7, -3 * k**5, 0.0, k - 1.0])
    real = [r.real for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r)) and r.real >= 0]
    return float(min(real)) if real else _SOFT_CAP_ALPHA_MAX


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

    Power iteration on ``X = W/s`` estimates the top singular triple ``(σ, u, v)``, then::

        X ← X + (1 − σ) u vᵀ

    (paper code: ``M + (w_max − σ_max) u vᵀ``, applied whether σ is above or below the limit).
    ``state["v"]`` keeps the right singular vector between calls, so ``power_iters`` iterations
    per step suffice once warm (the paper restarts 16 iterations from a random vector; a cold
    start here also runs at least 16). Only the top direction
    is touched, so other singular values above the limit survive until later steps; a matrix
    with ``σ ≈ 0`` (e.g. zero-initialised) is left alone.
    """
    _check_matrix(weight)
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    x = weight.detach().to(work) / limit
    st: dict[str, torch.Tensor] = {} if state is None else state
    v = st.get("v")
    iters = max(1, int(power_iters))
    if v is None or v.shape != (x.shape[1],) or not bool(torch.isfinite(v).all()):
        gen = torch.Generator().manual_seed(x.shape[0] * 1_000_003 + x.shape[1])
        v = torch.randn(x.shape[1], generator=gen, dtype=work).to(x.device)
        iters = max(iters, 16)  # cold start: as many iterations as the paper uses
    v = v.to(device=x.device, dtype=work)
    v = v / v.norm().clamp_min(1e-30)
    for _i in range(iters):
        u = x @ v
        u = u / u.norm().clamp_min(1e-30)
        v = x.mT @ u
        v = v / v.norm().clamp_min(1e-30)
    u = x @ v
    sigma = float(u.norm())
    st["v"] = v.detach().clone()
    if sigma <= 1e-12:
        return
    u = u / sigma
    weight.add_(((1.0 - sigma) * limit * torch.outer(u, v)).to(weight.dtype))


@torch.no_grad()
def weight_decay(
    weight: torch.Tensor, limit: float, *, lr: float = 0.0, decay: float = 0.0, **_: Any
) -> None:
    """Decoupled weight decay, the paper's baseline constraint: ``W ← (1 − lr·λ) W``.

    It bounds nothing by itself (``limit`` is unused); the declared bound is enforced by
    :meth:`WeightConstraint.finalize`.
    """
    _check_matrix(weight)
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


# ---------------------------------------------------------------------------------------
# Update-norm estimates for the soft cap coupling

_UPDATE_MARGIN = 1.05  # safety margin on the update norm, as in the paper's nanogpt code


@functools.lru_cache(maxsize=64)
def _newton_schulz_gain(coefficients: tuple[float, float, float], steps: int) -> float:
    """max over x in [0, 1] of the scalar Newton–Schulz map iterated ``steps`` times.

    Muon divides the momentum by its Frobenius norm first, so its singular values start in
    [0, 1]; this is the largest singular value its orthogonalised update can have (about
    1.2024 for torch's default ``(3.4445, −4.775, 2.0315)`` × 5).
    """
    a, b, c = coefficients
    x = np.linspace(0.0, 1.0, 200_001)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return float(np.abs(x).max())


def _muon_update_scale(group: dict[str, Any], shape: tuple[int, int]) -> float:
    """Spectral norm of one torch.optim.Muon update per unit lr, for a weight of ``shape``."""
    ratio = adjusted_lr(1.0, group.get("adjust_lr_fn"), torch.Size(shape))
    coeffs = tuple(float(c) for c in group.get("ns_coefficients", (3.4445, -4.775, 2.0315)))
    a, b, c = coeffs
    gain = _newton_schulz_gain((a, b, c), int(group.get("ns_steps", 5)))
    return ratio * gain


def _default_update_scale(
    optimizer: torch.optim.Optimizer | None, group: dict[str, Any], shape: tuple[int, int]
) -> float:
    muon = getattr(torch.optim, "Muon", None)
    if optimizer is not None and muon is not None and isinstance(optimizer, muon):
        return _muon_update_scale(group, shape) * _UPDATE_MARGIN
    fan_out, fan_in = shape
    return (math.sqrt(fan_out) + math.sqrt(fan_in)) * _UPDATE_MARGIN


# ---------------------------------------------------------------------------------------
# The constraint object and its optimizer hook


class _Entry:
    __slots__ = ("limit", "name", "param", "state")

    def __init__(self, name: str, param: torch.nn.Parameter, limit: float | None) -> None:
        self.name = name
        self.param = param
        self.limit = limit
        self.state: dict[str, torch.Tensor] = {}


class WeightConstraint:
    """Keeps a set of weight matrices within ``‖W‖_RMS ≤ w_max`` during training.

    Args:
        method: one of :data:`CONSTRAINT_METHODS`.
        w_max: the bound in the RMS→RMS norm (ignored, and may be ``None``, for ``"none"``).
        params: ``(name, parameter)`` pairs of 2-D weights ``(fan_out, fan_in)``.
        weight_decay: λ for the ``"weight_decay"`` method (``W ← (1 − lr·λ) W``).
        alpha: a fixed soft cap strength (limit-1 units); ``None`` couples it to the lr.
        update_scale: spectral norm of one optimizer update per unit lr, for the soft cap
            coupling; ``None`` picks it per optimizer (see the module docstring).
        power_iters: power-iteration steps per optimizer step for ``"spectral_hammer"``.
        norm: ``"rms"`` (the paper's RMS→RMS norm, above) or ``"spectral"``: ``w_max`` is
            then the limit on σ_max itself, the same for every shape.

    Call :meth:`attach` on each optimizer (Muon for hidden matrices, AdamW for the rest):
    after every ``optimizer.step()`` the hook projects the constrained matrices that this
    optimizer owns, with its current lr. At the end, :meth:`finalize`.
    """

    def __init__(
        self,
        method: str,
        w_max: float | None,
        params: Iterable[tuple[str, torch.nn.Parameter]],
        *,
        weight_decay: float = 0.0,
        alpha: float | None = None,
        update_scale: float | None = None,
        power_iters: int = 4,
        norm: str = "rms",
    ) -> None:
        if norm not in ("rms", "spectral"):
            raise LipcertError(f"unknown weight norm {norm!r}; expected 'rms' or 'spectral'")
        self.norm = norm
        self.fn = get_method(method)
        self.method = method
        if method == "none":
            self.w_max: float | None = None if w_max is None else float(w_max)
        else:
            if w_max is None:
                raise LipcertError(f"constraint method {method!r} needs a bound w_max")
            spectral_limit((1, 1), w_max)  # validates w_max
            self.w_max = float(w_max)
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise LipcertError(f"weight_decay must be a finite number ≥ 0, got {weight_decay!r}")
        if alpha is not None and not (math.isfinite(alpha) and alpha >= 0):
            raise LipcertError(f"alpha must be a finite number ≥ 0, got {alpha!r}")
        if update_scale is not None and not (math.isfinite(update_scale) and update_scale >= 0):
            raise LipcertError(f"update_scale must be a finite number ≥ 0, got {update_scale!r}")
        self.weight_decay = float(weight_decay)
        self.alpha = alpha
        self.update_scale = update_scale
        self.power_iters = int(power_iters)
        self._entries: dict[int, _Entry] = {}
        for name, p in params:
            if p.ndim != 2:
                raise LipcertError(
                    f"parameter {name!r} has shape {tuple(p.shape)}; constraints apply to 2-D "
                    "weight matrices (fan_out, fan_in) only"
                )
            if id(p) in self._entries:
                continue
            limit = (
                None
                if self.w_max is None or method == "none"
                else spectral_limit(p.shape, self.w_max) if norm == "rms" else self.w_max
            )
            self._entries[id(p)] = _Entry(name, p, limit)
        self._handles: list[Any] = []

    # -- bookkeeping ------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Names of the constrained matrices, in the order given."""
        return [e.name for e in self._entries.values()]

    def limits(self) -> dict[str, float | None]:
        """Each matrix's spectral limit ``s`` (``None`` for method ``"none"``)."""
        return {e.name: e.limit for e in self._entries.values()}

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-matrix state (the spectral hammer's power-iteration vectors)."""
        return {
            e.name: {k: v.detach().cpu().clone() for k, v in e.state.items()}
            for e in self._entries.values()
            if e.state
        }

    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore :meth:`state_dict` (unknown names are ignored)."""
        by_name = {e.name: e for e in self._entries.values()}
        for name, st in state.items():
            if name in by_name:
                by_name[name].state = {k: v.clone() for k, v in st.items()}

    # -- the hook ---------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Register the projection with ``optimizer.register_step_post_hook``.

        After each ``optimizer.step()`` every constrained matrix owned by *this* optimizer is
        projected, using its param group's current ``lr``. Returns the hook handle (also kept
        for :meth:`detach`).
        """
        owned = [p for g in optimizer.param_groups for p in g["params"] if id(p) in self._entries]
        if not owned and self._entries:
            warnings.warn(
                "WeightConstraint.attach: this optimizer owns none of the constrained matrices",
                RuntimeWarning,
                stacklevel=2,
            )

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._project_optimizer(opt)

        handle = optimizer.register_step_post_hook(hook)
        self._handles.append(handle)
        return handle

    def detach(self) -> None:
        """Remove every hook registered by :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _project_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            lr = float(group.get("lr", 0.0))
            for p in group["params"]:
                entry = self._entries.get(id(p))
                if entry is not None:
                    self._project_entry(entry, lr, group, optimizer)

    def project_all(self, lr: float = 0.0) -> None:
        """Apply the method once to every matrix now (e.g. at initialisation), at ``lr``."""
        for entry in self._entries.values():
            self._project_entry(entry, float(lr), {"lr": lr}, None)

    def _project_entry(
        self,
        entry: _Entry,
        lr: float,
        group: dict[str, Any],
        optimizer: torch.optim.Optimizer | None,
    ) -> None:
        if entry.limit is None:
            return
        alpha = 0.0
        if self.method == "soft_cap":
            alpha = self._alpha(entry.param, entry.limit, lr, group, optimizer)
        try:
            self.fn(
                entry.param,
                entry.limit,
                lr=lr,
                decay=self.weight_decay,
                alpha=alpha,
                state=entry.state,
                power_iters=self.power_iters,
            )
        except TrainingError as exc:
            raise TrainingError(f"{entry.name}: {exc}") from None

    def _alpha(
        self,
        param: torch.Tensor,
        limit: float,
        lr: float,
        group: dict[str, Any],
        optimizer: torch.optim.Optimizer | None,
    ) -> float:
        """Soft cap strength for one matrix this step: fixed, or coupled to lr (see module)."""
        if self.alpha is not None:
            return float(self.alpha)
        shape = _matrix_shape(param.shape)
        scale = (
            self.update_scale
            if self.update_scale is not None
            else _default_update_scale(optimizer, group, shape)
        )
        decay = lr * float(group.get("weight_decay", 0.0) or 0.0)
        return soft_cap_coupling(lr * scale, limit, decay)

    # -- the end of training ----------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> list[dict[str, Any]]:
        """Measure every matrix exactly and make the declared bound hold.

        For every method but ``"none"``, a matrix whose exact float64 ``σ_max`` exceeds its
        limit is capped exactly (:func:`spectral_cap`; for ``spectral_normalize`` and
        ``spectral_cap`` this only happens if no step was taken), and, should rounding to the
        weight's dtype leave it a hair above, rescaled until the float64 measurement is within
        the limit. Returns one record per matrix: ``name``, ``shape``, ``method``, ``w_max``,
        ``limit`` (spectral; ``None`` for ``"none"``), ``sigma_before``, ``sigma_after``
        (exact float64 σ_max), ``rms_norm_after`` (= σ_after·√(fan_in/fan_out)) and
        ``capped`` (whether finalize changed the matrix).
        """
        records: list[dict[str, Any]] = []
        for entry in self._entries.values():
            p = entry.param
            fan_out, fan_in = _matrix_shape(p.shape)
            try:
                before = exact_sigma_max(p)
            except TrainingError as exc:
                raise TrainingError(f"{entry.name}: {exc}") from None
            after = before
            capped = False
            if entry.limit is not None and before > entry.limit:
                spectral_cap(p, entry.limit)
                capped = True
                after = exact_sigma_max(p)
                for _ in range(8):
                    if after <= entry.limit:
                        break
                    p.mul_((entry.limit / after) * (1.0 - 2.0**-20))
                    after = exact_sigma_max(p)
            records.append(
                {
                    "name": entry.name,
                    "shape": [fan_out, fan_in],
                    "method": self.method,
                    "w_max": self.w_max,
                    "limit": entry.limit,
                    "sigma_before": before,
                    "sigma_after": after,
                    "rms_norm_after": after * math.sqrt(fan_in / fan_out),
                    "capped": capped,
                }
            )
        return records
