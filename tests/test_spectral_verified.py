"""lipcert.spectral.exact: the Lanczos estimate + Cholesky verification of λ_max(WᵀW).

The value must be a rigorous upper bound on σ_max (checked against float64 SVD, and against
exactly summed Gram matrices) and within 1e-7 of it, for random and structured matrices:
clustered and tied top singular values, tiny and rank-deficient matrices, zero matrices, flat
spectra and extreme scales; the verification must stay sound when the estimate is wrong.
"""

from __future__ import annotations

import math

import pytest
import torch

from lipcert import spectral

F64 = torch.float64
TIGHT = 1e-7  # the shift is θ·(1 + 1e-8), so σ is overestimated by about 5e-9


def _sigma(w: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(w.detach().to(F64))[0])


def _with_spectrum(m: int, n: int, sv: list[float] | torch.Tensor, seed: int) -> torch.Tensor:
    """A float64 m×n matrix U·diag(sv)·Vᵀ with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    s = torch.as_tensor(sv, dtype=F64)
    u, _ = torch.linalg.qr(torch.randn(m, s.numel(), generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, s.numel(), generator=g, dtype=F64))
    return (u * s) @ v.T


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2024)
    near = 1.0 + 1e-12 * torch.arange(6, dtype=F64)
    return {
        "1x1": torch.tensor([[0.3]]),
        "1x1-negative-f64": torch.tensor([[-7.25]], dtype=F64),
        "1x9": torch.randn(1, 9, generator=g),
        "9x1": torch.randn(9, 1, generator=g),
        "2x2": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "3x7": torch.randn(3, 7, generator=g),
        "single-entry": torch.zeros(20, 30).index_put_((torch.tensor([4]), torch.tensor([17])),
                                                       torch.tensor([-2.5])),
        "integers": torch.randint(-3, 4, (40, 25), generator=g).float(),
        "random-square": torch.randn(120, 120, generator=g),
        "random-tall": torch.randn(700, 90, generator=g),
        "random-wide": torch.randn(60, 500, generator=g),
        "rank-1": torch.outer(torch.randn(90, generator=g), torch.randn(70, generator=g)),
        "rank-3": _with_spectrum(100, 80, [5.0, 1.0, 0.25], 1).float(),
        "two-tied": _with_spectrum(80, 60, [3.0, 3.0, 1.0, 0.5], 2),
        "five-tied": _with_spectrum(80, 70, [2.0] * 5 + [1.9, 0.3], 3),
        "near-tied-1e-12": _with_spectrum(90, 90, torch.cat([near, torch.rand(40, dtype=F64)]), 4),
        "cluster-1e-9": _with_spectrum(
            200, 180, torch.cat([1 + 1e-9 * torch.rand(30, dtype=F64), 0.999 * torch.rand(150,
                                 dtype=F64)]), 5),
        "flat-orthogonal": _with_spectrum(64, 64, [1.0] * 64, 6),
        "identity": torch.eye(33),
        "slow-decay": _with_spectrum(300, 200, torch.linspace(1.0, 0.99, 200, dtype=F64), 7),
        "ill-conditioned": _with_spectrum(150, 100, torch.logspace(0, -14, 100, dtype=F64), 8),
        "tiny-scale-f64": 1e-290 * torch.randn(30, 20, generator=g, dtype=F64),
        "huge-scale-f64": 1e290 * torch.randn(20, 30, generator=g, dtype=F64),
        "wide-range-f64": torch.randn(25, 25, generator=g, dtype=F64)
        * torch.logspace(-200, 200, 25, dtype=F64),
        "float16": torch.randn(50, 40, generator=g).half(),
        "bfloat16": torch.randn(40, 50, generator=g).bfloat16(),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_is_a_tight_upper_bound(name: str) -> None:
    w = CASES[name]
    sigma = _sigma(w)
    out = spectral.exact(w)
    assert out.kind == "upper" and out.method == "exact-gram-cholesky"
    assert sigma <= out.value <= sigma * (1 + TIGHT), (out.value / sigma - 1)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (6, 3)])
def test_zero_and_empty_matrices(shape: tuple[int, int]) -> None:
    assert spectral.exact(torch.zeros(shape)).value == 0.0


def test_exact_is_deterministic_and_transpose_invariant() -> None:
    w = torch.randn(300, 77, generator=torch.Generator().manual_seed(9))
    a, b = spectral.exact(w), spectral.exact(w)
    assert a == b
    assert spectral.exact(w.T).value == pytest.approx(a.value, rel=1e-12)


def test_chunks_and_blocks_do_not_change_soundness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many row chunks and column blocks (only the summation order changes)."""
    w = torch.randn(257, 45, generator=torch.Generator().manual_seed(10))
    sigma = _sigma(w)
    default = spectral.exact(w).value
    monkeypatch.setattr(spectral, "_CHUNK_ELEMS", 45 * 16)
    monkeypatch.setattr(spectral, "_GRAM_BLOCK", 7)
    chunked = spectral.exact(w).value
    assert sigma <= chunked <= sigma * (1 + TIGHT)
    assert chunked == pytest.approx(default, rel=1e-12)


