"""Operator (spectral) norms of weight matrices and convolutions, each tagged with its kind.

Every norm function returns a :class:`Norm`: a value, its *kind* and the *method* that made
it. The kinds are never mixed (see docs/conventions.md, "Three kinds of numbers"):

* ``upper``    a certified upper bound on the true σ_max of the weights *as stored*;
* ``estimate`` a number near σ_max with no guarantee (power iteration: from below);
* ``lower``    an empirical witness (not produced here).

Public API
----------
``exact(weight)``                 σ_max from the float64 Gram matrix: an estimate of its top
                                  eigenvalue, verified by a Cholesky factorisation.
``gram(weight, tol, max_steps)``  Gram iteration (Delattre et al., ICML 2023), rounded up.
``power(weight, steps, seed)``    power iteration: an ``estimate``, never an upper bound.
``conv2d(weight, input_hw, ...)`` operator norm of a 2-D convolution on an H×W input: exact
                                  (FFT) for circular padding, a certified bound for zeros.

Helpers for training code (no :class:`Norm`, never a certificate):

``power_iteration(matrix, v, steps)``  the one power-iteration loop: estimates (σ, u, v) of
                                       the top singular triple, warm-startable.
``sigma_max_differentiable(weight)``   σ_max(W) as a differentiable scalar for training
                                       losses (‖W·v₁‖, gradient u₁v₁ᵀ).
``remember_top_vector(weight, v)``,    the top singular vector that a projection has just
``cached_top_vector(weight)``          computed, valid until the weight changes.

Floating-point soundness
------------------------
All certified values are computed in float64 and rounded up by margins derived from the
standard model of IEEE arithmetic, fl(a ∘ b) = (a ∘ b)(1 + δ) + η with |δ| ≤ u = 2⁻⁵³ and
|η| ≤ 2⁻¹⁰⁷⁴ (η only on underflow). Write γ_k = k·u / (1 − k·u) (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., §3.1). The ingredients:

1. **Exact input.** float16, bfloat16 and float32 values are exactly representable in float64,
   so the conversion is exact. The matrix is then multiplied by 2⁻ˢ, with s chosen so that
   max|w_ij| ∈ [1/2, 1); a power-of-two scaling is exact unless a value underflows (possible
   only for float64 input with entries spanning more than ~2¹⁰⁰⁰), which perturbs the matrix
   by at most 2⁻¹⁰⁷⁵ per entry. The result is multiplied back by 2ˢ exactly at the end.
2. **Gram formation.** Each entry of Ĝ = fl(AᵀA), A of size k×n, is a dot product of length
   k; for *any* summation order (blocked BLAS, FMA, threads, row chunks accumulated one after
   another) |Ĝ − G| ≤ γ_k·|A|ᵀ|A| entrywise (Higham (3.5)), so ‖Ĝ − G‖₂ ≤ ‖Ĝ − G‖_F ≤
   γ_k·‖A‖_F² =: ε_G. ``exact`` and ``gram`` compute only the upper triangle (column blocks
   A_Iᵀ·A_{J≥I}: about 60% of the flops of the full product) and mirror it, so Ĝ is exactly
   symmetric and each entry still obeys the bound. ‖A‖_F² comes from the trace: each ĝ_ii
   is a sum of k non-negative terms, so g_ii ≤ ĝ_ii/(1 − γ_k), and fl(Σ_i ĝ_ii) ≥
   (1 − γ_n)·Σ_i ĝ_ii; since (1 − γ_k)(1 − γ_n) ≥ 1 − γ_{k+n}, ‖A‖_F² ≤ fl(tr Ĝ)/(1 − γ_{k+n}).
   For complex matrices (the DFT of a kernel) we use 4·γ_{k+4}, which also covers the 3M
   complex product, and ‖A‖_F² is summed directly: ŝ = fl(Σ a²) ≥ (1 − γ_N)·‖A‖_F² with N
   terms, so ‖A‖_F² ≤ ŝ / (1 − γ_N).
3. **Verified top eigenvalue** (``exact``). ``eigvalsh`` (n ≤ 256) or a Lanczos iteration
   (full reorthogonalisation, seeded start) gives an estimate θ of λ_max(Ĝ); it carries no
   guarantee and is only used to pick a shift μ = θ·(1 + 10⁻⁸·4ʲ), j = 0, 1, … (growing until
   the test below succeeds). Let B̂ = fl(μI − Ĝ): off the diagonal it is exact, on it
   b̂_ii = (μ − ĝ_ii)(1 + δ_i), so B̂ = μI − Ĝ + D with |d_ii| ≤ u/(1 − u)·|b̂_ii| =: ε_D.
   If LAPACK's Cholesky factorisation of B̂ runs to completion (``torch.linalg.cholesky_ex``
   reports info = 0: every pivot was positive and not NaN), the computed factor R̂ satisfies
   R̂ᵀR̂ = B̂ + ΔB with |ΔB| ≤ γ_{n+1}·|R̂ᵀ||R̂| (Higham Thm 10.3). The proof (Lemma 8.4)
   uses only the recurrences that produced R̂, in any order of accumulation, so it covers
   blocked and recursive factorisations built on conventional level-3 BLAS, and it needs no
   prior knowledge that B̂ is positive definite (the argument of Rump, "Verification of
   positive definiteness", BIT 46 (2006)). Then B̂ = R̂ᵀR̂ − ΔB ⪰ −‖ΔB‖₂·I with
   ‖ΔB‖₂ ≤ γ_{n+1}·‖ |R̂| ‖₂² ≤ γ_{n+1}·‖R̂‖_F², and so

       λ_max(G) ≤ λ_max(Ĝ) + ε_G ≤ μ + γ_{n+1}·‖R̂‖_F² + ε_D + ε_G,

   with ‖R̂‖_F² rounded up as in item 2 (its n² terms). The margin over λ_max is about
   10⁻⁸·λ_max (the shift) plus n²·u·λ_max-sized rounding terms. In normalised units
   λ_max ≥ max_i g_ii ≥ 1/4, so underflow inside the factorisation (absolute errors of order
   2⁻¹⁰⁷⁴ per operation) is covered by the 2⁻⁹⁰⁰ of item 5.
4. **Symmetric eigensolver** (``conv2d``, batched complex matrices). LAPACK's
   ``syevd``/``heevd`` (``torch.linalg.eigvalsh``) is backward stable: the computed
   eigenvalues are exact for Ĝ + E with ‖E‖₂ ≤ p(n)·u·‖Ĝ‖₂ (LAPACK Users' Guide §4.7, "p(n) a
   modestly growing function of n"). We take p(n) = 4n² + 64, which dominates both the
   observed O(n) and the classical worst-case O(n²) analyses of Householder
   tridiagonalisation; η := p(n)·u. By Weyl, λ_max(Ĝ) ≤ λ̂ + η‖Ĝ‖₂, and ‖Ĝ‖₂ ≤
   max(λ_max(Ĝ), ε_G) because G is positive semidefinite, so λ_max(Ĝ) ≤ (λ̂⁺ + η·ε_G)/(1 − η)
   and finally

       σ_max(A)² = λ_max(G) ≤ (λ̂⁺ + η·ε_G)/(1 − η) + ε_G.

5. **Final margin.** The certified value is ``(σ_bound · (1 + 1e-10) + 2⁻⁹⁰⁰) · 2ˢ``. The
   relative 1e-10 covers the float64 evaluation of the bound formulas themselves (at most a
   few hundred roundings, < 1e-13) with a wide margin. The absolute 2⁻⁹⁰⁰ (in units where
   max|w| ≥ 1/2) covers every underflow term (each at most (matrix elements)·2⁻¹⁰⁷³, far
   below 2⁻⁹⁰⁰ for anything that fits in memory); it is also added inside λ before the
   square root.

For GPT-2-sized matrices (768×3072, 50257×768) ``exact`` is within about 1e-8 (relative) of
σ_max and several times faster than a float64 SVD: it forms the upper triangle of the Gram
matrix, runs 50–90 Lanczos steps and usually one Cholesky factorisation of an n×n matrix
(n = the shorter side).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lipcert.errors import LipcertError
from lipcert.threads import one_thread

__all__ = [
    "Norm",
    "cached_top_vector",
    "conv2d",
    "exact",
    "gram",
    "power",
    "power_iteration",
    "remember_top_vector",
    "sigma_max_differentiable",
]

Kind = Literal["upper", "estimate", "lower"]
_KINDS = ("upper", "estimate", "lower")

_U = 2.0**-53  # unit roundoff of float64 (round to nearest)
_ABS = 2.0**-900  # absolute margin in normalised units (see module docstring, item 5)
_REL = 1e-10  # final relative margin (see module docstring, item 5)
_CHUNK_ELEMS = 2**22  # float64 elements per chunk when streaming a large matrix (32 MiB)
_DENSE_MAX_ELEMS = 2**25  # largest dense conv matrix for method="dense" (256 MiB float64)
_SMALL_N = 1024  # square iterates up to this size run on one CPU thread (see _one_cpu_thread)
_GRAM_BLOCK = 192  # column block of the upper-triangle Gram product (docstring item 2)
_SHIFT_REL = 1e-8  # first Cholesky shift above the Lanczos estimate (docstring item 3)
_SHIFT_GROWTH = 4.0  # the shift's relative part grows by this factor after a failed test
_SHIFT_TRIES = 40  # 1e-8·4³⁹ > 1e15: past any Lanczos estimate ≥ max_i g_ii ≥ λ_max/n
_LANCZOS_STEPS = 160  # most Lanczos steps (exact, up to rounding, for n ≤ 160)
_LANCZOS_CHECK = 8  # steps between convergence checks
_EIGH_MAX_N = 256  # Gram size up to which eigvalsh gives the shift's estimate
_FALLBACK_POWER_STEPS = 200  # power steps for the shift's estimate if LAPACK's eigensolver fails


@dataclass(frozen=True)
class Norm:
    """An operator norm, tagged with what kind of number it is and how it was made.

    ``kind`` is ``"upper"`` (certified upper bound), ``"estimate"`` (no guarantee) or
    ``"lower"`` (empirical witness); ``method`` names the algorithm, for example
    ``"exact-gram-eigh"``, ``"gram-iteration(t=5)"``, ``"power(50)"``, ``"conv-circular-fft"``
    or ``"conv-zero-pad-bound(fft 34x34)"``.
    """

    value: float
    kind: Kind
    method: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise LipcertError(f"Norm.kind must be one of {_KINDS}, got {self.kind!r}")

    def __float__(self) -> float:
        return float(self.value)


# --------------------------------------------------------------------------- helpers


def _gamma(k: int) -> float:
    """γ_k = k·u / (1 − k·u); refuses sizes where the bound would be meaningless."""
    ku = k * _U
    if ku >= 1e-3:
        raise LipcertError(
            f"spectral: a reduction of {k} terms is too long for the float64 error bound"
        )
    return ku / (1.0 - ku)


def _eta(n: int) -> float:
    """Backward-error factor of the symmetric eigensolver on an n×n matrix: (4n² + 64)·u."""
    return (4.0 * n * n + 64.0) * _U


def _fro2_upper(s_hat: Tensor | float, n_terms: int) -> Tensor | float:
    """Upper bound on ‖A‖_F² from ŝ = fl(Σ|a|²) over ``n_terms`` real squares."""
    return s_hat / (1.0 - _gamma(n_terms)) + _ABS


def _lambda_upper(
    lam_hat: Tensor, fro2_hat: Tensor, k: int, n: int, n_terms: int, is_complex: bool
) -> Tensor:
    """Upper bound on λ_max(AᴴA) from the computed top eigenvalue of the computed Gram matrix.

    ``k`` is the inner (summed) dimension, ``n`` the Gram size, ``fro2_hat`` = fl(‖A‖_F²) from
    ``n_terms`` squares. See the module docstring, items 2 and 4.
    """
    c_g = 4.0 * _gamma(k + 4) if is_complex else _gamma(k)
    eps_g = c_g * _fro2_upper(fro2_hat, n_terms) + _ABS
    eta = _eta(n)
    lam = torch.clamp(lam_hat, min=0.0)
    return (lam + eta * eps_g) / (1.0 - eta) + eps_g + _ABS


def _finalize(sigma_scaled: float, shift: int) -> float:
    """Apply the final margin (docstring item 5) and undo the power-of-two normalisation."""
    try:
        value = math.ldexp(sigma_scaled * (1.0 + _REL) + _ABS, shift)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise LipcertError("spectral: the norm overflows float64 (weights too large)")
    return value


def _as_tensor(x: object, where: str, name: str) -> Tensor:
    if isinstance(x, Tensor):
        t = x.detach()
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise LipcertError(f"{where}: {name} is not a tensor or array ({exc})") from exc
    if t.is_complex() or not t.is_floating_point():
        raise LipcertError(
            f"{where}: {name} must be a real floating-point tensor, got dtype {t.dtype}"
        )
    return t


def _check_finite(t: Tensor, where: str, name: str) -> None:
    """Raise if ``t`` has a NaN or an infinite entry, naming the first one.

    One pass of ``aminmax`` clears a finite tensor (a NaN propagates to both results, an
    infinity shows in one); only a failing tensor gets the element-wise search."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return
    finite = torch.isfinite(t)
    n_nan = int(torch.isnan(t).sum())
    n_inf = int(torch.isinf(t).sum())
    first = tuple(int(i) for i in torch.nonzero(~finite)[0].tolist())
    raise LipcertError(
        f"{where}: {name} has {n_nan} NaN and {n_inf} infinite entries "
        f"(first at index {first}); an operator norm needs finite weights"
    )


