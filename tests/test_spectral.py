"""lipcert.spectral: certified operator norms are sound, tight, and fast enough."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch
from torch import nn

from lipcert import spectral
from lipcert.errors import LipcertError
from lipcert.spectral import Norm


def _svdvals64(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().to(torch.float64))


def _true_sigma(w: torch.Tensor) -> float:
    return float(_svdvals64(w)[0])


def _with_spectrum(m: int, n: int, sv: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A float32 m×n matrix U·diag(sv)·Vᵀ with random orthonormal U, V."""
    r = sv.numel()
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=gen, dtype=torch.float64))
    return ((u * sv.to(torch.float64)) @ v.T).to(torch.float32)


def _matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    mats = {
        "1x1": torch.tensor([[-3.5]]),
        "row": torch.randn(1, 50, generator=g),
        "col": torch.randn(50, 1, generator=g),
        "square": torch.randn(40, 40, generator=g),
        "tall": torch.randn(300, 20, generator=g),
        "wide": torch.randn(17, 260, generator=g),
        "rank1": torch.outer(torch.randn(64, generator=g), torch.randn(48, generator=g)),
        "near-equal": _with_spectrum(
            64, 64, 1.0 + 1e-7 * torch.rand(64, generator=g, dtype=torch.float64), g
        ),
        "top-two-equal": _with_spectrum(
            50, 30, torch.tensor([2.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64), g
        ),
        "ill-conditioned": _with_spectrum(
            80, 60, torch.logspace(0, -12, 60, dtype=torch.float64), g
        ),
        "tiny-scale": 1e-30 * torch.randn(30, 20, generator=g),
        "huge-scale": 1e30 * torch.randn(20, 30, generator=g),
        "sparse": torch.randn(50, 40, generator=g) * (torch.rand(50, 40, generator=g) < 0.05),
    }
    return mats


MATRICES = _matrices()


@pytest.fixture(scope="module")
def gpt2_mlp() -> tuple[torch.Tensor, float, float]:
    """A 768×3072 float32 matrix, its float64 σ_max and the time svdvals (1 thread) took."""
    w = torch.randn(768, 3072, generator=torch.Generator().manual_seed(7)) * 0.02
    t0 = time.perf_counter()
    sigma = _true_sigma(w)
    return w, sigma, time.perf_counter() - t0


# --------------------------------------------------------------------------- exact


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_exact_is_sound_and_tight(name: str) -> None:
    w = MATRICES[name]
    sigma = _true_sigma(w)
    out = spectral.exact(w)
    assert out.kind == "upper" and out.method == "exact-gram-cholesky"
    assert out.value >= sigma
    assert out.value <= sigma * (1 + 1e-6)


def test_exact_gpt2_sized(gpt2_mlp: tuple[torch.Tensor, float, float]) -> None:
    w, sigma, _ = gpt2_mlp
    out = spectral.exact(w)
    assert sigma <= out.value <= sigma * (1 + 1e-6)
    # The transpose has the same norm; the wide and tall paths agree.
    assert spectral.exact(w.T).value == pytest.approx(out.value, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_exact_other_dtypes(dtype: torch.dtype) -> None:
    w = torch.randn(30, 50, generator=torch.Generator().manual_seed(3)).to(dtype)
    sigma = _true_sigma(w)
    out = spectral.exact(w)
    assert sigma <= out.value <= sigma * (1 + 1e-6)


def test_zero_matrix() -> None:
    z = torch.zeros(5, 7)
    assert spectral.exact(z) == Norm(0.0, "upper", "exact-gram-cholesky")
    assert spectral.gram(z).value == 0.0
    assert spectral.power(z).value == 0.0


def test_exact_accepts_parameters_and_arrays() -> None:
    p = nn.Parameter(torch.randn(6, 4))
    assert spectral.exact(p).value >= _true_sigma(p)
    assert spectral.exact(p.detach().numpy()).value == spectral.exact(p).value


# --------------------------------------------------------------------------- gram


@pytest.mark.parametrize(
    "name", ["row", "square", "tall", "wide", "rank1", "near-equal", "top-two-equal"]
)
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_gram_sound_and_within_tol(name: str, tol: float) -> None:
    w = MATRICES[name]
    sigma = _true_sigma(w)
    out = spectral.gram(w, tol=tol)
    assert out.kind == "upper"
    assert out.method.startswith("gram-iteration(t=")
    assert "not converged" not in out.method
    assert sigma <= out.value <= sigma * (1 + tol) * (1 + 1e-9)


@pytest.mark.parametrize("name", ["square", "near-equal", "ill-conditioned", "huge-scale"])
def test_gram_every_step_is_an_upper_bound(name: str) -> None:
    w = MATRICES[name]
    sigma = _true_sigma(w)
    values = []
    for t in range(16):
        out = spectral.gram(w, tol=0.0, max_steps=t)
        assert out.value >= sigma, (t, out)
        values.append(out.value)
    # t = 0 is the Frobenius norm; the bound never increases.
    assert values[0] == pytest.approx(float(torch.linalg.norm(w.double())), rel=1e-9)
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(values))
    assert values[-1] <= sigma * (1 + 1e-3)


def test_gram_reports_non_convergence() -> None:
    out = spectral.gram(MATRICES["near-equal"], tol=1e-9, max_steps=2)
    assert out.method == "gram-iteration(t=2, not converged)"
    assert out.value >= _true_sigma(MATRICES["near-equal"])


# --------------------------------------------------------------------------- power


@pytest.mark.parametrize("name", sorted(MATRICES))
def test_power_is_an_estimate_from_below(name: str) -> None:
    w = MATRICES[name]
    sigma = _true_sigma(w)
    out = spectral.power(w, steps=50, seed=1)
    assert out.kind == "estimate" and out.method == "power(50)"
    assert out.value <= sigma * (1 + 1e-9)


def test_power_converges_with_a_gap() -> None:
    w = MATRICES["ill-conditioned"]
    out = spectral.power(w, steps=100)
    assert out.value == pytest.approx(_true_sigma(w), rel=1e-6)
    assert spectral.power(w, steps=7, seed=3) == spectral.power(w, steps=7, seed=3)


# --------------------------------------------------------------------------- conv2d


def _dense_conv_sigma(weight: torch.Tensor, hw: tuple[int, int], **conv_kwargs: object) -> float:
    """σ_max of the convolution, materialised by applying it to the identity basis."""
    c_out, c_in_g, kh, kw = weight.shape
    groups = int(conv_kwargs.get("groups", 1))  # type: ignore[call-overload]
    conv = nn.Conv2d(c_in_g * groups, c_out, (kh, kw), bias=False, **conv_kwargs)  # type: ignore[arg-type]
    conv = conv.double()
    return _dense_from(conv, weight, c_in_g * groups, hw)


def _dense_from(conv: nn.Conv2d, weight: torch.Tensor, c_in: int, hw: tuple[int, int]) -> float:
    with torch.no_grad():
        conv.weight.copy_(weight.double())
        n = c_in * hw[0] * hw[1]
        basis = torch.eye(n, dtype=torch.float64).reshape(n, c_in, *hw)
        cols = conv(basis).reshape(n, -1)  # row j = image of basis vector j
    return float(_svdvals64(cols)[0])


CIRCULAR_EXACT = [
    # (c_out, c_in, kernel, hw, padding)
    (2, 3, (3, 3), (5, 6), 1),
    (4, 2, (3, 3), (4, 4), 1),
    (3, 3, (1, 1), (5, 3), 0),
    (1, 1, (3, 3), (7, 7), 1),
    (2, 2, (5, 5), (3, 3), 2),  # kernel larger than the input: taps alias
    (3, 2, (3, 1), (6, 5), (1, 0)),
    (2, 3, (2, 4), (5, 6), "same"),  # even kernels: asymmetric padding
]


@pytest.mark.parametrize("case", CIRCULAR_EXACT)
def test_conv_circular_is_exact(case: tuple) -> None:
    c_out, c_in, k, hw, pad = case
    g = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    weight = torch.randn(c_out, c_in, *k, generator=g)
    dense = _dense_conv_sigma(weight, hw, padding=pad, padding_mode="circular")
    out = spectral.conv2d(weight, hw, padding=pad, padding_mode="circular")
    assert out.kind == "upper" and out.method == "conv-circular-fft"
    assert dense <= out.value <= dense * (1 + 1e-6)
    again = spectral.conv2d(weight, hw, padding=pad, padding_mode="circular", method="dense")
    assert dense <= again.value <= dense * (1 + 1e-6)


CIRCULAR_BOUND = [
    # (c_out, c_in, kernel, hw, stride, padding)
    (3, 2, (3, 3), (6, 6), 2, 1),
    (2, 2, (3, 3), (5, 7), 1, 0),  # cropped output
    (2, 3, (3, 3), (3, 4), 1, 3),  # output wraps around twice
    (2, 2, (4, 4), (8, 8), (2, 3), 1),
]


@pytest.mark.parametrize("case", CIRCULAR_BOUND)
def test_conv_circular_bound(case: tuple) -> None:
    c_out, c_in, k, hw, stride, pad = case
    weight = torch.randn(c_out, c_in, *k, generator=torch.Generator().manual_seed(5))
    kw = {"stride": stride, "padding": pad, "padding_mode": "circular"}
    dense = _dense_conv_sigma(weight, hw, **kw)
    out = spectral.conv2d(weight, hw, **kw)
    assert out.kind == "upper" and out.method == "conv-circular-fft-bound"
    assert out.value >= dense
    exact = spectral.conv2d(weight, hw, **kw, method="dense")
    assert dense <= exact.value <= dense * (1 + 1e-6)


ZERO_PAD = [
    # (c_out, c_in, kernel, hw, stride, padding, dilation, groups)
    (2, 3, (3, 3), (6, 6), 1, 1, 1, 1),
    (4, 2, (3, 3), (7, 5), 2, 1, 1, 1),
    (3, 3, (3, 3), (6, 6), 1, 0, 1, 1),
    (2, 2, (5, 5), (6, 6), 1, 4, 1, 1),  # padding beyond k − 1
    (2, 3, (4, 2), (7, 6), (2, 1), (2, 0), 1, 1),
    (3, 2, (3, 3), (8, 8), 1, 2, 2, 1),  # dilation
    (4, 2, (3, 3), (5, 5), 1, 1, 1, 2),  # groups
    (2, 3, (2, 2), (5, 5), 1, "same", 1, 1),
    (1, 1, (3, 3), (1, 1), 1, 1, 1, 1),  # 1×1 input
    (2, 1, (7, 7), (4, 4), 3, 3, 1, 1),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", ZERO_PAD)
def test_conv_zero_padding_bound(case: tuple) -> None:
    c_out, c_in_g, k, hw, stride, pad, dil, groups = case
    weight = torch.randn(c_out, c_in_g, *k, generator=torch.Generator().manual_seed(11))
    kw = {"stride": stride, "padding": pad, "dilation": dil, "groups": groups}
    dense = _dense_conv_sigma(weight, hw, **kw)
    out = spectral.conv2d(weight, hw, padding_mode="zeros", **kw)
    assert out.kind == "upper" and out.method.startswith("conv-zero-pad-bound(fft ")
    assert out.value >= dense
    assert out.value <= 3 * dense  # a bound, but not a silly one
    exact = spectral.conv2d(weight, hw, padding_mode="zeros", method="dense", **kw)
    assert exact.method == "conv-dense-exact"
    assert dense <= exact.value <= dense * (1 + 1e-6)


def test_conv_zero_padding_bound_is_tight_on_large_inputs() -> None:
    # Both sample the same continuous symbol, on 65 and 64 points: nearly equal.
    weight = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    zero = spectral.conv2d(weight, (64, 64), padding=1)
    assert zero.method == "conv-zero-pad-bound(fft 65x65)"
    circ = spectral.conv2d(weight, (64, 64), padding=1, padding_mode="circular").value
    assert zero.value == pytest.approx(circ, rel=0.01)
    assert _dense_conv_sigma(weight, (12, 12), padding=1) <= zero.value


def test_conv_bias_free_scaling_and_zero() -> None:
    weight = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(4))
    a = spectral.conv2d(weight, (6, 6), padding=1).value
    b = spectral.conv2d(weight * 1024, (6, 6), padding=1).value
    assert b == pytest.approx(1024 * a, rel=1e-12)
    assert spectral.conv2d(torch.zeros(2, 2, 3, 3), (6, 6)).value == 0.0


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_raise(bad: float) -> None:
    w = torch.randn(4, 5)
    w[2, 3] = bad
    for fn in (spectral.exact, spectral.gram, spectral.power):
        with pytest.raises(LipcertError, match=r"(NaN|infinite).*index \(2, 3\)"):
            fn(w)
    k = torch.randn(2, 2, 3, 3)
    k[1, 0, 2, 2] = bad
    with pytest.raises(LipcertError, match=r"NaN|infinite"):
        spectral.conv2d(k, (5, 5))


def test_overflowing_norm_raises() -> None:
    w = torch.full((40, 40), 1e307, dtype=torch.float64)
    for fn in (spectral.exact, spectral.gram, spectral.power):
        with pytest.raises(LipcertError, match="overflows float64"):
            fn(w)


def test_bad_inputs_raise() -> None:
    with pytest.raises(LipcertError, match="2-D"):
        spectral.exact(torch.randn(2, 3, 4))
    with pytest.raises(LipcertError, match="2-D"):
        spectral.gram(torch.randn(5))
    with pytest.raises(LipcertError, match="floating-point"):
        spectral.exact(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(LipcertError, match="floating-point"):
        spectral.power(torch.ones(3, 3, dtype=torch.complex64))
    with pytest.raises(LipcertError, match="tol"):
        spectral.gram(torch.ones(3, 3), tol=-1)
    with pytest.raises(LipcertError, match="steps"):
        spectral.power(torch.ones(3, 3), steps=0)
    with pytest.raises(LipcertError, match="shape"):
        spectral.conv2d(torch.randn(3, 3), (4, 4))
    with pytest.raises(LipcertError, match="padding_mode"):
        spectral.conv2d(torch.randn(2, 2, 3, 3), (4, 4), padding_mode="reflect")
    with pytest.raises(LipcertError, match="empty"):
        spectral.conv2d(torch.randn(2, 2, 5, 5), (3, 3))
    with pytest.raises(LipcertError, match="input_hw"):
        spectral.conv2d(torch.randn(2, 2, 3, 3), (0, 4))
    with pytest.raises(LipcertError, match="groups"):
        spectral.conv2d(torch.randn(3, 2, 3, 3), (4, 4), groups=2)
    with pytest.raises(LipcertError, match="kind"):
        Norm(1.0, "certain", "x")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- timing


def test_exact_on_gpt2_small_matrices(gpt2_mlp: tuple[torch.Tensor, float, float]) -> None:
    """The GPT-2-small shapes: sound and tight against float64 SVD; timings are printed
    (benchmarks/certify_gpt2_speed.py measures speed; tests do not assert timings)."""
    w, _, svd_time = gpt2_mlp
    spectral.exact(w[:8, :8])  # warm-up
    t0 = time.perf_counter()
    spectral.exact(w)
    mlp_time = time.perf_counter() - t0
    wte = torch.randn(50257, 768, generator=torch.Generator().manual_seed(8)) * 0.02
    t0 = time.perf_counter()
    out = spectral.exact(wte)
    wte_time = time.perf_counter() - t0
    print(
        f"\nexact 768x3072: {mlp_time:.3f} s (float64 svdvals, 1 thread: {svd_time:.3f} s); "
        f"exact 50257x768: {wte_time:.3f} s"
    )
    true_sigma = float(_svdvals64(wte)[0])
    assert out.kind == "upper"
    assert true_sigma <= out.value <= true_sigma * (1 + 1e-6)
