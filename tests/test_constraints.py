"""Tests for lipcert.constraints: the projections, the optimizer hook and finalize()."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lipcert import constraints as C
from lipcert import spectral
from lipcert.constraints import projections
from lipcert.errors import LipcertError, TrainingError

D = 16
SHAPES = {"square": (D, D), "up": (4 * D, D), "down": (D, 4 * D), "head": (10, D)}
APPROX_TOL = 1e-6
METHODS_WITH_BOUND = [m for m in C.CONSTRAINT_METHODS if m != "none"]


def svd_sigma_max(w: torch.Tensor) -> float:
    """Independent reference: float64 SVD (numpy)."""
    return float(np.linalg.svd(w.detach().double().cpu().numpy(), compute_uv=False)[0])


def matrix_with_singular_values(sv: np.ndarray, shape: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, len(sv), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(sv), generator=gen, dtype=torch.float64))
    s = torch.as_tensor(sv, dtype=torch.float64)
    return (u * s) @ v.mT


def make_params(w_max: float, seed: int, over: float = 1.5) -> list[tuple[str, torch.nn.Parameter]]:
    """Model-like matrices, initialised `over` times above their limit."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, shape in SHAPES.items():
        w = torch.randn(*shape, generator=gen)
        w *= over * C.spectral_limit(shape, w_max) / svd_sigma_max(w)
        out.append((name, torch.nn.Parameter(w)))
    return out


def forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = F.gelu(x @ p["up"].mT) / 1.1289
    h = h @ p["down"].mT
    h = h + 0.5 * (h @ p["square"].mT)
    return h @ p["head"].mT


def make_optimizer(kind: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "muon":
        return torch.optim.Muon(params, lr=0.05, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=3e-2, weight_decay=0.0)


def train(constraint_params, constraint, kind: str, steps: int, seed: int, check_each=None):
    named = dict(constraint_params)
    opt = make_optimizer(kind, list(named.values()))
    constraint.attach(opt)
    gen = torch.Generator().manual_seed(seed + 1)
    teacher = torch.randn(10, D, generator=gen)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, D, generator=gen)
        loss = F.mse_loss(forward(named, x), x @ teacher.mT)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if check_each is not None:
            check_each(named)
    return losses


# ---------------------------------------------------------------------------------------
# Norm conversion and registry


def test_limits_convert_rms_to_spectral():
    assert C.rms_to_spectral_scale((64, 16)) == pytest.approx(2.0)
    assert C.spectral_limit((16, 64), 3.0) == pytest.approx(1.5)
    assert C.spectral_limit((10, 10), 4.0) == pytest.approx(4.0)
    with pytest.raises(LipcertError):
        C.spectral_limit((3, 3), 0.0)
    with pytest.raises(LipcertError):
        C.spectral_limit((3,), 1.0)


def test_method_names_and_unknown_method_error():
    assert list(C.CONSTRAINT_METHODS) == [
        "none",
        "spectral_normalize",
        "spectral_cap",
        "hard_cap",
        "soft_cap",
        "spectral_hammer",
        "weight_decay",
    ]
    with pytest.raises(LipcertError) as err:
        C.WeightConstraint("spectral_clip", 1.0, [])
    for name in C.CONSTRAINT_METHODS:
        assert name in str(err.value)


def test_rejects_non_matrix_params_and_nonfinite_weights():
    with pytest.raises(LipcertError, match="2-D"):
        C.WeightConstraint("spectral_cap", 1.0, [("bias", torch.nn.Parameter(torch.zeros(4)))])
    w = torch.ones(3, 3)
    w[0, 0] = float("nan")
    with pytest.raises(TrainingError):
        C.spectral_cap(w, 1.0)


# ---------------------------------------------------------------------------------------
# Training with the hook, then finalize