def _check_matrix(weight: object, where: str) -> Tensor:
    t = _as_tensor(weight, where, "the weight")
    if t.dim() != 2:
        raise LipcertError(
            f"{where}: expected a 2-D weight matrix, got shape {tuple(t.shape)}"
            " (reshape convolution kernels, or use spectral.conv2d)"
        )
    _check_finite(t, where, "the weight")
    return t


def _shift_of(t: Tensor) -> int | None:
    """s with max|t| ∈ [2^(s−1), 2^s), or None if t is all zero (or empty)."""
    if t.numel() == 0:
        return None
    lo, hi = torch.aminmax(t)
    m = max(-float(lo), float(hi))
    if m == 0.0:
        return None
    return math.frexp(m)[1]


def _scaled64(t: Tensor, shift: int, out: Tensor | None = None) -> Tensor:
    """float64 copy of ``t`` times 2^-shift (exact up to underflow; docstring item 1), written
    into ``out`` (a float64 buffer of t's shape) when given."""
    x = t.to(torch.float64, copy=True) if out is None else out.copy_(t)
    e = -shift
    while e != 0:  # at most two steps: each factor is a normal power of two
        step = max(-1000, min(1000, e))
        x.mul_(2.0**step)
        e -= step
    return x


def _eigvalsh(gram_matrix: Tensor) -> Tensor:
    with one_thread(gram_matrix.device):
        return torch.linalg.eigvalsh(gram_matrix)