# --------------------------------------------------------------------------- Gram formation


@pytest.mark.parametrize("shape", [(37, 23), (23, 37), (200, 11), (1, 5)])
def test_gram_entries_and_frobenius_bound(monkeypatch: pytest.MonkeyPatch,
                                          shape: tuple[int, int]) -> None:
    """Ĝ is exactly symmetric, each entry within γ_k·(|A|ᵀ|A|)_ij of the exact (fsum) Gram
    entry, and the returned bound is ≥ the exactly summed ‖A‖_F²."""
    monkeypatch.setattr(spectral, "_CHUNK_ELEMS", 64)
    monkeypatch.setattr(spectral, "_GRAM_BLOCK", 4)
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(11))
    shift = spectral._shift_of(w)
    assert shift is not None
    G, fro2_up, k, n = spectral._gram_and_fro(w, shift)
    a = w.to(F64) * 2.0**-shift
    a = a if a.shape[0] >= a.shape[1] else a.T
    assert (k, n) == tuple(a.shape)
    assert torch.equal(G, G.T)
    cols = a.T.tolist()  # products of float32 values are exact in float64
    gam = spectral._gamma(k)
    for i in range(n):
        for j in range(n):
            exact_ij = math.fsum(x * y for x, y in zip(cols[i], cols[j], strict=True))
            abs_ij = math.fsum(abs(x * y) for x, y in zip(cols[i], cols[j], strict=True))
            assert abs(float(G[i, j]) - exact_ij) <= gam * abs_ij + 1e-300
    assert fro2_up >= math.fsum(x * x for x in a.reshape(-1).tolist())


# --------------------------------------------------------------------------- the two steps


def _gram_of(seed: int, m: int = 400, n: int = 120) -> torch.Tensor:
    a = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return a.T @ a


@pytest.mark.parametrize("seed", range(4))
def test_lanczos_estimate_is_accurate(seed: int) -> None:
    G = _gram_of(seed, m=600 + 100 * seed, n=200 + 30 * seed)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    theta = spectral._lanczos_top(G)
    assert abs(theta - lam) <= 1e-9 * lam


@pytest.mark.parametrize("frac", [0.0, 0.5, 0.9, 1 - 1e-6, 1 - 1e-9, 1.0, 1.5])
def test_verification_is_sound_for_any_estimate(frac: float) -> None:
    """A wrong estimate (too low, far too low, too high) never gives an unsound bound:
    Cholesky fails for every shift below λ_max, and the shift grows until it succeeds."""
    G = _gram_of(5)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    bound = spectral._verified_lambda_max(G, frac * lam)
    assert bound >= lam
    if frac >= 1:  # the first shift, θ·(1 + 1e-8), succeeds
        assert bound <= frac * lam * (1 + 2e-8)
    else:  # the first shift that succeeds is at most 4× the last one that failed (< λ_max)
        assert bound <= 4.0 * lam * (1 + 1e-9)


def test_verification_with_the_true_value_is_tight() -> None:
    G = _gram_of(6)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    bound = spectral._verified_lambda_max(G, lam)
    assert lam <= bound <= lam * (1 + 2e-8)


def test_indefinite_shift_is_rejected() -> None:
    """Below λ_max, μI − G is indefinite and the floating-point Cholesky must fail; this is
    what the bound rests on."""
    G = _gram_of(7)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    for rel in (1e-3, 1e-6, 1e-9):
        B = (lam * (1 - rel)) * torch.eye(G.shape[0], dtype=F64) - G
        assert int(torch.linalg.cholesky_ex(B).info) != 0