@pytest.mark.parametrize("kind", ["muon", "adamw"])
@pytest.mark.parametrize("w_max", [1.0, 4.0])
@pytest.mark.parametrize("method", METHODS_WITH_BOUND)
def test_finalize_enforces_declared_bound(method, w_max, kind):
    params = make_params(w_max, seed=3)
    wc = C.WeightConstraint(method, w_max, params, weight_decay=0.1)
    losses = train(params, wc, kind, steps=15, seed=3)
    assert all(math.isfinite(v) for v in losses)
    records = wc.finalize()
    assert [r["name"] for r in records] == list(SHAPES)
    for (name, p), rec in zip(params, records, strict=True):
        limit = C.spectral_limit(p.shape, w_max)
        sigma = svd_sigma_max(p)
        assert sigma <= limit * (1 + APPROX_TOL), (name, sigma, limit)
        assert rec["limit"] == pytest.approx(limit)
        # a verified upper value of σ_max (spectral.exact), within its 1e-8-level margin
        assert sigma <= rec["sigma_after"] <= min(limit, sigma * (1 + 1e-7))
        assert rec["rms_norm_after"] <= w_max * (1 + APPROX_TOL)
        assert rec["shape"] == list(p.shape)
        if method in C.EXACT_METHODS:
            assert not rec["capped"]


def test_finalize_for_none_only_measures():
    params = make_params(1.0, seed=4)
    before = [p.detach().clone() for _, p in params]
    wc = C.WeightConstraint("none", None, params)
    train(params, wc, "adamw", steps=3, seed=4)
    after_train = [p.detach().clone() for _, p in params]
    assert any(not torch.equal(a, b) for a, b in zip(before, after_train, strict=True))
    records = wc.finalize()
    for (_, p), rec, ref in zip(params, records, after_train, strict=True):
        assert torch.equal(p.detach(), ref)
        assert rec["limit"] is None and not rec["capped"]
        sigma = svd_sigma_max(p)
        assert sigma <= rec["sigma_before"] == rec["sigma_after"] <= sigma * (1 + 1e-7)


@pytest.mark.parametrize("kind", ["muon", "adamw"])
@pytest.mark.parametrize("method", sorted(C.EXACT_METHODS))
def test_exact_methods_hold_bound_after_every_step(method, kind):
    w_max = 1.0
    params = make_params(w_max, seed=5)
    wc = C.WeightConstraint(method, w_max, params)
    checked = []

    def check(named):
        for name, p in named.items():
            limit = C.spectral_limit(p.shape, w_max)
            assert svd_sigma_max(p) <= limit * (1 + APPROX_TOL), name
        checked.append(1)

    train(params, wc, kind, steps=10, seed=5, check_each=check)
    assert len(checked) == 10


def test_soft_cap_coupling_keeps_muon_training_near_bound():
    """Starting inside the bound, the lr-coupled soft cap keeps σ ≤ limit after Muon steps."""
    w_max = 1.0
    params = make_params(w_max, seed=6, over=0.9)
    wc = C.WeightConstraint("soft_cap", w_max, params)
    worst = []

    def check(named):
        worst.append(
            max(svd_sigma_max(p) / C.spectral_limit(p.shape, w_max) for p in named.values())
        )

    named = dict(params)
    opt = torch.optim.Muon(list(named.values()), lr=0.1)  # default weight_decay=0.1
    wc.attach(opt)
    gen = torch.Generator().manual_seed(7)
    for _ in range(15):
        x = torch.randn(32, D, generator=gen)
        loss = forward(named, x).pow(2).mean() * -1.0  # pushes weights to grow
        opt.zero_grad()
        loss.backward()
        opt.step()
        check(named)
    assert max(worst) <= 1.0 + 1e-4
    assert max(worst) > 0.9  # the cap was actually exercised near the bound


# ---------------------------------------------------------------------------------------
# Individual projections


