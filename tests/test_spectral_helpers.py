"""lipcert.spectral's helpers for training code: the one power-iteration loop, the
differentiable σ_max, the top-vector cache, and ``exact`` when LAPACK's eigensolver fails."""

from __future__ import annotations

import pytest
import torch

from lipcert import spectral


def _with_spectrum(shape: tuple[int, int], sv: list[float], seed: int) -> torch.Tensor:
    """A float64 matrix U·diag(sv)·Vᵀ with random orthonormal U, V."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, len(sv), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(sv), generator=gen, dtype=torch.float64))
    return (u * torch.tensor(sv, dtype=torch.float64)) @ v.mT


def _top_pair(w: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w.detach().double())
    return float(s[0]), u[:, 0], vh[0]


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (16, 16)])
def test_power_iteration_estimates_the_top_triple_from_below(shape: tuple[int, int]) -> None:
    w = _with_spectrum(shape, [3.0, 1.5, 1.0, 0.2], seed=1)
    sigma, u1, v1 = _top_pair(w)
    start = torch.randn(shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    previous = 0.0
    v = start
    for _ in range(6):  # warm-started calls: the estimate never decreases, never exceeds σ
        est, u, v = spectral.power_iteration(w, v, 2)
        assert previous * (1 - 1e-12) <= est <= sigma * (1 + 1e-12)
        previous = est
    assert est == pytest.approx(sigma, rel=1e-9)
    assert float(u.norm()) == pytest.approx(1.0) and float(v.norm()) == pytest.approx(1.0)
    assert abs(float(u @ u1)) == pytest.approx(1.0, abs=1e-6)
    assert abs(float(v @ v1)) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(w @ v, est * u)


def test_power_iteration_on_a_zero_matrix_returns_zero() -> None:
    est, u, _ = spectral.power_iteration(torch.zeros(4, 3), torch.ones(3), 5)
    assert est == 0.0 and torch.count_nonzero(u) == 0


def test_power_is_power_iteration_on_the_scaled_matrix() -> None:
    """``power`` rescales by a power of two (exact) and runs the shared loop."""
    w = _with_spectrum((20, 8), [2.0, 1.9, 0.5], seed=3)
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(8, generator=gen, dtype=torch.float64)
    est, _, _ = spectral.power_iteration(w / 4.0, start, 9)  # powers of two scale exactly
    assert spectral.power(w, steps=9, seed=5).value == pytest.approx(4.0 * est, rel=1e-12)


@pytest.mark.parametrize("shape", [(24, 10), (10, 24)])
def test_sigma_max_differentiable_has_the_value_and_gradient_of_sigma_max(
    shape: tuple[int, int],
) -> None:
    w64 = _with_spectrum(shape, [2.0, 1.2, 0.7, 0.1], seed=6)
    sigma, u1, v1 = _top_pair(w64)
    w = w64.float().requires_grad_(True)
    value = spectral.sigma_max_differentiable(w)
    assert value.dtype == torch.float32
    assert float(value.detach()) == pytest.approx(sigma, rel=1e-6)
    value.backward()
    torch.testing.assert_close(w.grad.double(), torch.outer(u1, v1), atol=1e-6, rtol=0)


def test_sigma_max_differentiable_reads_the_cache_only_while_the_weight_is_unchanged() -> None:
    w = _with_spectrum((12, 5), [3.0, 1.0], seed=7).float()
    sigma = _top_pair(w)[0]
    assert spectral.cached_top_vector(w) is None
    wrong = torch.zeros(5, dtype=torch.float64)
    wrong[0] = 1.0  # a unit vector that is not the top singular vector
    spectral.remember_top_vector(w, wrong)
    assert spectral.cached_top_vector(w) is wrong
    used = float(spectral.sigma_max_differentiable(w))
    assert used == pytest.approx(float(w[:, 0].norm()), rel=1e-6) and used < 0.99 * sigma
    w.mul_(1.0)  # an in-place write moves the version counter: the cache is stale
    assert spectral.cached_top_vector(w) is None
    assert float(spectral.sigma_max_differentiable(w)) == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize("shape", [(40, 40), (300, 20), (400, 300)])
def test_exact_stays_sound_and_tight_when_the_eigensolver_fails(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int]
) -> None:
    """The shift's estimate then comes from power iteration; the Cholesky test still
    certifies (eigvalsh steers the n ≤ 256 path, Lanczos' eigh the larger one)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(8))
    sigma = _top_pair(w)[0]

    def broken(*args: object, **kwargs: object) -> None:
        raise torch.linalg.LinAlgError("simulated convergence failure")

    monkeypatch.setattr(torch.linalg, "eigvalsh", broken)
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    out = spectral.exact(w)
    assert out.kind == "upper"
    assert sigma <= out.value <= sigma * (1 + 1e-6)