def _gram_and_fro(t: Tensor, shift: int) -> tuple[Tensor, float, int, int]:
    """Ĝ = fl(AᵀA) of the smaller side of A = 2^-shift·t, and an upper bound on ‖A‖_F².

    Returns (Ĝ, ‖A‖_F² bound, k = inner dimension, n = Gram size). A is streamed in row
    chunks through one float64 buffer; only the upper triangle is computed, by column
    blocks, then mirrored (docstring item 2). Chunks and blocks only change the summation
    order, which the γ_k bound allows; the norm bound comes from the trace of Ĝ.
    """
    a = t if t.shape[0] >= t.shape[1] else t.T
    k, n = a.shape
    rows = min(k, max(1, _CHUNK_ELEMS // max(1, n)))
    G = torch.zeros(n, n, dtype=torch.float64, device=t.device)
    buf = torch.empty(rows * n, dtype=torch.float64, device=t.device)
    for r in range(0, k, rows):
        src = a[r : r + rows]
        c = _scaled64(src, shift, buf[: src.numel()].view(src.shape))
        for i in range(0, n, _GRAM_BLOCK):
            j = min(n, i + _GRAM_BLOCK)
            G[i:j, i:].addmm_(c[:, i:j].T, c[:, i:])
    upper = G.triu()
    G = upper + upper.triu(1).T
    fro2_up = float(_fro2_upper(float(G.diagonal().sum()), k + n))
    return G, fro2_up, k, n


def _lanczos_top(gram_matrix: Tensor) -> float:
    """An estimate (no guarantee) of λ_max of the symmetric matrix Ĝ: the largest Ritz value
    of a Lanczos iteration with full reorthogonalisation (classical Gram–Schmidt, twice)
    from a seeded Gaussian start.

    Every ``_LANCZOS_CHECK`` steps it stops if the Ritz value moved by less than 1e-10
    (relative) since the last check or its residual β_j·|s_j| (s the Ritz vector's last
    component) is below 1e-10 of it; also on breakdown (an invariant subspace: the Ritz
    values are eigenvalues) or after ``_LANCZOS_STEPS`` steps. Ritz values never exceed
    λ_max in exact arithmetic; :func:`_verified_lambda_max` makes the result rigorous.
    """
    G = gram_matrix
    n = G.shape[0]
    m = min(n, _LANCZOS_STEPS)
    gen = torch.Generator().manual_seed(0)
    Q = torch.empty(m + 1, n, dtype=torch.float64, device=G.device)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(G.device)
    Q[0] = q / torch.linalg.vector_norm(q)
    w = torch.empty(n, dtype=torch.float64, device=G.device)
    alpha: list[float] = []
    beta: list[float] = []
    theta = -math.inf
    tiny = 1e-14 * float(G.diagonal().abs().max())
    with one_thread(G.device):
        for j in range(m):
            torch.mv(G, Q[j], out=w)
            basis = Q[: j + 1]
            h = basis @ w
            alpha.append(float(h[j]))
            w.addmv_(basis.T, h, alpha=-1.0)
            w.addmv_(basis.T, basis @ w, alpha=-1.0)
            b = float(torch.linalg.vector_norm(w))
            done = j + 1 == m or b <= tiny
            if done or (j + 1) % _LANCZOS_CHECK == 0:
                T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
                if beta:
                    off = torch.tensor(beta, dtype=torch.float64)
                    T += torch.diag(off, 1) + torch.diag(off, -1)
                vals, vecs = torch.linalg.eigh(T)
                new = float(vals[-1])
                resid = b * abs(float(vecs[-1, -1]))
                done = done or resid <= 1e-10 * new or new - theta <= 1e-10 * new
                theta = new
                if done:
                    break
            beta.append(b)
            torch.div(w, b, out=Q[j + 1])
    return theta


def _top_estimate(gram_matrix: Tensor) -> float:
    """θ ≈ λ_max(Ĝ), only to steer the Cholesky shift: the largest eigenvalue from
    ``eigvalsh`` for Gram matrices up to ``_EIGH_MAX_N`` (faster there than Lanczos' Python
    loop), a Lanczos estimate above that. Should LAPACK's eigensolver fail (it reports a
    convergence failure as an error), ``_FALLBACK_POWER_STEPS`` power-iteration steps on Ĝ
    give θ instead: any θ is sound, since the Cholesky test alone certifies the result, and a
    rougher θ only costs more shifts and a looser (still verified) value."""
    try:
        if gram_matrix.shape[0] <= _EIGH_MAX_N:
            with one_thread(gram_matrix.device):
                return float(torch.linalg.eigvalsh(gram_matrix)[-1])
        return _lanczos_top(gram_matrix)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        gen = torch.Generator().manual_seed(0)
        start = torch.randn(gram_matrix.shape[0], generator=gen, dtype=torch.float64)
        with one_thread(gram_matrix.device):
            theta, _, _ = power_iteration(
                gram_matrix, start.to(gram_matrix.device), _FALLBACK_POWER_STEPS
            )
        return theta


def _verified_lambda_max(gram_matrix: Tensor, theta: float) -> float:
    """A rigorous upper bound on λ_max(Ĝ) for the symmetric float64 matrix Ĝ, from
    Cholesky factorisations of fl(μI − Ĝ) with μ = θ·(1 + 1e-8·4ʲ), j = 0, 1, …: the first
    that runs to completion proves λ_max(Ĝ) ≤ μ + γ_{n+1}·‖R̂‖_F² + ε_D (module docstring,
    item 3). ``theta`` (an estimate) only steers μ; it is raised to max_i ĝ_ii, a
    lower bound on λ_max, so every μ is positive.
    """
    G = gram_matrix
    n = G.shape[0]
    theta = max(float(G.diagonal().max()), theta)
    B = torch.empty_like(G)
    with one_thread(G.device):
        for j in range(_SHIFT_TRIES):
            mu = theta * (1.0 + _SHIFT_REL * _SHIFT_GROWTH**j)
            torch.neg(G, out=B)
            B.diagonal().add_(mu)
            R, info = torch.linalg.cholesky_ex(B)
            if int(info) != 0:
                continue
            r2 = float((R * R).sum())
            if not math.isfinite(r2):
                continue
            eps_d = _U / (1.0 - _U) * float(B.diagonal().abs().max())
            return mu + _gamma(n + 1) * float(_fro2_upper(r2, n * n)) + eps_d + _ABS
    raise LipcertError(
        f"spectral: no Cholesky shift verified the top eigenvalue of a {n}x{n} Gram matrix"
    )


def _sigma_upper_batched(mats: Tensor) -> Tensor:
    """Upper bounds on σ_max of each matrix in ``M`` (float64 or complex128, shape [..., m, n]).

    No final margin applied (the caller does that once). Docstring items 2 and 4.
    """
    M = mats
    m, n = M.shape[-2:]
    is_complex = M.is_complex()
    small = one_thread(M.device) if m * n <= _SMALL_N**2 else nullcontext()
    with small:  # batches of small products: one thread is faster, and far faster on busy cores
        G = M.mH @ M if m >= n else M @ M.mH
    k, size = (m, n) if m >= n else (n, m)
    if is_complex:
        fro2 = (M.real * M.real + M.imag * M.imag).sum(dim=(-2, -1))
        n_terms = 2 * m * n
    else:
        fro2 = (M * M).sum(dim=(-2, -1))
        n_terms = m * n
    lam_hat = _eigvalsh(G)[..., -1]
    lam_up = _lambda_upper(lam_hat, fro2, k, size, n_terms, is_complex)
    return torch.sqrt(lam_up + _ABS)


# --------------------------------------------------------------------------- matrices


def exact(weight: Tensor) -> Norm:
    """Certified σ_max(W) from the smaller float64 Gram matrix, verified by Cholesky.

    ``weight`` (W) is a real 2-D tensor (float16, bfloat16, float32 or float64; any device,
    a ``Parameter`` or an array). The result is ``Norm(kind="upper",
    method="exact-gram-cholesky")``: a sound upper bound on the largest singular value of W
    *as stored*, within about 1e-8 (relative) of it.

    Method (module docstring, items 1–3 and 5): scale W exactly by a power of two so that
    max|w| ∈ [1/2, 1); form the upper triangle of Ĝ = fl(WᵀW) (or WWᵀ, whichever is smaller,
    n×n) in float64 and mirror it; estimate θ ≈ λ_max(Ĝ) (eigvalsh up to n = 256, Lanczos
    above); find the first shift μ = θ·(1 + 1e-8·4ʲ) for which the Cholesky factorisation
    of fl(μI − Ĝ) succeeds; return

        σ ≤ sqrt(μ + γ_{n+1}·‖R̂‖_F² + ε_D + ε_G + 3·2⁻⁹⁰⁰) · (1 + 1e-10) + 2⁻⁹⁰⁰     (× 2ˢ)

    with R̂ the computed Cholesky factor, ε_D = u/(1 − u)·max_i|b̂_ii| (rounding of μ − ĝ_ii),
    ε_G = γ_k·‖W‖_F² (Gram rounding, k = the longer dimension), u = 2⁻⁵³. The Lanczos
    estimate carries no guarantee; the Cholesky test does (Higham, Thm 10.3).
    """
    where = "spectral.exact"
    t = _check_matrix(weight, where)
    shift = _shift_of(t)
    if shift is None:
        return Norm(0.0, "upper", "exact-gram-cholesky")
    G, fro2_up, k, _ = _gram_and_fro(t, shift)
    eps_g = _gamma(k) * fro2_up + _ABS
    lam_up = _verified_lambda_max(G, _top_estimate(G)) + eps_g
    sigma = math.sqrt(lam_up + _ABS)
    return Norm(_finalize(sigma, shift), "upper", "exact-gram-cholesky")


def gram(weight: Tensor, tol: float = 1e-3, max_steps: int = 32) -> Norm:
    """Certified σ_max(W) by Gram iteration (Delattre, Barthélemy, Araujo, Allauzen, ICML 2023).

    G₀ = W, G_{t+1} = G_tᵀG_t; then σ_max(W) ≤ ‖G_t‖_F^(1/2^t) at every step t, and the bound
    never increases with t. It stops after the first step whose bound changed by less than
    ``tol`` (relative) or after ``max_steps`` steps, and returns the smallest bound seen as
    ``Norm(kind="upper", method="gram-iteration(t=T)")`` (", not converged" is appended if
    ``max_steps`` ran out first).

    **Accuracy on stopping.** With ρ_t = ‖G_t‖_F / σ^(2^t) = (Σ_i (σ_i/σ_1)^(2^(t+1)))^(1/2),
    ρ_t is non-increasing, so log(b_{t+1}/σ) = log ρ_{t+1}/2^(t+1) ≤ log(b_t/b_{t+1}). Hence
    when the step's relative change is below ``tol``, the bound is within ``tol`` of σ_max
    (relative), up to the float64 margins below.

    **Rescaling.** The iterates are rescaled by exact powers of two, A_t = 2^(−e_t)·fl(A_{t−1}ᵀ
    A_{t−1}) with ‖A_t‖_F ∈ [1/2, 1), so nothing overflows; the scales are tracked exactly.

    **Rounding.** Step t's product has error ‖E_t‖₂ ≤ ε_t = γ_k·‖A_{t−1}‖_F² + 2⁻⁹⁰⁰ (k its inner
    dimension; module docstring item 2). Since σ(A_{t−1})² = ‖A_{t−1}ᵀA_{t−1}‖₂ ≤
    2^(e_t)·σ(A_t) + ε_t, the certified bound after T steps is the backward recursion
    U_T = ‖A_T‖_F (rounded up, item 2), U_{t−1} = sqrt(2^(e_t)·U_t + ε_t), σ(W) ≤ U_0·2ˢ; the
    final margin (1 + 1e-10), + 2⁻⁹⁰⁰ of item 5 covers evaluating this recursion in float64.
    """
    where = "spectral.gram"
    t = _check_matrix(weight, where)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise LipcertError(f"{where}: tol must be a finite number ≥ 0, got {tol!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise LipcertError(f"{where}: max_steps must be an integer ≥ 0, got {max_steps!r}")
    shift = _shift_of(t)
    if shift is None:
        return Norm(0.0, "upper", "gram-iteration(t=0)")

    P, fro2_prev_up, k, n = _gram_and_fro(t, shift)  # first product, computed in row chunks
    bounds = [math.sqrt(fro2_prev_up)]  # t = 0: ‖W‖_F
    levels: list[tuple[int, float]] = []
    A: Tensor | None = None
    steps = 0
    converged = max_steps == 0
    # The square steps are small gemms: one thread is faster, and far faster on busy cores.
    small = one_thread(P.device) if n <= _SMALL_N else nullcontext()
    with small:
        while steps < max_steps:
            if A is not None:  # after the first step: square n×n iterates
                P = A.T @ A
                k = n
            eps = _gamma(k) * fro2_prev_up + _ABS
            fP = float(torch.linalg.vector_norm(P))
            e = math.frexp(fP)[1]
            A = _scaled64(P, e)
            fro2_prev_up = float(_fro2_upper(float((A * A).sum()), n * n))
            levels.append((e, eps))
            steps += 1
            U = math.sqrt(fro2_prev_up)
            for e_j, eps_j in reversed(levels):
                U = math.sqrt(math.ldexp(U, e_j) + eps_j)
            prev = bounds[-1]
            bounds.append(U)
            if prev - U < tol * U:
                converged = True
                break
    method = f"gram-iteration(t={steps}{'' if converged else ', not converged'})"
    return Norm(_finalize(min(bounds), shift), "upper", method)


def power(weight: Tensor, steps: int = 100, seed: int = 0) -> Norm:
    """Power iteration on WᵀW in float64 from a seeded Gaussian start: an *estimate* of σ_max.

    Returns ‖Wv‖/‖v‖ for the final iterate v, which never exceeds σ_max in exact arithmetic
    (it approaches it from below). It is never a certificate: ``kind="estimate"``,
    ``method="power(steps)"``.
    """
    where = "spectral.power"
    t = _check_matrix(weight, where)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LipcertError(f"{where}: steps must be an integer ≥ 1, got {steps!r}")
    method = f"power({steps})"
    shift = _shift_of(t)
    if shift is None:
        return Norm(0.0, "estimate", method)
    A = _scaled64(t if t.shape[0] >= t.shape[1] else t.T, shift)
    gen = torch.Generator(device=A.device).manual_seed(int(seed))
    v = torch.randn(A.shape[1], generator=gen, dtype=torch.float64, device=A.device)
    small = one_thread(A.device) if A.numel() <= _SMALL_N**2 else nullcontext()
    with small:
        est, _, _ = power_iteration(A, v, steps)
    try:
        value = math.ldexp(est, shift)
    except OverflowError:
        raise LipcertError(f"{where}: the norm overflows float64 (weights too large)") from None
    return Norm(value, "estimate", method)


def power_iteration(matrix: Tensor, v: Tensor, steps: int) -> tuple[float, Tensor, Tensor]:
    """Estimates (σ, u, v) of the top singular triple of ``matrix`` A by power iteration.

    From the start vector v (normalised first), each of ``steps`` steps computes
    u ← Av/‖Av‖, v ← Aᵀu/‖Aᵀu‖ (norms clamped below at 1e-30), i.e. one normalised
    product with AᵀA. It returns σ = ‖Av‖ for the final v, u = Av/σ (zero if σ = 0) and v,
    in the dtype and on the device of A and v. Pass the v of a previous call to warm-start.

    By Cauchy–Schwarz σ = ‖Av‖ ≤ σ_max(A) for a unit v in exact arithmetic, and σ rises
    towards σ_max like 1 − O((σ₂/σ₁)^(2·steps)); a start orthogonal to the top singular
    space stays there (σ then estimates a lower singular value). It is never a certificate.
    This is the one power-iteration loop of lipcert's matrix code (``power`` here, the spectral
    hammer constraint); ``exact`` and ``gram`` give certified values.
    """
    v = v / v.norm().clamp_min(1e-30)
    for _ in range(steps):
        u = matrix @ v
        u = u / u.norm().clamp_min(1e-30)
        v = matrix.mT @ u
        v = v / v.norm().clamp_min(1e-30)
    u = matrix @ v
    sigma = float(u.norm())
    return sigma, (u / sigma if sigma > 0.0 else u), v


# --------------------------------------------------------------------------- training helpers


def remember_top_vector(weight: Tensor, top: Tensor) -> None:
    """Record ``top``, the unit top eigenvector (float64) of ``weight``'s smaller Gram matrix,
    for :func:`cached_top_vector`, stamped with ``weight``'s version counter."""
    weight._lipcert_top_vector = (weight._version, top)  # type: ignore[attr-defined]


def cached_top_vector(weight: Tensor) -> Tensor | None:
    """The vector :func:`remember_top_vector` recorded for ``weight``, or ``None`` if
    ``weight`` was modified in place since (its version counter moved) or never recorded.

    It is the unit top eigenvector of the smaller Gram matrix (``WᵀW`` for a tall weight: its
    top right singular vector; ``WWᵀ`` for a wide one: its top left singular vector), so
    ``‖W v‖`` (tall) or ``‖vᵀ W‖`` (wide) is σ_max(W) without another eigendecomposition.
    The exact spectral cap records it: clipping singular values keeps the singular vectors.
    """
    cached = getattr(weight, "_lipcert_top_vector", None)
    if cached is None or cached[0] != weight._version:
        return None
    return cached[1]


def sigma_max_differentiable(weight: Tensor) -> Tensor:
    """σ_max(W) as a differentiable scalar, for training losses: an *estimate*, never a
    certificate (certified values come from :func:`exact`).

    σ_max(W) = ‖W v₁‖ for a tall W (v₁ its top right singular vector) and ‖u₁ᵀW‖ for a wide
    one (u₁ its top left singular vector); the vector is found without gradient as the top
    eigenvector of the smaller float64 Gram matrix, or taken from :func:`cached_top_vector`
    when a projection has just computed it. As a function of W with the vector held fixed,
    the value has gradient u₁v₁ᵀ, the gradient of σ_max wherever σ₁ > σ₂. It is evaluated
    in W's dtype, so it can lie below σ_max by that dtype's rounding (about 1e-7 relative in
    float32). (``torch.linalg.matrix_norm(ord=2)`` would run an SVD, which fails to converge
    on the nearly-orthogonal matrices that Muon produces.)
    """
    tall = weight.shape[0] >= weight.shape[1]
    with torch.no_grad():
        top = cached_top_vector(weight)
        if top is None:
            w = weight.detach().double()
            top = torch.linalg.eigh(w.mT @ w if tall else w @ w.mT).eigenvectors[:, -1]
        top = top.to(weight.dtype)
    return torch.linalg.vector_norm(weight @ top if tall else top @ weight)


# --------------------------------------------------------------------------- convolutions


def _pair(x: object, where: str, name: str, minimum: int) -> tuple[int, int]:
    vals = (x, x) if isinstance(x, int) and not isinstance(x, bool) else x
    if (
        not isinstance(vals, Sequence)
        or len(vals) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in vals)
        or min(vals) < minimum
    ):
        raise LipcertError(
            f"{where}: {name} must be an int or a pair of ints ≥ {minimum}, got {x!r}"
        )
    return int(vals[0]), int(vals[1])


def _conv_selection(n_in: int, k_eff: int, pad_lo: int, pad_hi: int, stride: int) -> range:
    """Indices (stride 1, circular frame) of the outputs of one spatial dimension."""
    n_out = (n_in + pad_lo + pad_hi - k_eff) // stride + 1
    return range(0, stride * n_out, stride) if n_out > 0 else range(0)


def conv2d(
    weight: Tensor,
    input_hw: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    padding_mode: Literal["zeros", "circular"] = "zeros",
    *,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    method: Literal["auto", "fft", "dense"] = "auto",
) -> Norm:
    """Certified operator norm (ℓ2 → ℓ2) of ``torch.nn.functional.conv2d`` on a C×H×W input.

    Arguments follow ``torch.nn.Conv2d``: ``weight`` of shape (c_out, c_in/groups, kh, kw);
    ``padding`` an int, a pair, ``"same"`` (stride 1) or ``"valid"``; ``padding_mode``
    ``"zeros"`` or ``"circular"``. A bias does not change the Lipschitz constant.

    **method="fft"** (the default, ``"auto"``). For a kernel K, a grid N_h×N_w and a frequency
    f, let M(f) = Σ_{a,b} K[:, :, a, b]·exp(2πi(a·d_h·f_h/N_h + b·d_w·f_w/N_w)), a c_out×c_in
    complex matrix. The circular (wrap-around) stride-1 convolution on that grid is unitarily
    block-diagonalised by the 2-D DFT, so its operator norm is exactly max_f σ_max(M(f))
    (Sedghi, Gupta, Long, ICLR 2019; taps beyond the grid alias onto it, which M(f) does by
    itself). Half of the frequencies suffice, since M(−f) = conj(M(f)).

    * ``circular``: PyTorch's circular convolution reads output (i, j) from circular position
      (i·s_h − p_top mod H, j·s_w − p_left mod W), so it is R·C with C the circular
      convolution on the H×W grid and R a row selection. If R is a bijection (stride 1 and
      output size = input size, e.g. ``padding=k//2`` for odd k, or ``"same"``), the norm is
      exactly ‖C‖: ``method="conv-circular-fft"``. Otherwise (strides, crops, or outputs that
      wrap twice) ‖R·C‖ ≤ sqrt(max multiplicity of a position in R)·‖C‖:
      ``method="conv-circular-fft-bound"``.
    * ``zeros``: per spatial dimension (size n, dilation d, padding p_lo on the low side),
      first drop the kernel taps that never read the input for any kept output (this does not
      change the operator; it matters for inputs smaller than the kernel). With the remaining
      taps (extent k_e = d·(a_hi − a_lo) + 1, offset p = p_lo − d·a_lo), stride-1 output i is
      y[i − p] of the full linear correlation y[j] = Σ_a K[a]·x[j + d·a], which vanishes outside
      j ∈ [−(k_e − 1), n − 1]; the kept outputs are distinct entries of y for j in
      J = [j_lo, j_hi] (the kept range, clipped to that interval). Circular correlation on a
      grid of N points, with x zero-extended to N, computes y[j] for every j ∈ J exactly if
      the positions it reads outside [0, n), namely [j_lo, −1] and [n, j_hi + k_e − 1], never
      wrap into [0, n): N ≥ max(n, n − j_lo, j_hi + k_e). (For 'same' padding of a 3-tap kernel
      this is N = n + 1: one zero separates the two ends.) So the convolution is R·C_N·E with E
      an isometry and R a selection of distinct rows, and ‖conv‖ ≤ ‖C_N‖. A strided convolution
      keeps a subset of the stride-1 outputs, so the bound holds for every stride.
      ``method="conv-zero-pad-bound(fft NhxNw)"``.
    * Groups: the operator is block diagonal over groups, so the norm is the max over groups.

    Rounding (module docstring): M̂(f) is computed in float64 as real matrix products with
    twiddles cos θ, sin θ, θ = 2π·q/(N_h·N_w) for an exactly reduced integer q; each twiddle
    component has error ≤ γ₃·2π + 1 ulp ≤ 21u (we allow 64u), so
    |M̂(f) − M(f)| ≤ δ·A entrywise with A_{oc} = Σ_{a,b}|K_{ocab}| and δ = 2(64u + γ_S),
    S = kh·kw, hence ‖M̂(f) − M(f)‖₂ ≤ δ·‖A‖_F (we add 2δ‖Â‖_F). Each σ_max(M̂(f)) is bounded
    as in ``exact`` with complex Gram matrices; the final margin is applied once.

    **method="dense"** materialises the convolution as a float64 matrix (≤ 2²⁵ entries per
    group) and bounds its σ_max as ``exact`` does (``method="conv-dense-exact"``): exact for
    any padding and stride. Where taps alias onto the same entry their float64 sum is rounded;
    that error is bounded by γ_S times the Frobenius norm of the matrix of |K| and added.
    """
    where = "spectral.conv2d"
    K = _as_tensor(weight, where, "the weight")
    if K.dim() != 4:
        raise LipcertError(
            f"{where}: expected a weight of shape (c_out, c_in/groups, kh, kw), "
            f"got {tuple(K.shape)}"
        )
    _check_finite(K, where, "the weight")
    H, Wd = _pair(input_hw, where, "input_hw", 1)
    sh, sw = _pair(stride, where, "stride", 1)
    dh, dw = _pair(dilation, where, "dilation", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise LipcertError(f"{where}: groups must be an integer ≥ 1, got {groups!r}")
    c_out, _, kh, kw = K.shape
    if c_out % groups:
        raise LipcertError(f"{where}: c_out={c_out} is not divisible by groups={groups}")
    if padding_mode not in ("zeros", "circular"):
        raise LipcertError(
            f"{where}: padding_mode must be 'zeros' or 'circular', got {padding_mode!r}"
            " (reflect/replicate padding is not supported)"
        )
    if method not in ("auto", "fft", "dense"):
        raise LipcertError(f"{where}: method must be 'auto', 'fft' or 'dense', got {method!r}")
    keh, kew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if padding == "valid":
        pads = ((0, 0), (0, 0))
    elif padding == "same":
        if (sh, sw) != (1, 1):
            raise LipcertError(f"{where}: padding='same' needs stride 1 (as in PyTorch)")
        pads = (
            ((keh - 1) // 2, keh - 1 - (keh - 1) // 2),
            ((kew - 1) // 2, kew - 1 - (kew - 1) // 2),
        )
    elif isinstance(padding, str):
        raise LipcertError(f"{where}: padding must be an int, a pair, 'same' or 'valid'")
    else:
        ph, pw = _pair(padding, where, "padding", 0)
        pads = ((ph, ph), (pw, pw))
    rows_h = _conv_selection(H, keh, *pads[0], sh)
    rows_w = _conv_selection(Wd, kew, *pads[1], sw)
    if len(rows_h) == 0 or len(rows_w) == 0:
        raise LipcertError(
            f"{where}: the kernel ({kh}x{kw}, dilation {dh}x{dw}) does not fit the padded "
            f"input {H}x{Wd}: the output would be empty"
        )
    if K.numel() == 0:
        return Norm(0.0, "upper", "conv-empty")

    shift = _shift_of(K)
    if method == "dense":
        if shift is None:
            return Norm(0.0, "upper", "conv-dense-exact")
        sigma = _conv_dense_sigma(
            K, shift, (H, Wd), (sh, sw), pads, (dh, dw), groups, padding_mode, where
        )
        return Norm(_finalize(sigma, shift), "upper", "conv-dense-exact")

    if padding_mode == "circular":
        grid = (H, Wd)
        mult = 1
        bijective = True
        for n_in, pad_lo, sel in ((H, pads[0][0], rows_h), (Wd, pads[1][0], rows_w)):
            counts = [0] * n_in
            for i in sel:
                counts[(i - pad_lo) % n_in] += 1
            mult *= max(counts)
            bijective = bijective and min(counts) == 1 and max(counts) == 1
        name = "conv-circular-fft" if bijective else "conv-circular-fft-bound"
    else:
        plan_h = _zero_pad_plan(H, kh, dh, pads[0][0], rows_h)
        plan_w = _zero_pad_plan(Wd, kw, dw, pads[1][0], rows_w)
        if plan_h is None or plan_w is None:  # every output reads only padding
            return Norm(0.0, "upper", "conv-zero-pad-bound(no taps reach the input)")
        (ah0, ah1, nh), (aw0, aw1, nw) = plan_h, plan_w
        K = K[:, :, ah0 : ah1 + 1, aw0 : aw1 + 1]
        grid = (nh, nw)
        mult = 1
        name = f"conv-zero-pad-bound(fft {nh}x{nw})"
        shift = _shift_of(K)
    if shift is None:
        return Norm(0.0, "upper", name)
    sigma = _conv_fft_sigma(K, shift, grid, (dh, dw), groups)
    if mult > 1:
        sigma *= math.sqrt(mult)
    return Norm(_finalize(sigma, shift), "upper", name)


def _zero_pad_plan(n_in: int, k: int, d: int, p_lo: int, sel: range) -> tuple[int, int, int] | None:
    """(first tap, last tap, grid size N) for the zero-padding bound; see ``conv2d``."""
    i_min, i_max = sel[0], sel[-1]
    used = [a for a in range(k) if p_lo - i_max <= d * a <= p_lo + n_in - 1 - i_min]
    if not used:
        return None
    a_lo, a_hi = used[0], used[-1]
    k_e = d * (a_hi - a_lo) + 1
    p = p_lo - d * a_lo
    j_lo = max(i_min - p, -(k_e - 1))
    j_hi = min(i_max - p, n_in - 1)
    return a_lo, a_hi, max(n_in, n_in - j_lo, j_hi + k_e)


def _conv_fft_sigma(
    kernel: Tensor, shift: int, grid: tuple[int, int], dil: tuple[int, int], groups: int
) -> float:
    """max_f σ_max(M(f)) over the grid's frequencies, rounded up, in normalised units."""
    K = kernel
    Nh, Nw = grid
    c_out, c_in_g, kh, kw = K.shape
    dev = K.device
    Ks = _scaled64(K, shift).reshape(groups, c_out // groups, c_in_g, kh * kw)
    S = kh * kw
    P = Ks.shape[0] * Ks.shape[1] * Ks.shape[2]
    Kflat = Ks.reshape(P, S)
    # Error of the DFT entries (docstring): δ·‖A‖_F, with a factor 2 for computing ‖A‖_F.
    A = Kflat.abs().sum(dim=1)
    delta = 2.0 * (64.0 * _U + _gamma(S))
    d = 2.0 * delta * float(torch.linalg.vector_norm(A))
    # Integer phases q = (a·d_h·f_h mod Nh)·Nw + (b·d_w·f_w mod Nw)·Nh  (mod Nh·Nw), exactly.
    a = torch.arange(kh, device=dev).repeat_interleave(kw) * dil[0]  # tap index s -> row
    b = torch.arange(kw, device=dev).repeat(kh) * dil[1]
    fh = torch.arange(Nh, device=dev).repeat_interleave(Nw // 2 + 1)
    fw = torch.arange(Nw // 2 + 1, device=dev).repeat(Nh)
    n_freq = fh.numel()
    per_chunk = max(1, 2**21 // max(1, P))
    best = 0.0
    for f0 in range(0, n_freq, per_chunk):
        fhc, fwc = fh[f0 : f0 + per_chunk], fw[f0 : f0 + per_chunk]
        q = ((a[:, None] * fhc[None, :]) % Nh) * Nw + ((b[:, None] * fwc[None, :]) % Nw) * Nh
        theta = (2.0 * math.pi / (Nh * Nw)) * (q % (Nh * Nw)).to(torch.float64)
        re = Kflat @ torch.cos(theta)  # (P, F_chunk)
        im = Kflat @ torch.sin(theta)
        M = torch.complex(re, im).reshape(groups, c_out // groups, c_in_g, -1)
        M = M.permute(3, 0, 1, 2)  # (F_chunk, groups, c_out/g, c_in/g)
        sig = _sigma_upper_batched(M)
        best = max(best, float(sig.max()))
    return best + d


def _conv_dense_sigma(
    kernel: Tensor,
    shift: int,
    hw: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[tuple[int, int], tuple[int, int]],
    dil: tuple[int, int],
    groups: int,
    padding_mode: str,
    where: str,
) -> float:
    """σ_max upper bound of the materialised convolution matrix, in normalised units."""
    K = kernel
    H, Wd = hw
    c_out, c_in_g, kh, kw = K.shape
    dev = K.device
    rows_h = torch.tensor(list(_conv_selection(H, dil[0] * (kh - 1) + 1, *pads[0], stride[0])))
    rows_w = torch.tensor(list(_conv_selection(Wd, dil[1] * (kw - 1) + 1, *pads[1], stride[1])))
    Ho, Wo = len(rows_h), len(rows_w)
    co = c_out // groups
    if Ho * Wo * co * H * Wd * c_in_g > _DENSE_MAX_ELEMS:
        raise LipcertError(
            f"{where}: method='dense' would build a {Ho * Wo * co}x{H * Wd * c_in_g} matrix; "
            "use method='fft' for layers this large"
        )
    Ks = _scaled64(K, shift)
    ii, jj = torch.meshgrid(torch.arange(Ho), torch.arange(Wo), indexing="ij")
    ii, jj = ii.reshape(-1), jj.reshape(-1)
    best = 0.0
    for g in range(groups):
        Kg = Ks[g * co : (g + 1) * co]
        D = torch.zeros(Ho, Wo, H, Wd, co, c_in_g, dtype=torch.float64, device=dev)
        Dabs = torch.zeros_like(D)
        for ta in range(kh):
            for tb in range(kw):
                U = rows_h[ii] + ta * dil[0] - pads[0][0]
                V = rows_w[jj] + tb * dil[1] - pads[1][0]
                if padding_mode == "circular":
                    U, V = U % H, V % Wd
                    keep = torch.ones_like(U, dtype=torch.bool)
                else:
                    keep = (U >= 0) & (U < H) & (V >= 0) & (Wd > V)
                idx = (ii[keep].to(dev), jj[keep].to(dev), U[keep].to(dev), V[keep].to(dev))
                n_keep = int(keep.sum())
                if n_keep == 0:
                    continue
                val = Kg[:, :, ta, tb].expand(n_keep, co, c_in_g)
                D.index_put_(idx, val, accumulate=True)
                Dabs.index_put_(idx, val.abs(), accumulate=True)
        mat = D.reshape(Ho * Wo, H * Wd, co, c_in_g).permute(0, 2, 1, 3)
        mat = mat.reshape(Ho * Wo * co, H * Wd * c_in_g)
        sig = float(_sigma_upper_batched(mat))
        # Aliased taps summed in float64: per entry error ≤ γ_S·Σ|K| (factor 2 for ‖Dabs‖_F).
        d = 2.0 * _gamma(kh * kw) * float(torch.linalg.vector_norm(Dabs))
        best = max(best, sig + d)
    return best