def test_spectral_cap_clips_only_large_singular_values():
    sv = np.geomspace(0.1, 3.0, 24)
    w = matrix_with_singular_values(sv, (40, 24), seed=8).float()
    limit = 1.7
    before = torch.linalg.svdvals(w.double())
    C.spectral_cap(w, limit)
    after = torch.linalg.svdvals(w.double())
    expected = before.clamp(max=limit)
    assert torch.allclose(after, expected, rtol=1e-5, atol=1e-6)
    below = before < limit
    assert torch.allclose(after[below], before[below], rtol=2e-6)
    # wide orientation too
    w = matrix_with_singular_values(sv, (24, 40), seed=9).float()
    before = torch.linalg.svdvals(w.double())
    C.spectral_cap(w, 1.0)
    assert torch.allclose(torch.linalg.svdvals(w.double()), before.clamp(max=1.0), atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
@pytest.mark.parametrize("top_sv", [3.0, 0.8])
def test_spectral_cap_leaves_the_capped_weights_top_singular_vector(shape, top_sv):
    """The cached vector gives the capped weight's exact σ_max (tall: ‖Wv‖, wide: ‖vᵀW‖),
    whether or not the cap changed the weight, and is dropped once the weight moves."""
    sv = np.geomspace(0.1, top_sv, 24)
    w = matrix_with_singular_values(sv, shape, seed=11).float()
    assert spectral.cached_top_vector(w) is None
    C.spectral_cap(w, 1.0)
    top = spectral.cached_top_vector(w)
    assert top is not None and top.shape == (min(shape),)
    wd = w.double()
    sigma = torch.linalg.vector_norm(wd @ top if shape[0] >= shape[1] else top @ wd)
    assert float(sigma) == pytest.approx(svd_sigma_max(w), rel=1e-6)
    w.mul_(0.5)
    assert spectral.cached_top_vector(w) is None


def test_spectral_normalize_scales_whole_matrix():
    w = matrix_with_singular_values(np.array([4.0, 2.0, 0.5]), (6, 3), seed=10).float()
    C.spectral_normalize(w, 2.0)
    assert torch.allclose(
        torch.linalg.svdvals(w.double()),
        torch.tensor([2.0, 1.0, 0.25], dtype=torch.float64),
        atol=1e-6,
    )
    assert spectral.exact(w).value <= 2.0  # divided by a verified upper value of σ_max
    C.spectral_normalize(w, 5.0)  # already inside: unchanged
    assert svd_sigma_max(w) == pytest.approx(2.0, rel=1e-6)


def _hard_cap_scalar(x: np.ndarray) -> np.ndarray:
    for a, b, c in C.HARD_CAP_COEFFICIENTS:
        x = a * x + b * x**3 + c * x**5
    return x


def test_hard_cap_approximates_min_sigma_one():
    sv = np.linspace(0.1, 3.0, 30)
    limit = 2.5
    w = matrix_with_singular_values(sv * limit, (48, 30), seed=11).float()
    C.hard_cap(w, limit)
    out = np.sort(torch.linalg.svdvals(w.double()).numpy() / limit)
    # The matrix iteration acts on each singular value as the scalar polynomial does.
    assert np.allclose(out, np.sort(np.abs(_hard_cap_scalar(sv))), atol=1e-4)
    mapped = np.abs(_hard_cap_scalar(sv))
    # Observed: σ in [1.1, 3] lands in [0.998, 1.011]; σ ≤ 1 moves by at most 4.9%.
    big, small = sv >= 1.1, sv <= 1.0
    assert out[-big.sum() :].min() >= 0.997 and out.max() <= 1.011
    assert np.all(np.abs(mapped[small] - sv[small]) <= 0.049 * sv[small])
    assert np.allclose(out[: small.sum()], np.sort(mapped[small]), atol=1e-4)


def test_hard_cap_scales_far_out_of_range_matrices_first():
    w = matrix_with_singular_values(np.array([40.0, 8.0, 1.0, 0.2]), (8, 4), seed=12).float()
    C.hard_cap(w, 1.0)
    assert svd_sigma_max(w) <= 1.012


def test_soft_cap_coupling_maps_k_to_one():
    for k in [1.001, 1.05, 1.2, 1.3]:
        alpha = C.soft_cap_coupling(k - 1.0)
        s = np.linspace(0, k, 20001)
        f = s - 3 * alpha**2 * s**5 + 3 * alpha**3 * s**7 - alpha**4 * s**9
        assert f[-1] == pytest.approx(1.0, abs=1e-9)
        assert f.max() <= 1.0 + 1e-9
    assert C.soft_cap_coupling(0.0) == 0.0
    # units: an update of 0.2 against w_max = 2 is k = 1.1, like 0.1 against 1
    assert C.soft_cap_coupling(0.2, 2.0) == pytest.approx(C.soft_cap_coupling(0.1, 1.0))
    assert C.soft_cap_coupling(0.2, 1.0, weight_decay=0.1) == pytest.approx(
        C.soft_cap_coupling(0.1, 1.0)
    )
    assert C.soft_cap_coupling(5.0) == pytest.approx(3844 / 19683)


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_muon_update_scale_bounds_real_muon_updates(adjust, shape):
    """The coupling's update norm per unit lr is never exceeded by a torch.optim.Muon step
    (momentum 0, no decay: the step is exactly lr·adjustment·NS(gradient)). torch's bfloat16
    iteration can overshoot the exact scalar gain by rounding (0.07% seen here); the 1.05
    margin of the coupling covers it."""
    from lipcert.constraints.coupling import default_update_scale

    gen = torch.Generator().manual_seed(24)
    w = torch.nn.Parameter(torch.randn(*shape, generator=gen))
    opt = torch.optim.Muon([w], lr=0.01, momentum=0.0, weight_decay=0.0, adjust_lr_fn=adjust)
    scale = default_update_scale(opt, opt.param_groups[0], shape)
    worst = 0.0
    for _ in range(5):
        w.grad = torch.randn(*shape, generator=gen) * torch.logspace(-3, 0, shape[1])
        before = w.detach().clone()
        opt.step()
        worst = max(worst, svd_sigma_max(w.detach() - before) / 0.01)
    assert 0.5 * scale < worst <= scale


def test_soft_cap_matrix_follows_its_polynomial():
    k, limit = 1.2, 3.0
    alpha = C.soft_cap_coupling(k - 1.0)
    sv = np.linspace(0.05, k, 12)
    w = matrix_with_singular_values(sv * limit, (12, 20), seed=13).float()
    C.soft_cap(w, limit, alpha=alpha)
    out = np.sort(torch.linalg.svdvals(w.double()).numpy() / limit)
    f = sv - 3 * alpha**2 * sv**5 + 3 * alpha**3 * sv**7 - alpha**4 * sv**9
    assert np.allclose(out, np.sort(f), atol=1e-5)
    assert out.max() <= 1.0 + 1e-5


def test_soft_cap_far_out_of_range_does_not_explode():
    """f(σ) grows like α⁴σ⁹ for large σ; such matrices are first scaled to the limit."""
    w = matrix_with_singular_values(np.array([20.0, 5.0, 1.0, 0.1]), (9, 4), seed=23).float()
    C.soft_cap(w, 2.0, alpha=0.1)
    sv = torch.linalg.svdvals(w.double()) / 2.0
    assert sv[0] <= 1.0 and sv[0] > 0.9
    assert torch.all(torch.isfinite(sv))


def test_spectral_hammer_sets_top_singular_value():
    w = matrix_with_singular_values(np.array([3.0, 1.5, 0.5, 0.1]), (10, 4), seed=14).float()
    state: dict[str, torch.Tensor] = {}
    C.spectral_hammer(w, 2.0, state=state, power_iters=30)
    sv = torch.linalg.svdvals(w.double())
    assert sv[0] == pytest.approx(2.0, rel=1e-4)
    assert torch.allclose(sv[1:], torch.tensor([1.5, 0.5, 0.1], dtype=torch.float64), atol=1e-4)
    assert state["v"].shape == (4,)
    zero = torch.zeros(5, 3)
    C.spectral_hammer(zero, 1.0)
    assert torch.count_nonzero(zero) == 0


def test_hammer_state_persists_per_parameter():
    params = make_params(1.0, seed=15)
    wc = C.WeightConstraint("spectral_hammer", 1.0, params)
    train(params, wc, "muon", steps=2, seed=15)
    st = wc.state_dict()
    assert set(st) == set(SHAPES)
    wc2 = C.WeightConstraint("spectral_hammer", 1.0, params)
    wc2.load_state_dict(st)
    assert torch.equal(wc2.state_dict()["up"]["v"], st["up"]["v"])


def test_nearly_orthogonal_muon_like_matrix_is_capped():
    gen = torch.Generator().manual_seed(16)
    for shape, level in [((64, 64), 1.0), ((64, 64), 1.5), ((96, 32), 1.0), ((32, 96), 1.3)]:
        r = min(shape)
        sv = level * (1 + 1e-7 * (2 * torch.rand(r, generator=gen, dtype=torch.float64) - 1))
        w = matrix_with_singular_values(sv.numpy(), shape, seed=17).float()
        C.spectral_cap(w, 1.0)
        assert svd_sigma_max(w) <= 1.0 + APPROX_TOL
        assert svd_sigma_max(w) == pytest.approx(min(level, 1.0), rel=1e-5)
        C.hard_cap(w, 1.0)
        assert svd_sigma_max(w) <= 1.012


def test_spectral_cap_falls_back_when_linalg_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated convergence failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    monkeypatch.setattr(torch.linalg, "eigvalsh", broken)
    sv = np.array([2.0, 1.2, 0.3])
    w = matrix_with_singular_values(sv, (5, 3), seed=18).float()
    C.spectral_cap(w, 1.0)
    assert torch.allclose(
        torch.linalg.svdvals(w.double()),
        torch.tensor([1.0, 1.0, 0.3], dtype=torch.float64),
        atol=1e-6,
    )
    assert spectral.cached_top_vector(w) is None  # the SVD fallback records no vector
    # every decomposition fails: Frobenius rescaling still gives the bound
    monkeypatch.setattr(projections, "_svd64", lambda x: None)
    w = matrix_with_singular_values(sv, (5, 3), seed=18).float()
    with pytest.warns(RuntimeWarning, match="Frobenius"):
        C.spectral_cap(w, 1.0)
    monkeypatch.undo()
    assert svd_sigma_max(w) <= 1.0 + APPROX_TOL


# ---------------------------------------------------------------------------------------
# The hook


def test_each_hook_projects_only_its_optimizers_params():
    params = make_params(1.0, seed=19, over=3.0)
    named = dict(params)
    hidden = [named["square"], named["up"], named["down"]]
    head = [named["head"]]
    muon = torch.optim.Muon(hidden, lr=1e-3)
    adamw = torch.optim.AdamW(head, lr=1e-4)
    wc = C.WeightConstraint("spectral_cap", 1.0, params)
    wc.attach(muon)
    wc.attach(adamw)

    def ratio(p):
        return svd_sigma_max(p) / C.spectral_limit(p.shape, 1.0)

    x = torch.randn(8, D, generator=torch.Generator().manual_seed(20))
    forward(named, x).pow(2).mean().backward()
    muon.step()
    assert all(ratio(p) <= 1 + APPROX_TOL for p in hidden)
    assert ratio(named["head"]) > 2.9  # not owned by Muon: untouched
    adamw.step()
    assert ratio(named["head"]) <= 1 + APPROX_TOL
    wc.detach()
    with torch.no_grad():
        named["head"].mul_(3.0)
    adamw.step()
    assert ratio(named["head"]) > 2.9  # detached: no projection any more


def test_hook_reads_current_lr():
    w = torch.nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(21)))
    opt = torch.optim.SGD([w], lr=0.5)
    wc = C.WeightConstraint("weight_decay", 1.0, [("w", w)], weight_decay=0.1)
    wc.attach(opt)
    ref = w.detach().clone()
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.allclose(w.detach(), ref * (1 - 0.5 * 0.1))
    opt.param_groups[0]["lr"] = 0.2
    opt.step()
    assert torch.allclose(w.detach(), ref * (1 - 0.05) * (1 - 0.02))


def test_attach_warns_when_optimizer_owns_nothing():
    params = make_params(1.0, seed=22)
    other = torch.nn.Parameter(torch.zeros(3, 3))
    wc = C.WeightConstraint("spectral_cap", 1.0, params)
    with pytest.warns(RuntimeWarning, match="owns none"):
        wc.attach(torch.optim.SGD([other], lr=0.1))
